"""Run one training step in this fresh process and print its peak extra memory in bytes (JSON).

Used by test_memory.py: a separate process per measurement. The step's extra = peak RSS during the
step - RSS just before it. The peak is the kernel's high-water mark for this process (VmHWM), reset just
before the step by writing 5 to /proc/self/clear_refs. Not ru_maxrss: Linux carries the parent's
high-water RSS into a child across fork/exec, so under a large pytest process ru_maxrss measured pytest.
"""

import json
import resource
import sys
from pathlib import Path

import torch

from model import ReformerConfig, ReformerLM


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _peak_rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _reset_peak_rss() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def main() -> None:
    n_layers, reversible, length = int(sys.argv[1]), sys.argv[2] == "1", int(sys.argv[3])
    torch.set_num_threads(1)
    torch.manual_seed(0)
    config = ReformerConfig.tiny(
        vocab_size=256,
        d_model=64,
        n_heads=4,
        d_ff=256,
        n_layers=n_layers,
        attn_layers=("local", "lsh") * (n_layers // 2),
        bucket_size=32,
        n_buckets=32,
        ff_chunk_size=512,
        loss_chunk_size=512,
        reversible=reversible,
    )
    model = ReformerLM(config).train()
    warm_up = torch.randint(0, 256, (1, 64))
    model.loss(warm_up, warm_up).backward()  # first-use allocations of autograd and the kernels
    model.zero_grad(set_to_none=False)
    ids = torch.randint(0, 256, (1, length))
    _reset_peak_rss()
    before = _rss_bytes()
    model.loss(ids, ids).backward()
    peak = _peak_rss_bytes()
    print(json.dumps({"extra_bytes": peak - before}))


if __name__ == "__main__":
    main()
