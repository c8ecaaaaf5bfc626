"""bf16: decode agrees with forward on real text, products really run in bf16, auto falls back to fp32.

Issue 12's properties 2, 4 and 5 (property 1, fp32 untouched, is the rest of tests/model; property 3,
reversible == standard under bf16 with dropout, is in test_reversible.py).
"""

from __future__ import annotations

import json
import logging
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from model import ReformerConfig, ReformerLM, load_checkpoint
from model import precision as precision_module
from model.precision import resolve_precision
from model.train import main
from model.train.corpus import conversations

SHIPPED = Path(__file__).resolve().parents[2] / "checkpoints" / "reformer-chat-small"
HELD_OUT_TOKENS = 1024


@pytest.fixture(scope="module")
def shipped() -> tuple[ReformerLM, ReformerLM, torch.Tensor]:
    """The shipped checkpoint in fp32 and in bf16, and ~1 K tokens of validation conversations (1, T)."""
    fp32, tokenizer = load_checkpoint(SHIPPED, device="cpu")
    bf16, _ = load_checkpoint(SHIPPED, device="cpu", precision="bf16")
    ids: list[int] = []
    for conversation in conversations("valid"):
        ids.extend(tokenizer.encode_chat(conversation))
        if len(ids) > HELD_OUT_TOKENS:
            break
    return fp32, bf16, torch.tensor([ids[:HELD_OUT_TOKENS]])


def _loss(logits: torch.Tensor, ids: torch.Tensor) -> float:
    return F.cross_entropy(logits[0, :-1].float(), ids[0, 1:]).item()


def _decode(model: ReformerLM, ids: torch.Tensor, cuts: list[int]) -> torch.Tensor:
    """Logits of decode() fed ids in pieces ending at `cuts` (and the end)."""
    state = model.init_state(1)
    starts = [0, *cuts]
    ends = [*cuts, ids.shape[1]]
    with torch.no_grad():
        return torch.cat([model.decode(ids[:, a:b], state) for a, b in zip(starts, ends, strict=True)], dim=1)


SPLITS = {
    "one prefill": [],
    "single tokens": list(range(1, HELD_OUT_TOKENS)),
    "a mix": [300, *range(301, 420), 700, 701, 702, 900],
}


@pytest.mark.parametrize("split", SPLITS)
def test_bf16_decode_agrees_with_the_bf16_forward_pass_on_real_text(
    shipped: tuple[ReformerLM, ReformerLM, torch.Tensor], split: str
) -> None:
    _, bf16, ids = shipped
    with torch.no_grad():
        forward = bf16(ids)
    decoded = _decode(bf16, ids, SPLITS[split])
    agree = (decoded.argmax(-1) == forward.argmax(-1)).float().mean().item()
    assert agree >= 0.99, f"greedy tokens agree at {agree:.2%} of positions"
    assert _loss(decoded, ids) == pytest.approx(_loss(forward, ids), rel=0.005)
    # Tighter than the issue asks: decode multiplies the same bf16-rounded numbers as forward, in another
    # order and other kernels, so logits differ by ~1e-4 of their mean size (measured 9e-5); statistics
    # taken in bf16 instead of fp32 in the one-token path make that ~1e-3.
    drift = ((decoded - forward).abs().mean() / forward.abs().mean()).item()
    assert drift <= 3e-4, f"decode logits drift {drift:.1e} from forward's"


def test_bf16_forward_loss_is_within_one_percent_of_fp32(
    shipped: tuple[ReformerLM, ReformerLM, torch.Tensor],
) -> None:
    fp32, bf16, ids = shipped
    assert bf16.precision == "bf16" and bf16.head.weight.dtype == torch.bfloat16
    assert bf16.norm.weight.dtype == torch.float32 and bf16.blocks[1].attn.rotations.dtype == torch.float32
    with torch.no_grad():
        assert _loss(bf16(ids), ids) == pytest.approx(_loss(fp32(ids), ids), rel=0.01)


def test_a_bf16_decode_state_loses_nothing_under_bf16(
    shipped: tuple[ReformerLM, ReformerLM, torch.Tensor],
) -> None:
    """Under bf16 the cached keys and values are bf16 products, so a bf16 state (half the bytes) holds the
    same numbers as an fp32 one: identical logits, in a prefill and in single-token steps."""
    _, bf16, ids = shipped
    ids = ids[:, :400]
    cuts = [300, *range(301, 400)]
    assert bf16.init_state(1).layers[1].keys.dtype == torch.bfloat16
    compact = _decode(bf16, ids, cuts)
    bf16.state_dtype = torch.float32
    try:
        assert bf16.init_state(1).layers[1].keys.dtype == torch.float32
        wide = _decode(bf16, ids, cuts)
    finally:
        bf16.state_dtype = None
    torch.testing.assert_close(compact, wide, rtol=0, atol=0)


@pytest.mark.parametrize("shared_qk", [True, False], ids=["shared QK", "separate QK"])
def test_both_lsh_rules_decode_under_bf16_as_their_forward_pass_rounds(shared_qk: bool) -> None:
    """The shipped checkpoint covers one LSH rule; this covers both, on a model with weights wide enough
    (std 0.2) that attention is not uniform. A float32 state must give the same logits as a bf16 one (the
    outputs are rounded as the forward pass rounds them, not more exactly), and single-token decode must
    round the own key's value as the forward kernel does (in float32 beside the window's bf16 product)."""
    torch.manual_seed(0)
    config = ReformerConfig.small(vocab_size=256, shared_qk=shared_qk, bucket_size=16, n_buckets=8)
    model = ReformerLM(config).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() >= 2:
                parameter.normal_(0.0, 0.2)
    model.set_inference_precision("bf16")
    ids = torch.randint(0, 256, (1, 400))
    cuts = [300, *range(301, 400)]
    compact = _decode(model, ids, cuts)
    model.state_dtype = torch.float32
    wide = _decode(model, ids, cuts)
    torch.testing.assert_close(compact, wide, rtol=0, atol=0)
    model.state_dtype = None
    with torch.no_grad():
        forward = model(ids)
    single = _decode(model, ids, list(range(1, 400)))
    drift = ((single - forward).abs().mean() / forward.abs().mean()).item()
    assert drift <= 3e-4, f"decode logits drift {drift:.1e} from forward's"


# ---- no silent fp32 in the hot path, no bf16 in the statistics ------------------------------------------

_PRODUCTS = {"mm", "addmm", "bmm", "baddbmm", "_scaled_dot_product_flash_attention_for_cpu"}
# What must stay fp32: bucket choice, softmax statistics (the kernel's and the hash rounds' logsumexp, the
# one-token paths' softmax), the loss's logsumexp.
_STATISTICS = {"argmax", "logsumexp", "_softmax", "_log_softmax"}
_MODEL_DIR = Path(__file__).resolve().parents[2] / "model"


class _ProductDtypes(TorchDispatchMode):
    """Records every matrix product and statistic that reaches the kernels (after autocast), by the model
    function that issued it (the innermost Python frame in model/), with its input dtypes."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: Counter[tuple[str, str]] = Counter()
        self.statistics: Counter[tuple[str, str]] = Counter()

    def __torch_dispatch__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        name = func.overloadpacket.__name__
        if name in _PRODUCTS or name in _STATISTICS:
            dtypes = {str(a.dtype).removeprefix("torch.") for a in args if isinstance(a, torch.Tensor)}
            record = self.seen if name in _PRODUCTS else self.statistics
            record[(_issuer(), "/".join(sorted(dtypes)))] += 1
        return func(*args, **(kwargs or {}))


def _issuer() -> str:
    frame = sys._getframe(2)
    while frame is not None:
        path = Path(frame.f_code.co_filename)
        if path.parent == _MODEL_DIR:
            return f"{path.stem}.{frame.f_code.co_name}"
        frame = frame.f_back
    return "outside the model (autograd engine)"


def _products(run: Callable[[], object]) -> Counter[tuple[str, str]]:
    """The products `run` issues, by (issuer, dtypes); asserts on the way that its statistics are fp32."""
    recorder = _ProductDtypes()
    with recorder:
        run()
    for (issuer, dtypes), count in recorder.statistics.items():
        assert dtypes == "float32", f"{count} statistic(s) of {issuer} ran in {dtypes}"
    assert recorder.statistics, "no statistics seen"
    return recorder.seen


HOT_CONFIG = ReformerConfig.tiny(vocab_size=64, n_layers=3, attn_layers=("local", "lsh", "full"), dropout=0.1)
# Where each part of the hot path issues its products (module.function), training and decoding.
HOT_PATH = {
    "projections": ("attention._project", "lsh._project"),
    "feed-forward": ("feedforward.forward_chunk",),
    # The kernel's scores are multiplied in _Group.__init__, its outputs and gradients in forward/backward.
    "attention kernel": (
        "chunked_attention.__init__",
        "chunked_attention.forward",
        "chunked_attention.backward",
    ),
    "head": ("linear_cross_entropy._chunk_logits", "linear_cross_entropy.forward", "reformer._logits"),
}


def _check_bf16(seen: Counter[tuple[str, str]], parts: dict[str, tuple[str, ...]]) -> None:
    for (issuer, dtypes), count in seen.items():
        if issuer == "lsh.hash_buckets":
            assert dtypes == "float32", "hashing must rotate in fp32"
        else:
            assert dtypes == "bfloat16", f"{count} product(s) of {issuer} ran in {dtypes}"
    issuers = {issuer for issuer, _ in seen}
    for part, functions in parts.items():
        assert issuers & set(functions), f"no {part} product seen: {sorted(issuers)}"
    assert "lsh.hash_buckets" in issuers


def test_training_step_products_run_in_bf16_under_autocast() -> None:
    torch.manual_seed(0)
    model = ReformerLM(HOT_CONFIG).train()
    ids = torch.randint(0, 64, (2, 48))

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model.loss(ids, ids)
        loss.backward()

    seen = _products(step)
    _check_bf16(seen, {**HOT_PATH, "head": HOT_PATH["head"][:2]})
    # The backward pass multiplies in bf16 too: the kernel's own backward, and the reversible recomputation.
    assert ("chunked_attention.backward", "bfloat16") in seen
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters())


def test_bf16_decode_products_run_in_bf16(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = ReformerLM(HOT_CONFIG).eval().set_inference_precision("bf16")
    ids = torch.randint(0, 64, (1, 40))
    state = model.init_state(1)

    def decode() -> None:
        with torch.no_grad():
            model.decode(ids[:, :30], state)  # prefill: the chunked kernel
            for t in range(30, 40):
                model.decode(ids[:, t : t + 1], state)  # one token: each layer's direct path

    one_token = ("lsh._decode_one", "attention._decode_one", "attention.decode")
    _check_bf16(_products(decode), {**HOT_PATH, "one-token attention": one_token})


# ---- auto without native bf16 --------------------------------------------------------------------------


@pytest.fixture
def no_bf16_cpu(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A CPU without AMX or AVX-512 BF16: the only part of this test that cannot be real on this machine."""
    monkeypatch.setattr(precision_module, "cpu_flags", lambda: frozenset({"fpu", "sse2", "avx2", "avx512f"}))
    yield


def _fallback_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "precision auto -> fp32" in r.getMessage()]


def test_auto_picks_bf16_only_where_the_cpu_multiplies_it(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu = torch.device("cpu")
    for flags, expected in (({"amx_bf16"}, "bf16"), ({"avx512_bf16"}, "bf16"), ({"avx512f"}, "fp32")):
        monkeypatch.setattr(precision_module, "cpu_flags", lambda flags=flags: frozenset(flags))
        assert resolve_precision("auto", cpu) == expected
        assert resolve_precision("fp32", cpu) == "fp32" and resolve_precision("bf16", cpu) == "bf16"
    with pytest.raises(ValueError, match="use one of auto, fp32, bf16"):
        resolve_precision("fp16", cpu)


def test_auto_training_without_bf16_runs_fp32_and_says_so_once(
    no_bf16_cpu: None, tmp_path: Path, chat_tokenizer_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    out = tmp_path / "run"
    args = [
        "--out", str(out), "--tokenizer", str(chat_tokenizer_path), "--preset", "tiny", "--data-limit", "8",
        "--seq-len", "32", "--batch-size", "4", "--steps", "2", "--eval-every", "1", "--eval-batches", "1",
        "--test-batches", "1", "--threads", "1", "--device", "cpu", "--log-every", "1", "--precision", "auto",
    ]  # fmt: skip
    assert main(args) == 0
    assert len(_fallback_lines(caplog)) == 1
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {row["kind"] for row in rows} == {"train", "eval", "test"}
    assert {row["precision"] for row in rows} == {"fp32"}
    training = json.loads((out / "checkpoint" / "training.json").read_text())
    assert training["precision"] == "fp32" and training["options"]["precision"] == "auto"


def test_auto_loading_without_bf16_serves_fp32_and_says_so_once(
    no_bf16_cpu: None, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    model, _ = load_checkpoint(SHIPPED, device="cpu", precision="auto")
    assert model.precision == "fp32" and model.head.weight.dtype == torch.float32
    assert model.init_state(1).layers[0].keys.dtype == torch.float32
    assert len(_fallback_lines(caplog)) == 1
