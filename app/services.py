"""Services: everything the lifespan builds, in one record on `app.state`.

Routes reach these only through the dependency aliases in app/deps.py, so a test can build an app with
its own settings and get its own store, engine and metrics, never shared globals.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.auth import AdminAuth, ApiKeyAuth
from app.chat import ChatService
from app.config import Settings
from app.engine import ChatEngine, StateCache
from app.metrics import Metrics
from app.snapshots import Snapshots
from app.store.sessions import SessionStore


@dataclass
class Services:
    settings: Settings
    metrics: Metrics
    store: SessionStore
    engine: ChatEngine
    state_cache: StateCache
    chat: ChatService
    api_keys: ApiKeyAuth
    admin: AdminAuth
    checkpoint: Path
    model_info: dict[str, Any]
    started_at: float  # time.monotonic() at startup, for uptime
    snapshots: Snapshots | None = None  # None: SNAPSHOTS_ENABLED=false
