#!/usr/bin/env bash
# Mutation testing, outside CI: bash scripts/mutants.sh [MUTANT_NAME_GLOB ...]
#   bash scripts/mutants.sh                        every module in [tool.mutmut] only_mutate (pyproject.toml)
#   bash scripts/mutants.sh "app.ratelimit*"       one module ("model.lsh*", "app.store.sessions*", ...)
# mutmut makes one small change at a time (a flipped comparison, a changed constant, a dropped call) and runs
# the tests of [tool.mutmut] that reach the changed function; a mutant no test fails on is a survivor, and
# each survivor is either killed by a new test or written down as equivalent in docs/TESTING.md.
# Bounded: at most MUTANTS_BUDGET seconds (default 3600), niced, MUTANTS_CHILDREN workers (default 2).
# Results persist in mutants/ (git-ignored), so a stopped run resumes where it was; delete it to start over.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh dev
budget=${MUTANTS_BUDGET:-3600}
children=${MUTANTS_CHILDREN:-2}
status=0
timeout --signal=INT --kill-after=60 "$budget" \
    nice -n 19 .venv/bin/mutmut run --max-children "$children" "$@" >mutants.log 2>&1 || status=$?
if [[ $status -eq 124 ]]; then
    echo "stopped after MUTANTS_BUDGET=${budget}s; run again to continue (log: mutants.log)" >&2
elif [[ $status -ne 0 ]]; then
    echo "mutmut run failed with status $status: see mutants.log" >&2
    exit "$status"
fi
.venv/bin/mutmut export-cicd-stats >/dev/null
.venv/bin/python - <<'PY'
import json

stats = json.load(open("mutants/mutmut-cicd-stats.json"))
tested = stats["killed"] + stats["survived"] + stats["timeout"] + stats["suspicious"] + stats["segfault"]
killed = stats["killed"] + stats["timeout"] + stats["segfault"]
rate = f"{100 * killed / tested:.1f} %" if tested else "n/a"
print(f"mutants tested {tested} of {stats['total']}: killed {killed} ({rate}), survived {stats['survived']}, "
      f"suspicious {stats['suspicious']}, no tests {stats['no_tests']}")
PY
echo "survivors (mutmut show NAME for the diff):"
.venv/bin/mutmut results 2>/dev/null | grep -E ": (survived|suspicious)$" || true
