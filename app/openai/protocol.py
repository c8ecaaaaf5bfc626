"""The JSON of the OpenAI-compatible surface: the Chat Completions request, its responses, the model list.

Requests follow OpenAI's field names and ranges and ignore fields this server has no use for (so any
OpenAI client can talk to it), but refuse settings it cannot honour (`n` > 1, tools, logprobs, penalties
other than ours) with a 400 naming the field, rather than quietly answering something else. Two extra
fields, `top_k` and `repetition_penalty`, expose this server's own sampling knobs (as vLLM does; send them
with the SDK's `extra_body`).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from app.schemas import LogitBias, StopStrings

# OpenAI's "developer" role is its newer name for "system"; the chat template has a system role.
Role = Literal["system", "developer", "user", "assistant"]


class ChatMessage(BaseModel):
    """One message of `messages`; content is a string or a list of text parts (OpenAI allows both)."""

    model_config = ConfigDict(extra="ignore")

    role: Role
    content: str | list[dict[str, Any]] | None = None
    # OpenAI's participant name: accepted and ignored (the chat template has no place for it).
    name: str | None = None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    """POST /v1/chat/completions."""

    model_config = ConfigDict(extra="ignore")

    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    # max_completion_tokens is OpenAI's current name; max_tokens the older one. Either caps the reply.
    max_completion_tokens: int | None = Field(default=None, ge=1)
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    stop: StopStrings = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    user: str | None = None
    logit_bias: LogitBias = None
    # Refused when set to something this server does not do; accepted at their "off" values.
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[dict[str, Any]] | None = None
    functions: list[dict[str, Any]] | None = None
    response_format: dict[str, Any] | None = None
    # This server's own sampling knobs (vLLM names them the same).
    top_k: int | None = Field(default=None, ge=0)
    repetition_penalty: float | None = Field(default=None, gt=0, le=10)

    @field_validator("n")
    @classmethod
    def _one_choice(cls, value: int) -> int:
        if value != 1:
            raise ValueError(f"n={value} is not supported: this server returns one choice; send n=1")
        return value

    @property
    def reply_limit(self) -> tuple[str, int] | None:
        """(field name, value) of the requested reply cap, max_completion_tokens winning over max_tokens."""
        if self.max_completion_tokens is not None:
            return "max_completion_tokens", self.max_completion_tokens
        if self.max_tokens is not None:
            return "max_tokens", self.max_tokens
        return None

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionUsage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str
    refusal: None = None


class Choice(BaseModel):
    index: int = 0
    message: AssistantMessage
    logprobs: None = None
    finish_reason: Literal["stop", "length"]


class ChatCompletion(BaseModel):
    """The non-streaming response; streaming sends `chat.completion.chunk` objects (see routes/openai.py)."""

    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: CompletionUsage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "reformer-chat"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
