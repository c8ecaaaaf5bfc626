"""The JSON of the Responses API: the create request (OpenAI's field names; what this text-only server
cannot do is refused in serving.py with a 400 naming the field) and the Response object it returns."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class ResponseCreateRequest(BaseModel):
    """POST /v1/responses."""

    model_config = ConfigDict(extra="ignore")

    model: str
    input: str | list[Any]
    instructions: str | None = None
    conversation: str | dict[str, Any] | None = None
    previous_response_id: str | None = None
    max_output_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    store: bool = True
    stream: bool = False
    metadata: Any = None
    truncation: str | None = None  # "auto" or "disabled": the decode state is bounded either way
    user: str | None = None
    parallel_tool_calls: bool | None = None
    # This server's own sampling knobs (send them with the SDK's extra_body), as on chat completions.
    top_k: int | None = Field(default=None, ge=0)
    repetition_penalty: float | None = Field(default=None, gt=0, le=10)
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    logit_bias: dict[int, float] | None = None  # as on chat completions (not an OpenAI Responses field)
    # Refused when set (serving.py): this server generates text and nothing else.
    tools: list[Any] | None = None
    tool_choice: Any = None
    reasoning: Any = None
    background: bool | None = None
    text: dict[str, Any] | None = None
    include: list[Any] | None = None
    prompt: Any = None
    top_logprobs: int | None = None
    max_tool_calls: int | None = None


def conversation_param(value: str | dict[str, Any] | None) -> str | None:
    """`conversation` is an id or `{"id": ...}`."""
    if isinstance(value, dict):
        conv = value.get("id")
        return conv if isinstance(conv, str) else ""
    return value
