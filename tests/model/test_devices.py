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
