"""A turn's user message, reply and token ids reach Redis in one script call, as Redis itself records it.

The no-half-turn tests kill Redis or the app mid-turn and look for a torn turn, which catches a split write
only when the kill lands between its halves. This reads the commands instead: the test's own redis-server
runs MONITOR while the app answers turns, and every write to a conversation's messages or token ids must be
a command run by a script (MONITOR's `lua` client), with the ids' APPEND and the messages' RPUSH inside the
same script run. A script runs atomically, so MONITOR shows its commands as one uninterrupted block.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import httpx

from tests.support import LiveServerFactory, RedisServer, quiet_params

WRITES = {"APPEND", "RPUSH", "LPUSH", "SET", "SETRANGE", "DEL", "UNLINK", "RENAME", "LSET", "LTRIM", "LREM"}
STOP = "atomic-turn-test-stop"


def record_commands(server: RedisServer, ready: threading.Event, into: list[dict[str, Any]]) -> None:
    """MONITOR `server` until the STOP echo, appending each command it reports."""
    with server.client() as client, client.monitor() as monitor:
        ready.set()
        while STOP not in (command := monitor.next_command())["command"]:
            into.append(command)


def script_runs(commands: list[dict[str, Any]]) -> list[list[str]]:
    """Maximal runs of consecutive script-issued commands: one run per script call."""
    runs: list[list[str]] = []
    previous_lua = False
    for command in commands:
        lua = command["client_type"] == "lua"
        if lua and not previous_lua:
            runs.append([])
        if lua:
            runs[-1].append(command["command"])
        previous_lua = lua
    return runs


def test_a_turn_writes_its_messages_and_ids_in_one_script_call(
    live_server: LiveServerFactory, tmp_path: Path
) -> None:
    commands: list[dict[str, Any]] = []
    with RedisServer(tmp_path / "redis", aof=False) as server:
        ready = threading.Event()
        recorder = threading.Thread(target=record_commands, args=(server, ready, commands), daemon=True)
        recorder.start()
        ready.wait()
        with live_server(redis_url=server.url) as live, httpx.Client(base_url=live.url, timeout=None) as http:
            session_id = http.post("/v1/sessions").json()["session_id"]
            for content in ("first turn", "second turn"):
                turn = http.post(
                    f"/v1/sessions/{session_id}/messages", json={"content": content, **quiet_params()}
                )
                assert turn.status_code == 200, turn.text
        with server.client() as client:
            client.echo(STOP)
        recorder.join()

    ids, msgs = f"{{{session_id}}}:ids", f"{{{session_id}}}:msgs"
    for command in commands:
        name, *args = command["command"].split(" ")
        if name.upper() in WRITES and any(key in arg for arg in args[:1] for key in (ids, msgs)):
            assert command["client_type"] == "lua", f"written outside a script: {command['command'][:120]}"
    turns = [
        run for run in script_runs(commands) if any(c.upper().startswith("APPEND ") and ids in c for c in run)
    ]
    assert len(turns) == 2, f"expected one script run per turn writing the ids, got {len(turns)}"
    for run in turns:
        pushed = [c for c in run if c.upper().startswith("RPUSH ") and msgs in c]
        assert len(pushed) == 2, f"a turn's script run must push its user message and reply: {run}"
