"""The OpenAI request schema and error shape, without a server: what is accepted, ignored and refused."""

from __future__ import annotations

import json

import pytest
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from starlette.exceptions import HTTPException

from app.errors import InvalidRequest, Overloaded, SessionBusy, StoreUnavailable, Unauthorized
from app.openai.errors import ModelNotFound, OpenAIInvalidRequest, openai_error_response
from app.openai.protocol import ChatCompletionRequest, ChatMessage
from app.openai.serving import message_text

BASE = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def error_of(exc: Exception) -> tuple[int, dict[str, object], dict[str, str]]:
    response = openai_error_response(exc)
    return response.status_code, json.loads(response.body)["error"], dict(response.headers)


def test_unknown_fields_are_ignored_and_known_ones_parsed() -> None:
    request = ChatCompletionRequest.model_validate(
        {
            **BASE,
            "parallel_tool_calls": True,  # unknown to this server: ignored
            "metadata": {"a": "b"},
            "logit_bias": {"17": -100},  # OpenAI sends token ids as strings
            "stream_options": {"include_usage": True, "future_option": 1},
            "messages": [
                {"role": "developer", "content": "be brief", "name": "x"},
                {"role": "user", "content": "hi"},
            ],
        }
    )
    assert request.logit_bias == {17: -100}
    assert request.include_usage and not request.stream
    assert request.messages[0].role == "developer"


def test_max_completion_tokens_wins_over_max_tokens() -> None:
    assert ChatCompletionRequest.model_validate(BASE).reply_limit is None
    assert ChatCompletionRequest.model_validate({**BASE, "max_tokens": 5}).reply_limit == ("max_tokens", 5)
    both = ChatCompletionRequest.model_validate({**BASE, "max_tokens": 5, "max_completion_tokens": 7})
    assert both.reply_limit == ("max_completion_tokens", 7)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("n", 2),
        ("temperature", 2.5),
        ("top_p", 0),
        ("stop", ["a", "b", "c", "d", "e"]),
        ("stop", [""]),
        ("logit_bias", {"5": 101}),
        ("max_tokens", 0),
        ("messages", []),
    ],
)
def test_out_of_range_values_are_refused(field: str, value: object) -> None:
    with pytest.raises(ValidationError) as refused:
        ChatCompletionRequest.model_validate({**BASE, field: value})
    assert refused.value.errors()[0]["loc"][0] == field


def test_tool_and_function_roles_are_refused() -> None:
    with pytest.raises(ValidationError):
        ChatMessage.model_validate({"role": "tool", "content": "42", "tool_call_id": "t"})


def test_text_parts_are_joined_and_other_parts_refused() -> None:
    parts = ChatMessage.model_validate(
        {"role": "user", "content": [{"type": "text", "text": "one"}, {"type": "text", "text": "two"}]}
    )
    assert message_text(parts, 0) == "one\ntwo"
    image = ChatMessage.model_validate(
        {"role": "user", "content": [{"type": "text", "text": "see"}, {"type": "image_url", "image_url": {}}]}
    )
    with pytest.raises(OpenAIInvalidRequest) as refused:
        message_text(image, 3)
    assert refused.value.param == "messages[3].content[1]" and "image_url" in refused.value.message
    with pytest.raises(OpenAIInvalidRequest):
        message_text(ChatMessage.model_validate({"role": "assistant", "content": None}), 0)


def test_service_errors_take_openai_shape_and_status() -> None:
    status, error, _ = error_of(InvalidRequest("content is empty"))
    assert status == 400  # OpenAI's status for an invalid request, not our 422
    assert error == {
        "message": "content is empty",
        "type": "invalid_request_error",
        "param": None,
        "code": "invalid_request",
    }
    status, error, headers = error_of(Unauthorized())
    assert (status, error["type"], error["code"]) == (401, "invalid_request_error", "invalid_api_key")
    assert headers["www-authenticate"] == "Bearer"
    status, error, headers = error_of(Overloaded("busy", retry_after=3))
    assert (status, error["type"], error["code"], headers["retry-after"]) == (
        429,
        "rate_limit_error",
        "overloaded",
        "3",
    )
    status, error, _ = error_of(StoreUnavailable("redis down", retry_after=1))
    assert (status, error["type"]) == (503, "server_error")
    status, error, _ = error_of(SessionBusy("abc"))
    assert (status, error["code"]) == (409, "session_busy")
    status, error, _ = error_of(ModelNotFound("gpt-4", "tiny"))
    assert (status, error["code"], error["param"]) == (404, "model_not_found", "model")
    assert "'tiny'" in str(error["message"])
    status, error, _ = error_of(OpenAIInvalidRequest("no tools here", param="tools"))
    assert (status, error["param"]) == (400, "tools")
    status, error, _ = error_of(HTTPException(413, "too big"))
    assert (status, error["message"]) == (413, "too big")


def test_validation_errors_name_the_field_as_openai_does() -> None:
    with pytest.raises(ValidationError) as invalid:
        ChatCompletionRequest.model_validate(
            {"model": "m", "messages": [{"role": "user", "content": "a"}, {"role": "robot", "content": "b"}]}
        )
    wrapped = RequestValidationError([{**e, "loc": ("body", *e["loc"])} for e in invalid.value.errors()])
    status, error, _ = error_of(wrapped)
    assert status == 400
    assert error["param"] == "messages[1].role"
    assert str(error["message"]).startswith("messages[1].role: ")


def test_unexpected_errors_are_a_500_that_leaks_nothing() -> None:
    status, error, _ = error_of(RuntimeError("secret internals"))
    assert status == 500 and error["type"] == "server_error"
    assert "secret" not in str(error["message"])
