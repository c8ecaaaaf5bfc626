"""A pinned mmap threshold hands freed blocks back to the kernel; glibc's dynamic one keeps them."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from app.malloc import pin_mmap_threshold

# In a fresh process: free one 16 MiB block (under glibc's dynamic rule the threshold rises to 16 MiB),
# then allocate, touch and free 64 blocks of 1 MiB. Prints how much of those 64 MiB is still resident.
PROBE = textwrap.dedent(
    """
    import ctypes, ctypes.util, json, resource, sys
    from app.malloc import pin_mmap_threshold

    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize()

    applied = pin_mmap_threshold(int(sys.argv[1]))
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = (ctypes.c_void_p,)
    big = libc.malloc(16 << 20)
    ctypes.memset(big, 1, 16 << 20)
    libc.free(big)
    before = rss()
    blocks = [libc.malloc(1 << 20) for _ in range(64)]
    for block in blocks:
        ctypes.memset(block, 1, 1 << 20)
    for block in reversed(blocks[:-1]):  # the last stays, so the heap top cannot simply be trimmed
        libc.free(block)
    print(json.dumps({"applied": applied, "kept": rss() - before}))
    """
)


def _probe(threshold: int) -> dict[str, int]:
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"}
    result = subprocess.run(
        [sys.executable, "-c", PROBE, str(threshold)], capture_output=True, text=True, check=True, env=env
    )
    return json.loads(result.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt is Linux-only")
def test_pinned_threshold_returns_freed_blocks_and_the_dynamic_one_keeps_them() -> None:
    dynamic, pinned = _probe(0), _probe(128 * 1024)
    assert dynamic["applied"] is False and pinned["applied"] is True
    assert dynamic["kept"] > 48 << 20, f"glibc's dynamic threshold should keep the freed heap: {dynamic}"
    assert pinned["kept"] < 8 << 20, f"a pinned threshold should return freed blocks: {pinned}"


def test_an_operator_setting_in_the_environment_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    assert pin_mmap_threshold(128 * 1024) is False
