"""Fixtures for the end-to-end tests: see tests/app/fixtures.py."""

from tests.app.fixtures import redis_prefix, tiny_checkpoint, tiny_model, tokenizer  # noqa: F401
