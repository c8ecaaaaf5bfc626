"""The JSON the service accepts and returns: REST bodies and websocket frames.

Static bounds live here, so malformed input is a 422 before any Redis or model work; bounds that depend
on Settings (MAX_MESSAGE_CHARS, MAX_NEW_TOKENS) are checked by ChatService.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

MAX_STOP_STRINGS = 4
MAX_STOP_CHARS = 64
MAX_LOGIT_BIAS_ENTRIES = 300


def stop_strings(value: str | list[str] | None) -> list[str] | None:
    """`stop` as a list, refused (ValueError) beyond MAX_STOP_STRINGS non-empty strings of MAX_STOP_CHARS.

    Shared by SamplingFields and the OpenAI request (app/openai/protocol.py): one bound, one message.
    """
    if value is None:
        return None
    stops = [value] if isinstance(value, str) else value
    if len(stops) > MAX_STOP_STRINGS or any(not s or len(s) > MAX_STOP_CHARS for s in stops):
        raise ValueError(
            f"stop takes at most {MAX_STOP_STRINGS} non-empty strings of at most {MAX_STOP_CHARS} "
            "characters each"
        )
    return stops


def check_logit_bias(value: dict[int, float] | None) -> dict[int, float] | None:
    """OpenAI's `logit_bias` bounds: at most MAX_LOGIT_BIAS_ENTRIES non-negative token ids, biases in
    [-100, 100] (ValueError otherwise). Shared by SamplingFields and the OpenAI request."""
    if value is None:
        return None
    if len(value) > MAX_LOGIT_BIAS_ENTRIES or any(k < 0 for k in value):
        raise ValueError(
            f"logit_bias takes at most {MAX_LOGIT_BIAS_ENTRIES} entries keyed by non-negative token ids"
        )
    if any(not -100 <= bias <= 100 for bias in value.values()):
        raise ValueError("logit_bias values must be between -100 and 100")
    return value


# The validated field types, for SamplingFields here and the OpenAI request.
StopStrings = Annotated[str | list[str] | None, AfterValidator(stop_strings)]
LogitBias = Annotated[dict[int, float] | None, AfterValidator(check_logit_bias)]


class SamplingFields(BaseModel):
    """Per-turn sampling; a field left out takes the server's default (DEFAULT_* settings)."""

    # Unknown fields are refused, so a typo ("temprature") is a 422, not a silently ignored setting.
    model_config = ConfigDict(extra="forbid")

    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=5)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=0)
    repetition_penalty: float | None = Field(default=None, gt=0, le=10)
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    stop: StopStrings = None
    # OpenAI's logit_bias: token id -> bias in [-100, 100] added to that token's logit.
    logit_bias: Annotated[
        dict[int, Annotated[float, Field(ge=-100, le=100)]] | None, AfterValidator(check_logit_bias)
    ] = None


class MessageRequest(SamplingFields):
    """POST /v1/sessions/{id}/messages."""

    content: str


class MessageFrame(SamplingFields):
    """Websocket client frame: send a message (same fields as the REST body)."""

    type: Literal["message"]
    content: str


class CancelFrame(BaseModel):
    """Websocket client frame: stop the reply being generated."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["cancel"]


ClientFrame = Annotated[MessageFrame | CancelFrame, Field(discriminator="type")]


class SessionCreated(BaseModel):
    session_id: str
    created_at: str


class MessageOut(BaseModel):
    # The message's id, shared with the Conversations API (msg_...); absent on a reply not yet stored.
    id: str | None = None
    role: Literal["system", "user", "assistant"]
    content: str
    created_at: str
    finish_reason: Literal["stop", "length", "cancelled"] | None = None


class SessionOut(BaseModel):
    session_id: str
    created_at: str
    messages: list[MessageOut]
    context_tokens: int


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    context_tokens: int


class ReplyOut(BaseModel):
    message: MessageOut
    usage: Usage


class SessionSummary(BaseModel):
    """One conversation in the caller's list."""

    session_id: str
    title: str  # the start of its first user message ("" until there is one)
    created_at: str
    updated_at: str
    message_count: int
    context_tokens: int


class SessionList(BaseModel):
    sessions: list[SessionSummary]  # newest (last updated) first
    next_cursor: str | None  # pass as ?cursor= for the next page; null on the last page


class MessagePage(BaseModel):
    messages: list[MessageOut]  # oldest first
    has_more: bool  # older messages exist: ask again with ?before=<messages[0].id>
    context_tokens: int  # token ids the whole conversation holds
