"""Property 5: in reversible mode a training step's peak memory is (nearly) flat in depth."""

import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).with_name("peak_memory_step.py")
LENGTH = 4096
# A fixed glibc mmap threshold: every large tensor gets its own mapping and goes back to the kernel when
# freed, so RSS follows live memory instead of what the heap happened to keep (the dynamic threshold made
# the reversible measurement swing by tens of MB between runs).
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def _extra_bytes(n_layers: int, reversible: bool) -> int:
    result = subprocess.run(
        [sys.executable, str(SCRIPT), str(n_layers), "1" if reversible else "0", str(LENGTH)],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, **MALLOC_ENV},
    )
    return json.loads(result.stdout)["extra_bytes"]


def test_going_from_2_to_8_layers_costs_reversible_mode_under_a_quarter_of_standard_mode() -> None:
    standard = _extra_bytes(8, False) - _extra_bytes(2, False)
    reversible = _extra_bytes(8, True) - _extra_bytes(2, True)
    assert standard > 50 * 2**20, f"standard mode should store activations per layer, grew only {standard} B"
    assert reversible < standard / 4, f"reversible grew {reversible} B vs standard {standard} B"
