"""The command lines: `python -m app` fails clearly without a checkpoint; `reformer-chat chat` without a
server says so."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def run(args: list[str], tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if k not in {"REDIS_URL", "MODEL_DIR", "DATA_DIR"}}
    environment.update(env)
    return subprocess.run(args, cwd=tmp_path, env=environment, capture_output=True, text=True, check=False)


def test_a_missing_checkpoint_stops_startup_with_the_path_and_the_fix(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-checkpoint"
    result = run(
        [sys.executable, "-m", "app", "--port", "0"],
        tmp_path,
        MODEL_DIR=str(missing),
        DATA_DIR=str(tmp_path / "d"),
    )
    assert result.returncode == 3
    assert f"no model checkpoint at {missing}" in result.stderr
    assert "set MODEL_DIR" in result.stderr
    assert "serving at" not in result.stdout
    assert not (tmp_path / "d").exists()  # failed before starting the embedded Redis


def test_invalid_settings_are_reported_before_anything_starts(tmp_path: Path) -> None:
    result = run([sys.executable, "-m", "app"], tmp_path, MAX_NEW_TOKENS="zero")
    assert result.returncode == 2
    assert "max_new_tokens" in result.stderr


def test_chat_subcommand_reports_an_unreachable_server(tmp_path: Path) -> None:
    # Port 9 (discard) on loopback: nothing listens there. tests/e2e/test_client.py drives a live one.
    result = run([sys.executable, "-m", "app.cli", "chat", "--url", "http://127.0.0.1:9"], tmp_path)
    assert result.returncode == 1
    assert "cannot reach the server at http://127.0.0.1:9" in result.stderr


def test_serve_script_runs_the_app(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-checkpoint"
    data = tmp_path / "data"
    result = run(
        [str(REPO / "scripts" / "serve.sh"), "--port", "0"],
        tmp_path,
        MODEL_DIR=str(missing),
        DATA_DIR=str(data),
    )
    assert result.returncode == 3  # it reached the app's startup, which refused the missing checkpoint
    assert f"no model checkpoint at {missing}" in result.stderr
    assert not data.exists()  # refused before starting (and writing) anything
