#!/usr/bin/env bash
# Run the chat service from a checkout (setting up .venv on the first run); reads settings
# from the environment and ./.env (see .env.example), and prints the URL once it is listening.
#   scripts/serve.sh [--host HOST] [--port PORT]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh  # first run: creates .venv with torch 2.13.0 (CPU) and the project
exec .venv/bin/python -m app "$@"
