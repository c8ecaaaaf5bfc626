#!/usr/bin/env bash
# Train the shipped checkpoint (issue 18) in the background on this CPU machine, resumable.
#   bash scripts/train_shipped.sh [RUN_DIR [EXTRA model.train ARGS...]]   default RUN_DIR: /work/runs/shipped
# The side-by-side subjects of bench/recall.py are the same command with one more argument:
#   bash scripts/train_shipped.sh /work/runs/shipped-full --attn-layers full,full,full,full
#   bash scripts/train_shipped.sh /work/runs/shipped-local --attn-layers local,local,local,local
# Starts `python -m model.train` detached (setsid nohup, nice $NICE or 10; it outlives its shell), appends to
# RUN_DIR/train.log and writes its PID to RUN_DIR/train.pid. It runs the code of this checkout's HEAD, exported
# once to RUN_DIR/code, so a later checkout or rebase of the repository changes nothing in a running or resumed
# run. Run the same command again after an interruption (kill, reboot): it resumes exactly from
# RUN_DIR/train_state.pt (written at every evaluation and on SIGTERM).
# The time budget is wall-clock and survives resumption, so the run ends ~95 minutes of training after it first
# started, then measures test loss on its best checkpoint: RUN_DIR/checkpoint is what ships
# (cp RUN_DIR/checkpoint/* checkpoints/reformer-chat-small/). docs/MODEL.md says why each value is what it is.
# The shipped checkpoint's run warm-started from the one shipped before it (commit 7a20e04's
# checkpoints/reformer-chat-small); run from a checkout of that commit's checkpoint to reproduce it.
set -euo pipefail
cd "$(dirname "$0")/.."
run_dir=$(realpath -m "${1:-/work/runs/shipped}")
extra=("${@:2}")
python=$(realpath -s "${PYTHON:-.venv/bin/python}")  # -s: keep the venv symlink

if [[ -f $run_dir/train.pid ]] && kill -0 "$(cat "$run_dir/train.pid")" 2>/dev/null; then
    echo "already training in $run_dir (PID $(cat "$run_dir/train.pid")); log: $run_dir/train.log" >&2
    exit 1
fi
if [[ ! -d $run_dir/code ]]; then
    [[ -z $(git status --porcelain --untracked-files=no) ]] || echo "note: uncommitted changes are not exported" >&2
    mkdir -p "$run_dir/code"
    git archive --format=tar HEAD | tar -x -C "$run_dir/code"
    git rev-parse HEAD >"$run_dir/code/COMMIT"
fi
cd "$run_dir/code"
args=(
    --out "$run_dir" --preset small --init-from checkpoints/reformer-chat-small
    --tokenizer checkpoints/reformer-chat-small/tokenizer.model --vocab-size 4096
    --seq-len 1024 --batch-size 4 --lr 1e-3 --warmup-steps 30 --time-budget-min 95
    --fact-rate 1 --max-facts 6 --copy-rate 1 --memory-start-gap 64 --memory-curriculum-steps 400
    --eval-every 50 --eval-batches 8 --test-batches 32 --seed 0 --threads 1 "${extra[@]}"
)
# bf16 autocast where this checkout's trainer has it (issue 17); fp32 otherwise.
if "$python" -m model.train --help | grep -q -- "--precision"; then
    args+=(--precision bf16)
fi
if [[ -f $run_dir/train_state.pt ]]; then
    args+=(--resume)
fi
echo "$(date -u +%FT%TZ) starting (code $(cat COMMIT)): $python -m model.train ${args[*]}" >>"$run_dir/train.log"
setsid nohup nice -n "${NICE:-10}" "$python" -m model.train "${args[@]}" >>"$run_dir/train.log" 2>&1 </dev/null &
echo $! >"$run_dir/train.pid"
echo "training in $run_dir (PID $!); log: $run_dir/train.log"
