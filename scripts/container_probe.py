"""What scripts/container_check.sh asks of the running stack, done as a user's client would do it.

    python scripts/container_probe.py wait-ready URL [--timeout S]
    python scripts/container_probe.py wait-redis-down URL      /admin/ready is 503 and names Redis
    python scripts/container_probe.py converse URL STATE      REST turn, websocket turn, OpenAI SDK, metrics
    python scripts/container_probe.py resume URL STATE        every acknowledged turn stored; one more turn

The API key and admin token come from CHECK_API_KEY and CHECK_ADMIN_TOKEN. STATE is a JSON file holding
the session and every turn the server acknowledged (answered 200, or a websocket `done` frame), so a
later `resume`, after a container was killed, checks that each of them is still stored, in order.
Each command prints one line per check and exits 1 on the first failure.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import openai
from websockets.sync.client import connect

# Short replies with a fixed seed: the point is the path through the stack, not the text.
SAMPLING: dict[str, Any] = {"max_tokens": 8, "temperature": 0.8, "seed": 16}


class CheckFailed(Exception):
    pass


def check(condition: bool, what: str) -> None:
    if not condition:
        raise CheckFailed(what)
    print(f"  ok  {what}", flush=True)


def api(url: str) -> httpx.Client:
    return httpx.Client(
        base_url=url, timeout=60, headers={"Authorization": f"Bearer {os.environ['CHECK_API_KEY']}"}
    )


def wait_ready(url: str, timeout: float) -> None:
    """Poll /admin/ready until 200, printing each distinct not-ready reason on the way."""
    start, seen = time.monotonic(), set()
    while time.monotonic() - start < timeout:
        try:
            response = httpx.get(f"{url}/admin/ready", timeout=5)
        except httpx.TransportError as exc:
            reason = f"not answering ({type(exc).__name__})"
        else:
            if response.status_code == 200:
                check(True, f"/admin/ready is 200 after {time.monotonic() - start:.1f} s")
                return
            reason = f"{response.status_code}: {response.json()['error']['message']}"
        if reason not in seen:
            seen.add(reason)
            print(f"  ..  not ready yet: {reason}", flush=True)
        time.sleep(0.5)
    raise CheckFailed(f"/admin/ready not 200 within {timeout:.0f} s")


def wait_redis_down(url: str, timeout: float) -> None:
    """Poll until the server answers (it may be starting) and /admin/ready is 503 naming Redis."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        try:
            response = httpx.get(f"{url}/admin/ready", timeout=5)
        except httpx.TransportError:
            time.sleep(0.5)
            continue
        message = response.json().get("error", {}).get("message", "")
        if response.status_code == 503 and message.startswith("redis:"):
            check(True, f"/admin/ready is 503 and names Redis: {message}")
            return
        time.sleep(0.5)
    raise CheckFailed(f"/admin/ready did not report Redis down within {timeout:.0f} s")


def rest_turn(http: httpx.Client, session_id: str, content: str) -> tuple[str, str]:
    response = http.post(f"/v1/sessions/{session_id}/messages", json={"content": content, **SAMPLING})
    check(response.status_code == 200, f"REST turn answered 200 ({response.status_code})")
    reply = response.json()["message"]["content"]
    return content, reply


def websocket_turn(url: str, session_id: str, content: str) -> tuple[str, str]:
    ws_url = url.replace("http", "ws", 1) + f"/v1/sessions/{session_id}/stream"
    headers = {"Authorization": f"Bearer {os.environ['CHECK_API_KEY']}"}
    with connect(ws_url, additional_headers=headers, open_timeout=30) as ws:
        ws.send(json.dumps({"type": "message", "content": content, **SAMPLING}))
        kinds, text = [], ""
        while True:
            frame = json.loads(ws.recv(timeout=60))
            kinds.append(frame["type"])
            if frame["type"] == "token":
                text += frame["text"]
            elif frame["type"] != "start":
                break
    check(frame["type"] == "done", f"websocket turn ended with a done frame ({frame})")
    check(kinds.count("token") >= 1 and kinds[0] == "start", f"streamed {kinds.count('token')} token frames")
    check(text == frame["message"]["content"], "the streamed tokens concatenate to the stored reply")
    return content, frame["message"]["content"]


def stored_turns(http: httpx.Client, session_id: str) -> list[list[str]]:
    response = http.get(f"/v1/sessions/{session_id}")
    check(response.status_code == 200, f"GET the session is 200 ({response.status_code})")
    messages = response.json()["messages"]
    roles = [m["role"] for m in messages]
    check(roles == ["user", "assistant"] * (len(messages) // 2), "the session alternates user/assistant")
    return [[messages[i]["content"], messages[i + 1]["content"]] for i in range(0, len(messages), 2)]


def openai_completion(url: str) -> None:
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=os.environ["CHECK_API_KEY"], timeout=60)
    model = client.models.list().data[0].id
    completion = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "hello from the SDK"}], max_tokens=8, seed=16
    )
    check(completion.choices[0].message.role == "assistant", f"OpenAI SDK completion from model {model}")


def metrics(url: str) -> None:
    token = os.environ["CHECK_ADMIN_TOKEN"]
    check(httpx.get(f"{url}/admin/metrics").status_code == 401, "metrics without the admin token: 401")
    response = httpx.get(f"{url}/admin/metrics", headers={"Authorization": f"Bearer {token}"})
    check(response.status_code == 200, "metrics with the admin token: 200")
    check("reformer_chat_" in response.text, "metrics carry the service's counters")


def converse(url: str, state_file: Path) -> None:
    with api(url) as http:
        response = http.post("/v1/sessions")
        check(response.status_code == 201, f"session created ({response.status_code})")
        session_id = response.json()["session_id"]
        turns = [rest_turn(http, session_id, "hello over REST")]
        turns.append(websocket_turn(url, session_id, "and over the websocket"))
        check(stored_turns(http, session_id) == [list(t) for t in turns], "both turns stored, in order")
    openai_completion(url)
    metrics(url)
    state_file.write_text(json.dumps({"session_id": session_id, "turns": turns}))


def resume(url: str, state_file: Path) -> None:
    state = json.loads(state_file.read_text())
    session_id, acknowledged = state["session_id"], state["turns"]
    with api(url) as http:
        stored = stored_turns(http, session_id)
        check(stored == acknowledged, f"all {len(acknowledged)} acknowledged turns are stored, unchanged")
        turn = rest_turn(http, session_id, f"turn {len(acknowledged) + 1}, after the restart")
        check(stored_turns(http, session_id) == [*acknowledged, list(turn)], "the conversation goes on")
    state["turns"].append(list(turn))
    state_file.write_text(json.dumps(state))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for name in ("wait-ready", "wait-redis-down"):
        wait = commands.add_parser(name)
        wait.add_argument("url")
        wait.add_argument("--timeout", type=float, default=180)
    for name in ("converse", "resume"):
        command = commands.add_parser(name)
        command.add_argument("url")
        command.add_argument("state", type=Path)
    args = parser.parse_args()
    try:
        if args.command == "wait-ready":
            wait_ready(args.url, args.timeout)
        elif args.command == "wait-redis-down":
            wait_redis_down(args.url, args.timeout)
        elif args.command == "converse":
            converse(args.url, args.state)
        else:
            resume(args.url, args.state)
    except CheckFailed as exc:
        print(f"  FAILED  {exc}", flush=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
