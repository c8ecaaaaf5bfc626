#!/usr/bin/env bash
# Set up (first run only), lint and type-check, then run the whole test suite: bash scripts/test.sh [pytest args]
# ruff check, ruff format --check and mypy ([tool.mypy] in pyproject.toml) run first; any failure stops here.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh dev
# Tests that use REDIS_URL talk to a Redis at 127.0.0.1:6379 (CI machines run one); start one if absent.
if ! .venv/bin/python -c "import redis; redis.Redis(port=6379, socket_timeout=1).ping()" 2>/dev/null; then
    if command -v redis-server >/dev/null; then
        redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no
    else
        echo "note: no Redis at 127.0.0.1:6379 and no redis-server binary; REDIS_URL tests will be skipped" >&2
    fi
fi
# The chat page's browser tests drive Debian's chromium (never a downloaded browser); as root, install it
# once when missing. Without it those tests are skipped, and say why.
if ! command -v chromium >/dev/null && [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null; then
    echo "installing chromium for the browser tests (apt-get)" >&2
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) \
        >/dev/null || echo "note: could not install chromium; the browser tests will be skipped" >&2
fi
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
exec .venv/bin/python -m pytest "$@"
