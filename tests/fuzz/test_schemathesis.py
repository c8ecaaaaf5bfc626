"""Schemathesis against the live server's own OpenAPI schema: every route, with and without valid auth.

Requests are generated from /openapi.json (schema-valid ones, and schema-violating ones where an
operation has something to violate) and sent to a real uvicorn on loopback with CI's Redis and the tiny
model. Every response must be a non-5xx whose status, content type, headers and body the schema
documents, and a request the schema forbids must be refused with a 4xx. Half of the valid-auth cases
aim at a real session of the key, so fuzzed turns reach the lock, the model and Redis.

Bounded: a fixed example count per operation, derandomized (the same requests every run, so CI is
reproducible), no shrinking. Failures are collected over the whole run and reported together.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core.failures import FailureGroup
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.support import LiveServerFactory

KEY, ADMIN = "fuzz-key", "fuzz-admin"
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    negative_data_rejection,
]
EXAMPLES = {GenerationMode.POSITIVE: 90, GenerationMode.NEGATIVE: 50}
MIN_REQUESTS_PER_TEST = 500
# A refusal of schema-violating input is any of these; 413 included (an oversized body is refused unread).
REJECTIONS = ["400", "401", "404", "409", "413", "422", "429"]


@dataclass
class Live:
    url: str
    schema: Any

    def new_session(self) -> str:
        """A real session of KEY, for cases that should get past the 404."""
        created = httpx.post(f"{self.url}/v1/sessions", headers={"Authorization": f"Bearer {KEY}"})
        return created.json()["session_id"]


@dataclass
class Tally:
    requests: int = 0
    per_operation: dict[str, int] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)  # distinct problems, in the order found


@pytest.fixture(scope="module")
def live(live_server: LiveServerFactory) -> Iterator[Live]:
    with live_server(api_keys=[KEY], admin_token=ADMIN, max_new_tokens=8, rate_limit_per_minute=0) as server:
        url = server.url
        config = schemathesis.Config.from_dict(
            {"checks": {"negative_data_rejection": {"expected-statuses": REJECTIONS}}}
        )
        yield Live(url, schemathesis.openapi.from_url(f"{url}/openapi.json", config=config))


def operations(live: Live) -> list[Any]:
    """Every operation of the schema: all HTTP routes but the browser page and its static files."""
    ops = [result.ok() for result in live.schema.get_all_operations()]
    paths = {op.path for op in ops}
    assert {"/v1/sessions", "/v1/sessions/{session_id}/messages", "/admin/metrics"} <= paths
    return ops


def assert_covered(ops: list[Any], tally: Tally) -> None:
    fuzzed = {label.split(" [")[0] for label in tally.per_operation}
    assert fuzzed == {f"{op.method.upper()} {op.path}" for op in ops}


def fuzz(
    live: Live, operation: Any, mode: GenerationMode, headers: dict[str, str] | None, tally: Tally
) -> None:
    """Send EXAMPLES[mode] generated requests for one operation and validate each response."""
    label = f"{operation.method.upper()} {operation.path} [{mode.value}, {'auth' if headers else 'no auth'}]"
    strategies = [operation.as_strategy(generation_mode=mode, headers=headers)]
    if headers and "session_id" in operation.path:
        strategies.append(
            operation.as_strategy(
                generation_mode=mode, headers=headers, path_parameters={"session_id": live.new_session()}
            )
        )
    session = requests.Session()
    session.trust_env = False  # loopback only: no proxy from the environment

    @settings(
        max_examples=EXAMPLES[mode],
        derandomize=True,
        database=None,
        deadline=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(case=st.one_of(strategies))
    def run(case: Any) -> None:
        response = case.call(base_url=live.url, session=session)
        tally.requests += 1
        tally.per_operation[label] = tally.per_operation.get(label, 0) + 1
        try:
            case.validate_response(response, checks=CHECKS)
        except FailureGroup as group:
            for failure in group.exceptions:
                problem = f"{label}: {failure.title} (HTTP {response.status_code}): {failure.message}"
                if problem not in tally.failures:
                    tally.failures.append(problem)

    try:
        run()
    except Unsatisfiable:
        if mode is GenerationMode.POSITIVE:
            raise


def test_every_route_with_valid_credentials(live: Live) -> None:
    tally = Tally()
    ops = operations(live)
    for operation in ops:
        token = ADMIN if operation.path.startswith("/admin") else KEY
        for mode in GenerationMode:
            fuzz(live, operation, mode, {"Authorization": f"Bearer {token}"}, tally)
    assert not tally.failures, "\n\n".join(tally.failures[:10])
    assert tally.requests >= MIN_REQUESTS_PER_TEST, tally.per_operation
    assert_covered(ops, tally)


def test_every_route_without_valid_credentials(live: Live) -> None:
    """The Authorization header is generated like any other parameter: absent, another scheme, or a
    key the server does not know."""
    tally = Tally()
    ops = operations(live)
    for operation in ops:
        for mode in GenerationMode:
            fuzz(live, operation, mode, None, tally)
    assert not tally.failures, "\n\n".join(tally.failures[:10])
    assert tally.requests >= MIN_REQUESTS_PER_TEST, tally.per_operation
    assert_covered(ops, tally)
