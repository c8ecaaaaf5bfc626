"""The JSON of the Conversations API: request bodies (read loosely, checked in serving.py so a 400 can
name the offending element) and the objects returned, in OpenAI's field names."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

MAX_ITEMS_PER_REQUEST = 20  # OpenAI's limit on items added by one create call


class ConversationCreateRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    items: list[Any] | None = Field(default=None, max_length=MAX_ITEMS_PER_REQUEST)
    metadata: Any = None


class ConversationUpdateRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    metadata: Any


class ItemCreateRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    items: list[Any] = Field(min_length=1, max_length=MAX_ITEMS_PER_REQUEST)


class Conversation(BaseModel):
    id: str
    object: Literal["conversation"] = "conversation"
    created_at: int
    metadata: dict[str, str]


class ConversationDeleted(BaseModel):
    id: str
    object: Literal["conversation.deleted"] = "conversation.deleted"
    deleted: bool = True


class ItemList(BaseModel):
    """A page of items. `first_id`/`last_id` are null on an empty page (the SDK then stops paging)."""

    object: Literal["list"] = "list"
    data: list[dict[str, Any]]
    first_id: str | None
    last_id: str | None
    has_more: bool
