"""Cross-entropy of a linear head, computed in chunks with its gradients taken in the same pass.

The (N, vocab) logits never exist whole, and are not recomputed for the backward pass either: each chunk's
logits give its loss and, right away, the gradients with respect to the hidden states and the head's weight
(softmax minus one-hot, times the weight or the hidden chunk). Backward only scales those by the incoming
gradient. Against checkpointing each chunk, this saves one of the head's four matrix products per token
(the head dominates a training step's dense work at this model size) and keeps no chunk graph alive.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


def linear_cross_entropy(
    hidden: Tensor, weight: Tensor, targets: Tensor, chunk_size: int, ignore_index: int = -100
) -> Tensor:
    """Summed cross-entropy of logits = hidden @ weight.T against targets, skipping ignore_index.

    hidden (N, E), weight (V, E), targets (N,) -> a scalar (float32; float64 for float64 inputs).
    Differentiable in hidden and weight.
    """
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _LinearCrossEntropy.apply(hidden, weight, targets, chunk_size, ignore_index)
    total = hidden.new_zeros((), dtype=_loss_dtype(hidden))
    for start in range(0, hidden.shape[0], chunk_size):
        end = start + chunk_size
        total = total + _chunk_loss(hidden[start:end], weight, targets[start:end], ignore_index)
    return total


def _loss_dtype(t: Tensor) -> torch.dtype:
    return torch.promote_types(t.dtype, torch.float32)


def _chunk_logits(
    hidden: Tensor, weight: Tensor, targets: Tensor, ignore_index: int
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """One chunk's summed loss, its logits (at least float32), their logsumexp, safe targets, validity."""
    logits = hidden @ weight.T  # (n, V); autocast may hand back bf16
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    valid = targets != ignore_index
    safe = torch.where(valid, targets, 0)
    lse = torch.logsumexp(logits, dim=-1)
    picked = logits.gather(1, safe[:, None]).squeeze(1)
    return ((lse - picked) * valid).sum(), logits, lse, safe, valid


def _chunk_loss(hidden: Tensor, weight: Tensor, targets: Tensor, ignore_index: int) -> Tensor:
    return _chunk_logits(hidden, weight, targets, ignore_index)[0]


def _chunk_loss_and_grad(
    hidden: Tensor, weight: Tensor, targets: Tensor, ignore_index: int
) -> tuple[Tensor, Tensor]:
    """The chunk's loss and d(loss)/d(logits): softmax minus one-hot, zero on ignored rows."""
    loss, logits, lse, safe, valid = _chunk_logits(hidden, weight, targets, ignore_index)
    grad = logits.sub_(lse[:, None]).exp_()  # softmax, in the logits' memory
    grad[torch.arange(grad.shape[0], device=grad.device), safe] -= 1.0
    return loss, grad.mul_(valid[:, None])


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, hidden: Tensor, weight: Tensor, targets: Tensor, chunk_size: int, ignore_index: int
    ) -> Tensor:
        want_hidden, want_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        ctx.weight_dtype = weight.dtype
        grad_hidden = torch.zeros_like(hidden) if want_hidden else None
        grad_weight = torch.zeros_like(weight, dtype=_loss_dtype(weight)) if want_weight else None
        total = hidden.new_zeros((), dtype=_loss_dtype(hidden))
        for start in range(0, hidden.shape[0], chunk_size):
            end = start + chunk_size
            h = hidden[start:end]
            loss, grad = _chunk_loss_and_grad(h, weight, targets[start:end], ignore_index)
            total += loss
            grad = grad.to(h.dtype)
            if grad_hidden is not None:
                grad_hidden[start:end] = grad @ weight.to(h.dtype)
            if grad_weight is not None:
                grad_weight += grad.T @ h
        ctx.save_for_backward(grad_hidden, grad_weight)
        return total

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, ...]:
        grad_hidden, grad_weight = ctx.saved_tensors
        out_hidden = (grad_hidden * grad_output).to(grad_hidden.dtype) if grad_hidden is not None else None
        out_weight = (grad_weight * grad_output).to(ctx.weight_dtype) if grad_weight is not None else None
        return out_hidden, out_weight, None, None, None
