"""Child-process entry point: ``python -m bench._worker module:function '<json spec>'``.

Runs one measurement function in a fresh interpreter and prints its result dict as one marked JSON line,
which ``bench._common.run_isolated`` reads back. Failures the function anticipates (a CUDA OOM) are
reported as ``{"skipped": reason}``; anything else crashes the child, and the parent records that.
"""

from __future__ import annotations

import importlib
import json
import sys

import torch

from bench._common import RESULT_MARK


def main() -> None:
    target, raw_spec = sys.argv[1], sys.argv[2]
    module_name, _, func_name = target.partition(":")
    func = getattr(importlib.import_module(module_name), func_name)
    try:
        result = func(json.loads(raw_spec))
    except torch.OutOfMemoryError as exc:
        result = {"skipped": f"out of memory: {str(exc).splitlines()[0][:120]}"}
    print(RESULT_MARK + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
