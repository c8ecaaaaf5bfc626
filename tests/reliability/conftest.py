"""Fixtures: the tiny checkpoint and CI's Redis prefix of tests/app/fixtures.py."""

from tests.app.fixtures import redis_prefix, tiny_checkpoint, tiny_model, tokenizer  # noqa: F401
