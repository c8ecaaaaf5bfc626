"""Fixtures for the deployment tests (the shared ones are in tests/conftest.py): a real Redis Cluster, and
the HTTP routes the app really serves (what the compose file and Dockerfile probe must exist)."""

import pytest

from app.config import Settings
from app.factory import create_app
from tests.deploy.redis_cluster import redis_cluster  # noqa: F401


@pytest.fixture(scope="session")
def get_routes() -> set[str]:
    """Paths answering GET in the app's OpenAPI schema (building the app loads no model: no lifespan)."""
    paths = create_app(Settings(_env_file=None)).openapi()["paths"]
    return {path for path, methods in paths.items() if "get" in methods}
