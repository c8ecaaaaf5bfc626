#!/usr/bin/env bash
# Issue 12's GPU check, one prepared script for a CUDA machine (at most ~8 minutes):
#   1. the CUDA tests (tests/model/test_devices.py, and the precision tests),
#   2. bf16 training throughput of the base preset: tokens/s and peak CUDA memory (train rows of metrics.jsonl),
#   3. the decode benchmark in fp32 and bf16 (ours and HF at 1K, 16K and 64K of history).
# Everything lands in one folder (default gpu-check-<UTC time>); summary.txt has the numbers.
#
#   bash scripts/gpu_check.sh [OUT_DIR]        PYTHON=path/to/python to use another interpreter
#
# Each step has its own time limit, so one slow step cannot eat the others' time; a failing step is noted in
# summary.txt and the script goes on.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
OUT=${1:-gpu-check-$(date -u +%Y%m%d-%H%M%S)}
mkdir -p "$OUT"
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"

step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to OUT/NAME.log, note the outcome
    local name=$1 limit=$2
    shift 2
    local start=$SECONDS
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    echo "$name: exit $rc after $((SECONDS - start)) s (log: $OUT/$name.log)" | tee -a "$SUMMARY"
}

{ nvidia-smi || true; "$PY" -c "import torch; print(torch.__version__, torch.cuda.get_device_name())"; } \
    > "$OUT/environment.txt" 2>&1
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "no CUDA device visible to $PY: nothing to check" | tee -a "$SUMMARY"
    exit 1
fi

# 1. CUDA tests (~1 minute).
step tests 150 "$PY" -m pytest -q -rs -p no:cacheprovider tests/model/test_devices.py tests/model/test_precision.py

# 2. Base preset, bf16, 4K-token sequences: a 2.5-minute budget, then eval/test on one batch each (~3 minutes).
step train-base-bf16 240 "$PY" -m model.train --out "$OUT/train-base-bf16" --preset base --device cuda \
    --precision bf16 --tokenizer checkpoints/reformer-chat-small/tokenizer.model --vocab-size 4096 \
    --seq-len 4096 --batch-size 8 --warmup-steps 20 --steps 100000 --time-budget-min 2.5 \
    --eval-every 100000 --eval-batches 1 --test-batches 1 --log-every 10 --data-limit 3000
"$PY" - "$OUT/train-base-bf16/metrics.jsonl" >> "$SUMMARY" 2>&1 <<'PY'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
train = [r for r in rows if r["kind"] == "train"][1:]  # the first window includes CUDA warm-up
if train:
    speed = sum(r["tokens_per_s"] for r in train) / len(train)
    peak = max(r.get("cuda_max_allocated_bytes", 0) for r in train)
    print(f"base preset bf16 training: {speed:,.0f} tokens/s over {train[-1]['step']} steps, "
          f"peak CUDA memory {peak / 2**30:.2f} GiB, precision {train[-1]['precision']}")
PY

# 3. Decode benchmark, fp32 and bf16 (~2 minutes).
step decode 180 "$PY" -m bench.decode --device cuda --threads 4 --lengths 1024 16384 65536 \
    --models ours-local-lsh hf --precisions fp32 bf16 --out "$OUT/decode.json"
grep -A12 '^\*\*targets' "$OUT/decode.log" >> "$SUMMARY" 2>/dev/null || true
echo "results in $OUT"
cat "$SUMMARY"
