#!/usr/bin/env bash
# Run the chat service from a checkout: uses the repository's .venv when there is one, reads settings
# from the environment and ./.env (see .env.example), and prints the URL once it is listening.
#   scripts/serve.sh [--host HOST] [--port PORT]
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -x .venv/bin/python ]]; then
    python=.venv/bin/python
else
    python=${PYTHON:-python3}
fi
exec "$python" -m app "$@"
