"""FastAPI dependencies as Annotated aliases, so route signatures say what they need and nothing more."""

from __future__ import annotations

import re
from typing import Annotated

from fastapi import Depends, Header
from starlette.requests import HTTPConnection

from app.auth import bearer_token
from app.chat import ChatService
from app.errors import SessionNotFound
from app.services import Services

# What new_session_id() produces (URL-safe base64), with room for other generators; anything else cannot
# be a session, and must never reach a Redis key name.
_SESSION_ID = re.compile(r"[A-Za-z0-9_-]{16,64}")


def get_services(connection: HTTPConnection) -> Services:
    return connection.app.state.services


ServicesDep = Annotated[Services, Depends(get_services)]


def get_chat(services: ServicesDep) -> ChatService:
    return services.chat


ChatDep = Annotated[ChatService, Depends(get_chat)]


def get_owner(services: ServicesDep, authorization: Annotated[str | None, Header()] = None) -> str:
    """The caller's owner id from its Bearer API key (401 when keys are required and it has none)."""
    return services.api_keys.owner(bearer_token(authorization))


OwnerDep = Annotated[str, Depends(get_owner)]


def require_admin(services: ServicesDep, authorization: Annotated[str | None, Header()] = None) -> None:
    services.admin.check(bearer_token(authorization))


AdminDep = Annotated[None, Depends(require_admin)]


def valid_session_id(session_id: str) -> str:
    """A path session id; a malformed one is simply a session that does not exist (404)."""
    if not _SESSION_ID.fullmatch(session_id):
        raise SessionNotFound(session_id[:64])
    return session_id


SessionIdDep = Annotated[str, Depends(valid_session_id)]
