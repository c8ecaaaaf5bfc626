"""Property 8: deterministic inference (fixed hash rotations in the state_dict), bf16 autocast, CUDA."""

import pytest
import torch

from model import ReformerConfig, ReformerLM

CONFIG = ReformerConfig.tiny(vocab_size=64)


def test_hash_rotations_are_saved_and_inference_is_deterministic() -> None:
    torch.manual_seed(0)
    model = ReformerLM(CONFIG).eval()
    assert any(name.endswith("attn.rotations") for name in model.state_dict())
    torch.manual_seed(1)
    other = ReformerLM(CONFIG).eval()
    other.load_state_dict(model.state_dict())
    ids = torch.randint(0, 64, (2, 50))
    with torch.no_grad():
        torch.testing.assert_close(other(ids), model(ids), rtol=0, atol=0)
        torch.testing.assert_close(model(ids), model(ids), rtol=0, atol=0)


def test_bf16_autocast_on_cpu_runs_and_stays_close() -> None:
    torch.manual_seed(0)
    model = ReformerLM(CONFIG).eval()
    ids = torch.randint(0, 64, (1, 40))
    with torch.no_grad():
        reference = model(ids)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = model(ids)
    assert torch.isfinite(mixed).all()
    assert (mixed.float().argmax(-1) == reference.argmax(-1)).float().mean() > 0.8


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_cuda_bf16_inference_decode_agrees_with_forward() -> None:
    """Issue 12 on CUDA: bf16 decode weights and state; decode in a prefill and single tokens gives the
    bf16 forward pass's greedy tokens, and auto picks bf16 on a GPU that multiplies it natively."""
    from model.precision import resolve_precision

    device = torch.device("cuda")
    assert resolve_precision("auto", device) == ("bf16" if torch.cuda.is_bf16_supported() else "fp32")
    torch.manual_seed(0)
    model = ReformerLM(CONFIG).to(device).eval().set_inference_precision("bf16")
    assert model.head.weight.dtype == torch.bfloat16
    ids = torch.randint(0, 64, (2, 90), device=device)
    with torch.no_grad():
        expected = model(ids)
        state = model.init_state(2)
        assert state.layers[1].keys.dtype == torch.bfloat16
        pieces = [model.decode(ids[:, :60], state)]
        pieces += [model.decode(ids[:, t : t + 1], state) for t in range(60, 90)]
    got = torch.cat(pieces, dim=1)
    assert (got.argmax(-1) == expected.argmax(-1)).float().mean() >= 0.99
    assert ((got - expected).abs().mean() / expected.abs().mean()).item() <= 3e-3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_cuda_decode_matches_forward() -> None:
    torch.manual_seed(0)
    model = ReformerLM(CONFIG).cuda().eval()
    ids = torch.randint(0, 64, (2, 70), device="cuda")
    with torch.no_grad():
        expected = model(ids)
        state = model.init_state(2)
        got = torch.cat([model.decode(ids[:, :33], state), model.decode(ids[:, 33:], state)], dim=1)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        assert torch.isfinite(model(ids)).all()
