"""A conversation as a file: JSON (every field, for programs) or Markdown (for people).

Markdown export writes each message's text as is under a heading per message: the text is the user's and
the model's own, and a Markdown viewer renders it as such (this is a file download, not the page, which
renders replies through its own sanitiser).
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from app.openai.items import item_id
from app.store.history import ConversationInfo
from app.store.sessions import StoredMessage

_SPEAKER = {"user": "User", "assistant": "Assistant", "system": "System"}


def export_json(info: ConversationInfo, messages: Sequence[StoredMessage]) -> str:
    data = {
        "session_id": info.session_id,
        "title": info.title,
        "created_at": info.created_at,
        "updated_at": info.updated_at,
        "metadata": info.metadata,
        "context_tokens": info.context_tokens,
        "messages": [
            {
                "id": item_id(m.seq),
                "role": m.role,
                "content": m.content,
                "created_at": m.created_at,
                **({"finish_reason": m.finish_reason} if m.finish_reason else {}),
            }
            for m in messages
        ],
    }
    return json.dumps(data, ensure_ascii=False, indent=2)


def export_markdown(info: ConversationInfo, messages: Sequence[StoredMessage]) -> str:
    lines = [f"# {info.title or 'Conversation'}", "", f"_Started {info.created_at}_", ""]
    for m in messages:
        note = " (cut short)" if m.finish_reason in ("length", "cancelled") else ""
        lines += [f"## {_SPEAKER.get(m.role, m.role)}{note}", "", m.content, ""]
    return "\n".join(lines)
