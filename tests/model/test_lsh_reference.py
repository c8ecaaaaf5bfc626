"""The whole LSH layer against a brute-force O(L^2) reading of its rule (docs/DESIGN.md, "The model").

Per head and hash round queries and keys are hashed by the layer's fixed rotation (bucket = argmax over
[xR; -xR]); a query attends to the at most `bucket_size` most recent earlier keys whose bucket is its own,
and to its own key: with shared QK (keys are the unit queries) at the constant `self_attn_score`, so only
when it has nothing else; with separate Q/K at its real score. The rounds are combined with their
logsumexp weights. The reference reads that rule one query at a time, with no sorting,
chunking or grouping, and takes nothing from the layer but its weights.

The kernel works a group of chunks at a time (~8 MB of scores), so at test sizes everything would fall in
one group: `small_groups` forces a group to hold one chunk (or three), so a 100-token sequence crosses a
dozen group boundaries per round, where a dropped or misplaced chunk shows in the values.
"""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from model import ReformerConfig, ReformerLM
from model.lsh import LSHAttention, combine_rounds

# Both LSH variants (ReformerConfig.shared_qk), by name in test ids: -k shared-qk / -k separate-qk.
QK_VARIANTS = pytest.mark.parametrize("shared_qk", [True, False], ids=["shared-qk", "separate-qk"])


def small_groups(monkeypatch: pytest.MonkeyPatch, elements: int) -> None:
    """Cap every attention kernel's group (its `_GROUP_*` element budget) at `elements`: the kernels then
    take max(1, elements // per-chunk cost) chunks a group, so 1 means one chunk per group."""
    patched = 0
    for name, module in list(sys.modules.items()):
        if name.startswith("model.") and module is not None:
            for attribute, value in vars(module).items():
                if attribute.startswith("_GROUP_") and isinstance(value, int):
                    monkeypatch.setattr(module, attribute, elements)
                    patched += 1
    assert patched, "no kernel group budget (model.*._GROUP_*) found to shrink: update small_groups"


def _config(shared_qk: bool, **overrides: object) -> ReformerConfig:
    """Tiny, three hash rounds, buckets of 8 in 4 buckets: 100 tokens overflow every bucket's window."""
    return ReformerConfig.tiny(vocab_size=97, n_hashes=3, shared_qk=shared_qk, **overrides)


def _heads(x: Tensor, H: int) -> Tensor:
    B, L, _ = x.shape
    return x.view(B, L, H, -1).transpose(1, 2)  # (B, H, L, D)


def _buckets(x: Tensor, rotations: Tensor) -> Tensor:
    """x (B, H, L, D) -> (B, H, R, L): argmax over [xR; -xR], in float32 as the layer hashes."""
    rotated = torch.einsum("bhld,hrdk->bhrlk", x.float(), rotations.float())
    return torch.cat((rotated, -rotated), dim=-1).argmax(dim=-1)


def reference_layer(layer: LSHAttention, x: Tensor, config: ReformerConfig) -> Tensor:
    """The layer's output (B, L, d_model) for positions 0..L-1, one query at a time."""
    H, S, R = config.n_heads, config.bucket_size, config.n_hashes
    shared = config.shared_qk
    if shared:
        q = _heads(layer.to_qk(x), H)
        k = F.normalize(q, dim=-1)  # keys are the unit-length queries
    else:
        q, k = _heads(layer.to_q(x), H), _heads(layer.to_k(x), H)
    v = _heads(layer.to_v(x), H)
    q_buckets, k_buckets = _buckets(q, layer.rotations), _buckets(k, layer.rotations)
    q = q * q.shape[-1] ** -0.5
    B, _, L, D = q.shape
    out = torch.zeros(B, H, L, D, dtype=x.dtype)
    for b in range(B):
        for h in range(H):
            for t in range(L):
                outputs, lses = [], []
                for r in range(R):
                    earlier = [s for s in range(t) if k_buckets[b, h, r, s] == q_buckets[b, h, r, t]][-S:]
                    scores = q[b, h, t] @ k[b, h, earlier].T  # (len(earlier),)
                    own = (
                        torch.full((1,), config.self_attn_score, dtype=x.dtype)
                        if shared
                        else q[b, h, t] @ k[b, h, t]
                    )
                    scores = torch.cat((scores, own.reshape(1)))
                    values = torch.cat((v[b, h, earlier], v[b, h, t : t + 1]))
                    outputs.append(torch.softmax(scores, dim=0) @ values)
                    lses.append(torch.logsumexp(scores, dim=0))
                weights = torch.softmax(torch.stack(lses), dim=0)  # each round's share of the attention mass
                out[b, h, t] = (weights[:, None] * torch.stack(outputs)).sum(dim=0)
    return layer.to_out(out.transpose(1, 2).reshape(B, L, H * D))


def _layer(config: ReformerConfig, seed: int) -> LSHAttention:
    torch.manual_seed(seed)
    return LSHAttention(config).double()


@QK_VARIANTS
@pytest.mark.parametrize("group_chunks", [1, 3])
def test_the_lsh_layer_matches_the_brute_force_rule_across_many_groups(
    monkeypatch: pytest.MonkeyPatch, shared_qk: bool, group_chunks: int
) -> None:
    config = _config(shared_qk)
    B, L = 2, 100  # 13 chunks of 8 per round: 13 (or 5) groups each, every bucket past its window
    # One chunk's cost in the sorted kernel: B * H * R query-key pairs of S x 2S scores.
    small_groups(monkeypatch, group_chunks * B * config.n_heads * config.n_hashes * 2 * config.bucket_size**2)
    layer = _layer(config, seed=group_chunks)
    x = torch.randn(B, L, config.d_model, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    positions = torch.arange(L).expand(B, L)
    got, _ = layer(x, positions)
    torch.testing.assert_close(got, reference_layer(layer, x, config), rtol=0, atol=1e-9)


@QK_VARIANTS
def test_the_lsh_layers_gradients_match_the_brute_force_rule(
    monkeypatch: pytest.MonkeyPatch, shared_qk: bool
) -> None:
    """The kernel's hand-written backward (one chunk per group) against autograd through the reference."""
    small_groups(monkeypatch, 1)
    config = _config(shared_qk)
    layer = _layer(config, seed=3)
    x = torch.randn(1, 60, config.d_model, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    weight = torch.randn(
        1, 60, config.d_model, dtype=torch.float64, generator=torch.Generator().manual_seed(6)
    )
    results = []
    for use_reference in (False, True):
        xi = x.clone().requires_grad_()
        layer.zero_grad()
        out = reference_layer(layer, xi, config) if use_reference else layer(xi, torch.arange(60)[None])[0]
        (out * weight).sum().backward()
        results.append([xi.grad, *(p.grad.clone() for p in layer.parameters())])
    for got, expected in zip(*results, strict=True):
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-8)


@QK_VARIANTS
def test_decode_matches_forward_across_many_groups(monkeypatch: pytest.MonkeyPatch, shared_qk: bool) -> None:
    """Single-token decode never runs the grouped kernel, so it is an independent check of the forward
    pass's grouping on the whole model: past capacity, several rounds, one chunk per group."""
    small_groups(monkeypatch, 1)
    torch.manual_seed(0)
    config = _config(shared_qk, n_layers=3, attn_layers=("local", "lsh", "lsh"))
    model = ReformerLM(config).eval()
    ids = torch.randint(0, 97, (2, 3 * config.lsh_capacity + 5), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(ids)
        state = model.init_state(2)
        one_by_one = torch.cat([model.decode(ids[:, t : t + 1], state) for t in range(ids.shape[1])], dim=1)
        state = model.init_state(2)
        prefill = torch.cat([model.decode(ids[:, :61], state), model.decode(ids[:, 61:], state)], dim=1)
    torch.testing.assert_close(one_by_one, expected, rtol=0, atol=1e-4)
    torch.testing.assert_close(prefill, expected, rtol=0, atol=1e-4)


def test_combining_rounds_keeps_the_outputs_dtype() -> None:
    """Under bf16 autocast the rounds' outputs are bf16 and their logsumexps float32: the weights follow
    the outputs, so the layer's output stays bf16 (float32 weights would promote it)."""
    out = torch.randn(1, 2, 3, 4, 5).bfloat16()  # (B, H, R, T, D)
    lse = torch.randn(1, 2, 3, 4)  # (B, H, R, T)
    assert combine_rounds(out, lse).dtype == torch.bfloat16
