"""create_app(): the app factory. Its lifespan wires the services: model -> Redis (the embedded one when
REDIS_URL is unset) -> store and rate limiter -> engine and state cache -> ChatService, all in one
`Services` record that routes reach through app/deps.py.

Nothing is created at import time: no settings read, no Redis client, no model load. Every app (tests
build several in one process) gets its own store, engine, state cache and metrics registry. The process
entry point that serves it is app/cli.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import torch
from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

from app.auth import AdminAuth, ApiKeyAuth
from app.body_size import BodySizeLimit
from app.chat import ChatService
from app.config import Settings
from app.engine import ChatEngine, StateCache
from app.errors import StoreUnavailable, install_error_handlers
from app.metrics import Metrics
from app.openai.conversations.router import router as conversations_router
from app.openai.responses.router import router as responses_router
from app.openai.router import router as openai_router
from app.ratelimit import RateLimitDep, RateLimiter, ReadRateLimitDep
from app.routes import admin, chat, sessions, stream
from app.routes.responses import ADMIN_ERRORS, CHAT_ERRORS, OPENAI_ERRORS, SESSION_ERRORS
from app.security import PageSecurityHeaders, install_cors, redact_secrets_in_server_logs
from app.services import Services
from app.snapshots import Snapshots
from app.store.embedded_redis import EmbeddedRedis
from app.store.history import HistoryStore
from app.store.index import SessionIndex
from app.store.quota import StorageQuota
from app.store.redis_client import RedisTarget, connect_redis
from app.store.sessions import SessionStore
from app.store.snapshots import SnapshotStore
from model import ChatTokenizer, ReformerLM, checkpoint_identity, load_checkpoint

logger = logging.getLogger(__name__)

# How often a Redis that does not answer at start-up is asked again.
_REDIS_RETRY_SECONDS = 1.0

# The browser chat page: plain files shipped inside the package (package-data), no build step.
STATIC_DIR = Path(__file__).resolve().parent / "static"


class CheckpointNotFound(RuntimeError):
    """MODEL_DIR does not point at a checkpoint directory."""


def load_model(settings: Settings) -> tuple[ReformerLM, ChatTokenizer, Path]:
    """Load MODEL_DIR (default: the shipped checkpoint), with an error that says how to fix a bad path."""
    path = settings.resolved_model_dir
    if not path.is_dir():
        raise CheckpointNotFound(
            f"no model checkpoint at {path}: set MODEL_DIR to a checkpoint directory (train one with "
            "`python -m model.train --preset small --out runs/small`, which writes runs/small/checkpoint), "
            "or restore the shipped checkpoints/reformer-chat-small in the repository"
        )
    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    state_dtype = {"auto": None, "fp32": torch.float32, "bf16": torch.bfloat16}[settings.state_dtype]
    model, tokenizer = load_checkpoint(
        path, device=settings.device, precision=settings.precision, state_dtype=state_dtype
    )
    return model, tokenizer, path


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    async with AsyncExitStack() as stack:
        # The model first: a bad MODEL_DIR should fail before anything is started or written.
        model, tokenizer, checkpoint = await asyncio.to_thread(load_model, settings)
        identity = await asyncio.to_thread(checkpoint_identity, model)  # once: it hashes every weight
        metrics = Metrics()
        target = settings.redis_target
        if target is None:
            embedded = EmbeddedRedis(settings.data_dir)
            target = RedisTarget(await asyncio.to_thread(embedded.start), cluster=False)
            stack.callback(embedded.stop)
        client = connect_redis(target, timeout=settings.redis_timeout_seconds)
        stack.push_async_callback(client.aclose)
        store = SessionStore(
            client,
            prefix=settings.redis_key_prefix,
            ttl_seconds=settings.session_ttl_seconds,
            lock_seconds=settings.session_lock_seconds,
            retry_after=settings.retry_after_seconds,
            metrics=metrics,
        )
        history = HistoryStore(client, store)
        index = SessionIndex(client, store, history, settings.redis_key_prefix)
        # On app.state, not Services: the limiter is a router dependency, not a part routes call.
        app.state.rate_limiter = RateLimiter(
            client,
            prefix=settings.redis_key_prefix,
            per_minute=settings.rate_limit_per_minute,
            retry_after=settings.retry_after_seconds,
            metrics=metrics,
        )
        quota = StorageQuota(
            client,
            prefix=settings.redis_key_prefix,
            max_sessions=settings.max_sessions_per_key,
            max_bytes=settings.max_stored_bytes_per_key,
            retry_after=settings.retry_after_seconds,
            session_meta_key=lambda session_id: store.key(session_id, "meta"),
        )
        snapshots = None
        if settings.snapshots_enabled:
            snapshots = Snapshots(
                SnapshotStore(store),
                model,
                identity,
                metrics,
                min_tokens=settings.snapshot_min_tokens,
                every_tokens=settings.snapshot_every_tokens,
                max_bytes=settings.snapshot_max_bytes,
                max_writes=settings.max_running_requests,
            )
            # Runs before the client closes (and after the engine stops: the last turns' writes start).
            stack.push_async_callback(snapshots.flush, settings.redis_timeout_seconds * 5)
        engine = ChatEngine(
            model,
            metrics=metrics,
            max_running=settings.max_running_requests,
            max_waiting=settings.max_waiting_requests,
            prefill_chunk=settings.prefill_chunk_tokens,
            batch_prompt_tokens=settings.batch_prompt_tokens,
            retry_after=settings.retry_after_seconds,
            max_per_tenant=settings.requests_per_key,
        )
        engine.start()
        stack.callback(engine.stop)
        # The cache outlives no engine: after stop() no turn can put a state back, and clear() frees them.
        state_cache = StateCache(settings.state_cache_bytes, metrics)
        stack.callback(state_cache.clear)
        model_info: dict[str, Any] = {
            "config": model.config.to_dict(),
            "parameters": model.num_parameters(),
            "identity": identity,
            "precision": model.precision,
            "state_dtype": str(model.decode_state_dtype).removeprefix("torch."),
        }
        app.state.services = Services(
            settings=settings,
            metrics=metrics,
            store=store,
            engine=engine,
            state_cache=state_cache,
            chat=ChatService(
                store, engine, state_cache, tokenizer, settings, history, index, quota, snapshots
            ),
            snapshots=snapshots,
            api_keys=ApiKeyAuth(settings.api_keys),
            admin=AdminAuth(settings.admin_token.get_secret_value() if settings.admin_token else None),
            checkpoint=checkpoint,
            model_info=model_info,
            started_at=time.monotonic(),
        )
        _warn_about_open_access(settings)
        redact_secrets_in_server_logs()  # the websocket's ?api_key= would otherwise reach the log
        # Start-up in any order: a Redis that is not up yet (compose does not wait for health, nor does
        # Kubernetes) is waited for in the background while the server answers, not-ready meanwhile.
        waiting = asyncio.create_task(_wait_for_redis(store, _without_password(target.url)))
        stack.push_async_callback(_cancel, waiting)
        logger.info(
            "serving %s (%d parameters) on %s in %s (decode state %s); Redis %s",
            checkpoint,
            model_info["parameters"],
            engine.device,
            model_info["precision"],
            model_info["state_dtype"],
            "embedded" if settings.redis_url is None else "Cluster" if target.cluster else "at REDIS_URL",
        )
        yield


async def _wait_for_redis(store: SessionStore, where: str) -> None:
    """PING Redis until it answers, logging when it does not and once it does.

    Readiness pings on every probe and redis-py reconnects on every command, so the service recovers
    without this; the task puts both moments in the log, where an operator looks for them.
    """
    failures = 0
    while True:
        try:
            await store.ping()
        except StoreUnavailable as exc:
            if failures == 0:
                logger.warning(
                    "Redis at %s is not answering yet (%s); /admin/ready reports 503 until it does; "
                    "retrying every %.0f s",
                    where,
                    exc.__cause__ or exc.message,
                    _REDIS_RETRY_SECONDS,
                )
            failures += 1
            await asyncio.sleep(_REDIS_RETRY_SECONDS)
        else:
            if failures:
                logger.info("Redis at %s answers now, after %d failed attempts", where, failures)
            return


async def _cancel(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def _without_password(url: str) -> str:
    """The URL for a log line: a password in it (redis://:secret@host) is replaced by ***."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    return parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":***@", 1)).geturl()


def _warn_about_open_access(settings: Settings) -> None:
    if not settings.api_keys:
        logger.warning("API_KEYS is not set: the chat API is open to anyone who can reach this server")
    if settings.admin_token is None:
        logger.warning("ADMIN_TOKEN is not set: /admin/metrics and /admin/info are open")


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the app; settings come from the environment and `.env` when not given."""
    settings = settings if settings is not None else Settings()
    docs = settings.docs_enabled  # off in production unless ENABLE_DOCS=true
    app = FastAPI(
        title="reformer-chat",
        summary="Long-context chat on a Reformer LM",
        lifespan=_lifespan,
        docs_url="/docs" if docs else None,
        redoc_url="/redoc" if docs else None,
        openapi_url="/openapi.json" if docs else None,
    )
    app.state.settings = settings
    install_error_handlers(app)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(PageSecurityHeaders)
    install_cors(app, settings.cors_allow_origins)  # outermost: even a 413 carries CORS headers
    # Creating routes (a turn, a session) spend the caller's rate-limit budget; see app/ratelimit.py.
    # History reads (GET) spend it too on the routers that serve conversations.
    app.include_router(
        sessions.router, dependencies=[RateLimitDep, ReadRateLimitDep], responses=SESSION_ERRORS
    )
    app.include_router(chat.router, dependencies=[RateLimitDep], responses=CHAT_ERRORS)
    app.include_router(stream.router)
    app.include_router(openai_router, dependencies=[RateLimitDep], responses=OPENAI_ERRORS)
    app.include_router(
        conversations_router, dependencies=[RateLimitDep, ReadRateLimitDep], responses=OPENAI_ERRORS
    )
    app.include_router(responses_router, dependencies=[RateLimitDep], responses=OPENAI_ERRORS)
    app.include_router(admin.router, responses=ADMIN_ERRORS)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    app.add_api_route("/", _chat_page, include_in_schema=False)
    return app


async def _chat_page() -> FileResponse:
    return FileResponse(STATIC_DIR / "index.html")
