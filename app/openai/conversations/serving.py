"""Conversations API requests -> ChatService calls on sessions, and the results in OpenAI's shapes.

A conversation is a session: created listed (it appears in GET /v1/sessions and the page), its items are
the session's messages, and adding items appends their token ids like a turn does, so the next response
on the conversation starts from a state that has seen them. Deleting an item cuts its text and token ids
out and drops the cached decode state (app/chat.py), so the next reply never depends on removed text.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

from app.chat import ChatService, InputMessage
from app.errors import InvalidRequest, SessionNotFound
from app.openai.conversations.protocol import Conversation, ItemList
from app.openai.errors import OpenAIInvalidRequest
from app.openai.items import (
    NotFound,
    check_metadata,
    conversation_id,
    input_messages,
    message_item,
    seq_of,
    session_of,
    unix_seconds,
)
from app.store.history import MessageNotFound, Order


@asynccontextmanager
async def conversation_errors(conv_id: str) -> AsyncIterator[None]:
    """Our not-found errors, said the way OpenAI says them, about the ids the client sent."""
    try:
        yield
    except MessageNotFound as exc:
        raise NotFound(f"Item not found in conversation {conv_id!r}: {exc.message}") from exc
    except SessionNotFound as exc:
        raise NotFound(f"Conversation with id {conv_id[:80]!r} not found.") from exc


def checked_messages(chat: ChatService, value: Any, param: str) -> list[InputMessage]:
    """Input items as (role, text), each text held to the server's message limits (400 naming it)."""
    messages = input_messages(value, param)
    for i, (_, text) in enumerate(messages):
        try:
            chat.check_content(text)
        except InvalidRequest as exc:
            where = param if isinstance(value, str) else f"{param}[{i}].content"
            raise OpenAIInvalidRequest(f"{where}: {exc.message}", where) from exc
    return messages


class ConversationsServing:
    def __init__(self, chat: ChatService) -> None:
        self.chat = chat

    async def _conversation(
        self, owner: str, session_id: str, metadata: dict[str, str] | None = None
    ) -> Conversation:
        info = await self.chat.info(owner, session_id, metadata=metadata)
        return Conversation(
            id=conversation_id(session_id), created_at=unix_seconds(info.created_at), metadata=info.metadata
        )

    async def create(self, owner: str, items: Sequence[Any] | None, metadata: Any) -> Conversation:
        meta = check_metadata(metadata)
        messages = checked_messages(self.chat, list(items), "items") if items else []
        record = await self.chat.create_session(owner, metadata=meta)
        if messages:
            await self.chat.append_messages(owner, record.session_id, messages)
        return Conversation(
            id=conversation_id(record.session_id), created_at=unix_seconds(record.created_at), metadata=meta
        )

    async def retrieve(self, owner: str, conv_id: str) -> Conversation:
        async with conversation_errors(conv_id):
            return await self._conversation(owner, session_of(conv_id))

    async def update(self, owner: str, conv_id: str, metadata: Any) -> Conversation:
        meta = check_metadata(metadata)
        async with conversation_errors(conv_id):
            return await self._conversation(owner, session_of(conv_id), meta)

    async def delete(self, owner: str, conv_id: str) -> None:
        async with conversation_errors(conv_id):
            await self.chat.delete_session(owner, session_of(conv_id))

    async def list_items(
        self, owner: str, conv_id: str, *, after: str | None, limit: int, order: Order
    ) -> ItemList:
        async with conversation_errors(conv_id):
            session_id = session_of(conv_id)
            cursor = seq_of(after, "after") if after else 0
            page = await self.chat.history.page(session_id, owner, cursor=cursor, limit=limit, order=order)
        await self.chat.index.touched(owner)
        data = [message_item(m) for m in page.messages]
        return ItemList(
            data=data,
            first_id=data[0]["id"] if data else None,
            last_id=data[-1]["id"] if data else None,
            has_more=page.has_more,
        )

    async def create_items(self, owner: str, conv_id: str, items: Sequence[Any]) -> ItemList:
        messages = checked_messages(self.chat, list(items), "items")
        async with conversation_errors(conv_id):
            stored = await self.chat.append_messages(owner, session_of(conv_id), messages)
        data = [message_item(m) for m in stored]
        return ItemList(data=data, first_id=data[0]["id"], last_id=data[-1]["id"], has_more=False)

    async def retrieve_item(self, owner: str, conv_id: str, item: str) -> dict[str, Any]:
        async with conversation_errors(conv_id):
            message = await self.chat.history.message(session_of(conv_id), owner, seq_of(item))
        return message_item(message)

    async def delete_item(self, owner: str, conv_id: str, item: str) -> Conversation:
        async with conversation_errors(conv_id):
            session_id = session_of(conv_id)
            await self.chat.remove_message(owner, session_id, seq_of(item))
            return await self._conversation(owner, session_id)
