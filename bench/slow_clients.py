"""What a client that never reads can make the server hold: uvicorn's stock protocols vs app/protocols.py.

For each configuration, a server (the real app on the tiny test checkpoint, CI's Redis) runs in its own
`python -m bench.slow_clients --serve` process, and this process, as the client:
1. opens an authenticated websocket and floods it with FLOOD MiB of 125-byte pings without reading
   (the red team's finding 1), recording the server's peak resident-memory growth, how much of the flood
   the server took, and whether (and after how long) it dropped the client;
2. starts an endless turn on a session, floods pings without reading, and times how long until the
   session's lock is free again (a REST turn on it succeeds; finding 2), up to --patience seconds.

    python -m bench.slow_clients            # writes bench/results/slow_clients.json, prints a table

Needs a Redis at TEST_REDIS_URL (redis://127.0.0.1:6379/9 by default); uses a fresh key prefix and
deletes its keys afterwards.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import psutil
import uvicorn

from tests.support import (
    build_tiny_checkpoint,
    client_frame,
    delete_prefix,
    endless_params,
    free_port,
    handshake_request,
    make_settings,
)

KEY = "bench-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
PING = client_frame(9, b"p" * 125)
RESULTS = Path(__file__).resolve().parent / "results" / "slow_clients.json"


def serve(config: str, port: int, checkpoint: Path, prefix: str) -> None:
    """Run the app with the stock uvicorn protocols or the bounded ones until killed."""
    from app.factory import create_app
    from app.protocols import uvicorn_config

    settings = make_settings(
        checkpoint,
        api_keys=[KEY],
        redis_key_prefix=prefix,
        max_new_tokens=4000,
        rate_limit_per_minute=0,
        send_timeout_seconds=1.0,
        session_lock_seconds=30,  # production's default: the lock is renewed while its turn runs
    )
    app = create_app(settings)
    if config == "bounded":
        uvicorn_config_ = uvicorn_config(settings, app, "127.0.0.1", port)
    else:  # what the server ran before issue 13: uvicorn's defaults
        uvicorn_config_ = uvicorn.Config(
            app, host="127.0.0.1", port=port, log_level="warning", ws_max_size=settings.max_body_bytes
        )
    uvicorn.Server(uvicorn_config_).run()


def silent_ws(url: str, session_id: str) -> socket.socket:
    host, port = url.split("://", 1)[1].rsplit(":", 1)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect((host, int(port)))
    sock.sendall(handshake_request(url, f"/v1/sessions/{session_id}/stream", AUTH))
    answer = b""
    while b"\r\n\r\n" not in answer:
        answer += sock.recv(1)
    return sock


def flood(sock: socket.socket, total: int, result: dict[str, float]) -> None:
    burst, sent, start = PING * 500, 0, time.monotonic()
    try:
        while sent < total:
            sock.sendall(burst)
            sent += len(burst)
    except OSError:
        result["dropped_after_s"] = time.monotonic() - start
    result["sent_mib"] = sent / 2**20


def measure(config: str, checkpoint: Path, flood_mib: int, patience: float) -> dict[str, object]:
    port, prefix = free_port(), f"bench-slow-{os.getpid()}-{config}:"
    args = [sys.executable, "-m", "bench.slow_clients", "--serve", config, "--port", str(port)]
    server = subprocess.Popen([*args, "--checkpoint", str(checkpoint), "--prefix", prefix])
    url = f"http://127.0.0.1:{port}"
    try:
        while True:
            try:
                httpx.get(f"{url}/admin/health")
                break
            except httpx.HTTPError:
                time.sleep(0.1)
        process = psutil.Process(server.pid)
        with httpx.Client(base_url=url, headers=AUTH, timeout=None) as http:
            # 1. A ping flood without reading.
            session_id = http.post("/v1/sessions").json()["session_id"]
            sock = silent_ws(url, session_id)
            before, peak, out = process.memory_info().rss, 0, {}
            sender = threading.Thread(target=flood, args=(sock, flood_mib * 2**20, out), daemon=True)
            sender.start()
            while sender.is_alive():
                peak = max(peak, process.memory_info().rss)
                time.sleep(0.02)
            time.sleep(0.5)  # what the server holds once the flood is over (the client is still there)
            held = process.memory_info().rss
            sock.close()
            # 2. An endless turn, then pings, never reading: how long is the session's lock held?
            session_id = http.post("/v1/sessions").json()["session_id"]
            sock = silent_ws(url, session_id)
            message = {
                "type": "message",
                "content": "Talk forever.",
                **endless_params(_tokenizer(checkpoint), 4000),
            }
            sock.sendall(client_frame(1, json.dumps(message).encode()))
            threading.Thread(target=flood, args=(sock, flood_mib * 2**20, {}), daemon=True).start()
            start, freed = time.monotonic(), None
            while time.monotonic() - start < patience:
                turn = http.post(
                    f"/v1/sessions/{session_id}/messages", json={"content": "hi", "max_tokens": 2}
                )
                if turn.status_code == 200:
                    freed = time.monotonic() - start
                    break
                time.sleep(0.25)
            sock.close()
        return {
            "config": config,
            "flood_mib": flood_mib,
            "server_read_mib": round(out["sent_mib"], 1),
            "peak_rss_growth_mib": round((peak - before) / 2**20, 1),
            "held_rss_growth_mib": round((held - before) / 2**20, 1),
            "dropped_after_s": round(out["dropped_after_s"], 2) if "dropped_after_s" in out else None,
            "lock_freed_after_s": round(freed, 2) if freed is not None else f"> {patience:.0f}",
        }
    finally:
        server.kill()
        server.wait()
        delete_prefix(prefix)


def _tokenizer(checkpoint: Path):
    from model.tokenizer import ChatTokenizer

    return ChatTokenizer.load(checkpoint / "tokenizer.model")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--serve", choices=["stock", "bounded"], help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", type=Path, default=Path("/tmp/bench-slow-clients/checkpoint"))
    parser.add_argument("--prefix", help=argparse.SUPPRESS)
    parser.add_argument("--flood-mib", type=int, default=32)
    parser.add_argument("--patience", type=float, default=60.0)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, args.port, args.checkpoint, args.prefix)
        return
    checkpoint = build_tiny_checkpoint(args.checkpoint)
    rows = [measure(config, checkpoint, args.flood_mib, args.patience) for config in ("stock", "bounded")]
    columns = list(rows[0])
    print(" | ".join(columns))
    for row in rows:
        print(" | ".join(str(row[c]) for c in columns))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {"command": " ".join(["python -m bench.slow_clients", *sys.argv[1:]]), "rows": rows}, indent=2
        )
        + "\n"
    )


if __name__ == "__main__":
    main()
