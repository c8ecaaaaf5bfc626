"""The JSON the service accepts and returns: REST bodies and websocket frames.

Static bounds live here, so malformed input is a 422 before any Redis or model work; bounds that depend
on Settings (MAX_MESSAGE_CHARS, MAX_NEW_TOKENS) are checked by ChatService.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_STOP_STRINGS = 4
MAX_STOP_CHARS = 64
MAX_LOGIT_BIAS_ENTRIES = 300


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
    stop: str | list[str] | None = None
    # OpenAI's logit_bias: token id -> bias in [-100, 100] added to that token's logit.
    logit_bias: dict[int, Annotated[float, Field(ge=-100, le=100)]] | None = None

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, value: str | list[str] | None) -> list[str] | None:
        if value is None:
            return None
        stops = [value] if isinstance(value, str) else value
        if len(stops) > MAX_STOP_STRINGS or any(not s or len(s) > MAX_STOP_CHARS for s in stops):
            raise ValueError(
                f"stop takes at most {MAX_STOP_STRINGS} non-empty strings of at most {MAX_STOP_CHARS} "
                "characters each"
            )
        return stops

    @field_validator("logit_bias")
    @classmethod
    def _check_logit_bias(cls, value: dict[int, float] | None) -> dict[int, float] | None:
        if value is not None and (len(value) > MAX_LOGIT_BIAS_ENTRIES or any(k < 0 for k in value)):
            raise ValueError(
                f"logit_bias takes at most {MAX_LOGIT_BIAS_ENTRIES} entries keyed by non-negative token ids"
            )
        return value


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
    role: Literal["user", "assistant"]
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
