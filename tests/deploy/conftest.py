"""Fixtures for the deployment tests: the shared ones (tests/app/fixtures.py) and a real Redis Cluster."""

from tests.app.fixtures import redis_prefix, tiny_checkpoint, tiny_model, tokenizer  # noqa: F401
from tests.deploy.redis_cluster import redis_cluster  # noqa: F401
