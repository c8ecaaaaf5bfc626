"""docker-compose.yml checked against the code, since no Docker engine runs on our machines.

What would only fail at `docker compose up` on someone's server is checked here: the services and how
they find each other, every variable the compose file sets is a real setting with a valid value, the
healthcheck probes a route the app serves on the port it listens on, the app waits for a healthy Redis,
Redis persists to a named volume with AOF, and the GPU reservation can be removed for CPU-only hosts
by the override file the README names.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from app.config import Settings

REPO = Path(__file__).resolve().parents[2]
COMPOSE = REPO / "docker-compose.yml"
CPU_OVERRIDE = REPO / "docker-compose.cpu.yml"


class _Reset:
    """Compose's `!reset` tag: the override file removes the attribute from the merged model."""


class ComposeLoader(yaml.SafeLoader):
    """SafeLoader plus the one custom tag our compose files use."""


ComposeLoader.add_constructor("!reset", lambda loader, node: _Reset())


def load(path: Path) -> dict[str, Any]:
    return yaml.load(path.read_text(), Loader=ComposeLoader)


def merge(base: Any, override: Any) -> Any:
    """Compose's merge rules, as far as our files use them: mappings merge key by key, `!reset`
    removes, sequences append, anything else is replaced."""
    if isinstance(base, dict) and isinstance(override, dict):
        merged = dict(base)
        for key, value in override.items():
            if isinstance(value, _Reset):
                merged.pop(key, None)
            else:
                merged[key] = merge(base[key], value) if key in base else value
        return merged
    if isinstance(base, list) and isinstance(override, list):
        return base + override
    return override


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return load(COMPOSE)


def environment(service: dict[str, Any]) -> dict[str, str]:
    """A service's `environment`, mapping or list form, as strings (as the container sees them)."""
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {key: str(value) for key, value in env.items()}


def test_the_services_are_redis_and_the_app(compose: dict[str, Any]) -> None:
    assert set(compose["services"]) == {"redis", "app"}
    assert re.fullmatch(r"redis:7(\.\d+)*(-\w+)?", compose["services"]["redis"]["image"])
    build = compose["services"]["app"]["build"]
    assert build["context"] == "." and (REPO / build.get("dockerfile", "Dockerfile")).is_file()


def test_redis_appends_every_write_to_a_named_volume(compose: dict[str, Any]) -> None:
    redis = compose["services"]["redis"]
    command = [str(part) for part in redis["command"]]
    flags = dict(zip(command[1::2], command[2::2], strict=True))
    assert command[0] == "redis-server"
    assert flags["--appendonly"] == "yes"
    assert flags["--appendfsync"] == "always"  # README: nothing acknowledged is lost
    # Evicting keys would silently drop conversations; at a memory cap writes must fail instead.
    assert flags.get("--maxmemory-policy", "noeviction") == "noeviction"
    volume, target = redis["volumes"][0].split(":")[:2]
    assert volume in compose["volumes"], "a named volume (survives `docker compose down`), not a bind mount"
    assert target == "/data", "the redis image's working directory, where it writes the AOF"
    assert "redis-cli" in redis["healthcheck"]["test"] and "ping" in redis["healthcheck"]["test"]


def test_every_variable_the_app_gets_is_a_valid_setting(
    compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    app = compose["services"]["app"]
    assert app["env_file"] == ".env" and (REPO / ".env.example").is_file(), "users copy the example"
    env = environment(app)
    unknown = set(env) - {name.upper() for name in Settings.model_fields}
    assert not unknown, f"not settings of the app (ignored, or a typo): {sorted(unknown)}"
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    # The file runs production, which refuses to start open: .env must bring the keys, as it says.
    monkeypatch.setenv("API_KEYS", "k")
    monkeypatch.setenv("ADMIN_TOKEN", "t")
    settings = Settings(_env_file=None)
    assert settings.environment == "production"
    assert settings.host == "0.0.0.0", "inside a container, 127.0.0.1 is unreachable from the port mapping"
    redis_url = urlsplit(settings.redis_url or "")
    assert redis_url.hostname in compose["services"] and (redis_url.port or 6379) == 6379
    published = [str(mapping).rsplit(":", 1)[1] for mapping in app["ports"]]
    assert published == [str(settings.port)], "the container port must be the one the app listens on"


def test_the_healthcheck_probes_the_readiness_route_on_the_app_port(
    compose: dict[str, Any], get_routes: set[str]
) -> None:
    app = compose["services"]["app"]
    probe = " ".join(app["healthcheck"]["test"])
    url = urlsplit(re.search(r"http://[^'\" ]+", probe).group(0))
    assert url.path == "/admin/ready" and url.path in get_routes
    assert url.port == int(environment(app)["PORT"])


def test_the_app_starts_only_after_redis_is_healthy(compose: dict[str, Any]) -> None:
    assert compose["services"]["app"]["depends_on"] == {"redis": {"condition": "service_healthy"}}
    assert "healthcheck" in compose["services"]["redis"]


def test_the_app_reserves_a_gpu_and_the_cpu_override_removes_it(compose: dict[str, Any]) -> None:
    devices = compose["services"]["app"]["deploy"]["resources"]["reservations"]["devices"]
    assert any("gpu" in device["capabilities"] for device in devices)
    assert compose["services"]["app"]["build"]["args"]["TORCH_VARIANT"].startswith("cu")

    cpu = merge(compose, load(CPU_OVERRIDE))["services"]["app"]
    assert "deploy" not in cpu
    assert cpu["build"]["args"]["TORCH_VARIANT"] == "cpu"
    assert environment(cpu)["DEVICE"] == "cpu"
    assert cpu["healthcheck"] == compose["services"]["app"]["healthcheck"], "only the GPU parts change"
    readme = (REPO / "README.md").read_text()
    assert f"-f docker-compose.yml -f {CPU_OVERRIDE.name}" in readme, "the CPU-only way must be documented"
