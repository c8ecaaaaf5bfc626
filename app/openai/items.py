"""What the Conversations and Responses APIs share: OpenAI-style ids for our records, message items in
OpenAI's JSON, and input items (a string, or message items) read into (role, text) pairs.

Ids are ours with OpenAI's prefixes, so no lookup table is needed and nothing can drift:

    conv_<session id>                  a conversation is a session (the same one REST and the page see)
    msg_<seq, 8 hex digits>            a message, by its number within its conversation
    resp_<reply seq, 8 hex><session>   a stored response: the session that holds it and its reply's number

An id of the right shape that names nothing, or another key's conversation, is a 404, as in the rest of
the API.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any

from app.errors import ServiceError
from app.openai.errors import OpenAIInvalidRequest
from app.store.sessions import Role, StoredMessage

_SESSION_ID = re.compile(r"[A-Za-z0-9_-]{16,64}")
_SEQ_HEX = 8
MAX_METADATA_KEYS, MAX_METADATA_KEY, MAX_METADATA_VALUE = 16, 64, 512

# OpenAI roles -> the chat template's. "developer" is OpenAI's newer name for "system".
_ROLES: dict[str, Role] = {
    "user": "user",
    "assistant": "assistant",
    "system": "system",
    "developer": "system",
}
_TEXT_PARTS = ("input_text", "output_text", "text")


class NotFound(ServiceError):
    """A conversation, item or response that does not exist for this key (OpenAI says "not found")."""

    status, code = 404, "not_found"

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


def conversation_id(session_id: str) -> str:
    return f"conv_{session_id}"


def session_of(conv_id: str) -> str:
    session_id = conv_id.removeprefix("conv_")
    if session_id == conv_id or not _SESSION_ID.fullmatch(session_id):
        raise NotFound(f"Conversation with id {conv_id[:80]!r} not found.")
    return session_id


def item_id(seq: int) -> str:
    return f"msg_{seq:0{_SEQ_HEX}x}"


def seq_of(item: str, param: str = "item_id") -> int:
    """The message number in a `msg_` id; a malformed id names no item (404)."""
    digits = item.removeprefix("msg_")
    if digits == item or not re.fullmatch(r"[0-9a-f]{8,16}", digits):
        raise NotFound(f"Item with id {item[:80]!r} not found.", param)
    return int(digits, 16)


def response_id(session_id: str, reply_seq: int) -> str:
    return f"resp_{reply_seq:0{_SEQ_HEX}x}{session_id}"


def parse_response_id(resp_id: str, param: str = "response_id") -> tuple[str, int]:
    """(session id, reply seq) of a stored response id; 404 when it cannot be one."""
    body = resp_id.removeprefix("resp_")
    seq, session_id = body[:_SEQ_HEX], body[_SEQ_HEX:]
    if body == resp_id or not re.fullmatch(r"[0-9a-f]{8}", seq) or not _SESSION_ID.fullmatch(session_id):
        raise NotFound(f"Response with id {resp_id[:80]!r} not found.", param)
    return session_id, int(seq, 16)


def unix_seconds(iso: str) -> int:
    """The store's ISO 8601 UTC time as OpenAI's `created_at` (Unix seconds)."""
    return int(datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp())


def message_item(message: StoredMessage) -> dict[str, Any]:
    """A stored message as OpenAI's message item. A reply cut short (length, cancelled) is incomplete."""
    if message.role == "assistant":
        content: dict[str, Any] = {
            "type": "output_text",
            "text": message.content,
            "annotations": [],
            "logprobs": [],
        }
    else:
        content = {"type": "input_text", "text": message.content}
    status = "completed" if message.finish_reason in (None, "stop") else "incomplete"
    return {
        "type": "message",
        "id": item_id(message.seq),
        "status": status,
        "role": message.role,
        "content": [content],
    }


def check_metadata(metadata: Any, param: str = "metadata") -> dict[str, str]:
    """OpenAI's metadata rules: at most 16 string pairs, keys <= 64 and values <= 512 characters."""
    if metadata is None:
        return {}
    if not isinstance(metadata, dict) or len(metadata) > MAX_METADATA_KEYS:
        raise OpenAIInvalidRequest(f"{param} must be an object of at most {MAX_METADATA_KEYS} pairs", param)
    for key, value in metadata.items():
        if not isinstance(value, str) or len(key) > MAX_METADATA_KEY or len(value) > MAX_METADATA_VALUE:
            raise OpenAIInvalidRequest(
                f"{param}[{key[:64]!r}] must be a string of at most {MAX_METADATA_VALUE} characters, under "
                f"a key of at most {MAX_METADATA_KEY}",
                param,
            )
    return dict(metadata)


def input_messages(value: Any, param: str) -> list[tuple[Role, str]]:
    """A Responses `input` or a Conversations `items` list as (role, text) pairs, refusing (400, naming
    the offending element) every item or content part this text-only server cannot take."""
    if isinstance(value, str):
        return [("user", value)]
    if not isinstance(value, list):
        raise OpenAIInvalidRequest(f"{param} must be a string or a list of message items", param)
    return [_message(item, f"{param}[{i}]") for i, item in enumerate(value)]


def _message(item: Any, where: str) -> tuple[Role, str]:
    if not isinstance(item, dict):
        raise OpenAIInvalidRequest(f"{where} must be a message item object", where)
    kind = item.get("type", "message")
    if kind != "message":
        raise OpenAIInvalidRequest(
            f"{where} is a {kind!r} item: this server takes only message items (no tools, reasoning or "
            "files)",
            f"{where}.type",
        )
    role = _ROLES.get(str(item.get("role")))
    if role is None:
        raise OpenAIInvalidRequest(
            f"{where}.role must be one of {', '.join(_ROLES)}, got {item.get('role')!r}", f"{where}.role"
        )
    content = item.get("content")
    if isinstance(content, str):
        return role, content
    if not isinstance(content, list) or not content:
        raise OpenAIInvalidRequest(
            f"{where}.content must be a string or a list of text parts", f"{where}.content"
        )
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in _TEXT_PARTS or not isinstance(part.get("text"), str):
            raise OpenAIInvalidRequest(
                f"{where}.content[{j}] is a {kind!r} part: this server reads only text parts "
                "(input_text, output_text); images, files and audio are not supported",
                f"{where}.content[{j}]",
            )
        texts.append(part["text"])
    return role, "\n".join(texts)
