"""Settings: every knob of the service is an environment variable (or a line in `.env`).

Each field is documented in `.env.example`, and a test keeps the two in step. Nothing reads the
environment at import time: `create_app()` builds a Settings when it is not handed one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from app.security import normalize_origin
from app.store.redis_client import RedisTarget, resolve_redis_target

# The checkpoint that ships with the repository, found relative to this package (not the working
# directory), so `python -m app` works from anywhere in a checkout.
SHIPPED_MODEL_DIR = Path(__file__).resolve().parent.parent / "checkpoints" / "reformer-chat-small"


class Settings(BaseSettings):
    """The service's configuration; see `.env.example` for what each field means and why its default."""

    model_config = SettingsConfigDict(env_file=".env", env_file_encoding="utf-8", extra="ignore")

    environment: Literal["development", "production"] = "development"
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    redis_url: str | None = None
    redis_cluster: bool = False
    redis_key_prefix: str = "reformer-chat:"
    redis_timeout_seconds: float = Field(default=2.0, gt=0)
    data_dir: Path = Path("./data")

    model_dir: Path | None = None
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    state_dtype: Literal["auto", "fp32", "bf16"] = "auto"
    torch_threads: int = Field(default=0, ge=0)
    malloc_mmap_threshold_bytes: int = Field(default=128 * 1024, ge=0, le=32 * 1024 * 1024)

    api_keys: Annotated[list[str], NoDecode] = Field(default_factory=list)
    admin_token: SecretStr | None = None
    rate_limit_per_minute: int = Field(default=120, ge=0)
    cors_allow_origins: Annotated[list[str], NoDecode] = Field(default_factory=list)
    ws_allowed_origins: Annotated[list[str], NoDecode] = Field(default_factory=list)
    trusted_proxy_ips: Annotated[list[str], NoDecode] = Field(default_factory=list)
    enable_docs: bool | None = None

    max_connections: int = Field(default=1000, ge=0)
    header_timeout_seconds: float = Field(default=10.0, gt=0)
    send_timeout_seconds: float = Field(default=30.0, gt=0)

    session_ttl_seconds: int = Field(default=7 * 24 * 3600, ge=60)
    session_lock_seconds: float = Field(default=30.0, ge=1.0)
    max_message_chars: int = Field(default=4000, ge=1)
    max_new_tokens: int = Field(default=256, ge=1)
    default_temperature: float = Field(default=0.8, ge=0)
    default_top_p: float = Field(default=0.95, gt=0, le=1)
    default_top_k: int = Field(default=50, ge=0)
    default_repetition_penalty: float = Field(default=1.1, gt=0)

    state_cache_bytes: int = Field(default=256 * 1024 * 1024, ge=0)
    snapshots_enabled: bool = True
    snapshot_min_tokens: int = Field(default=1024, ge=0)
    snapshot_every_tokens: int = Field(default=256, ge=1)
    snapshot_max_bytes: int = Field(default=64 * 1024 * 1024, ge=0)
    prefill_chunk_tokens: int = Field(default=512, ge=1)
    batch_prompt_tokens: int = Field(default=32, ge=0)
    # Chosen from bench/serve.py at 16 and 64 conversations (docs/BENCHMARKS.md, issue 14): once the
    # engine is saturated, more rows trade inter-token latency for time to first token and CPU per token.
    max_running_requests: int = Field(default=64, ge=1)
    max_waiting_requests: int = Field(default=64, ge=0)
    max_requests_per_key: int | None = Field(default=None, ge=1)
    max_prompt_tokens: int = Field(default=8192, ge=1)
    max_sessions_per_key: int = Field(default=1000, ge=0)
    max_stored_bytes_per_key: int = Field(default=256 * 1024 * 1024, ge=0)
    retry_after_seconds: int = Field(default=2, ge=1)

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_api_keys(cls, value: object) -> object:
        """API_KEYS is a comma-separated list in the environment; blanks are dropped."""
        if isinstance(value, str):
            return [key.strip() for key in value.split(",") if key.strip()]
        return value

    @field_validator("cors_allow_origins", "ws_allowed_origins", mode="before")
    @classmethod
    def _split_origins(cls, value: object) -> object:
        """Origin lists are comma-separated in the environment; each must be `*` or scheme://host[:port]."""
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, list | tuple):
            return value
        return [normalize_origin(str(item)) for item in items if str(item).strip()]

    @field_validator("trusted_proxy_ips", mode="before")
    @classmethod
    def _split_proxies(cls, value: object) -> object:
        """TRUSTED_PROXY_IPS is a comma-separated list of addresses or networks (uvicorn's syntax)."""
        if isinstance(value, str):
            return [item.strip() for item in value.split(",") if item.strip()]
        return value

    @field_validator(
        "redis_url", "admin_token", "model_dir", "max_requests_per_key", "enable_docs", mode="before"
    )
    @classmethod
    def _blank_is_unset(cls, value: object) -> object:
        """`REDIS_URL=` (as in .env.example) means "not set", not the empty URL or the current directory."""
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("redis_key_prefix")
    @classmethod
    def _prefix_has_no_hash_tag(cls, value: str) -> str:
        if "{" in value or "}" in value:
            raise ValueError(
                f"REDIS_KEY_PREFIX {value!r} contains a brace: keys use {{<session id>}} as their Redis "
                "Cluster hash tag, and a brace in the prefix would become the tag instead; remove it"
            )
        return value

    @model_validator(mode="after")
    def _cluster_needs_a_cluster_url(self) -> Settings:
        """Fail at start, naming the fix, rather than at the first turn with a confusing client error."""
        if self.redis_url is None:
            if self.redis_cluster:
                raise ValueError(
                    "REDIS_CLUSTER=true needs REDIS_URL set to a node of the cluster (the embedded Redis "
                    "is a single server): set REDIS_URL=redis://host:port, or REDIS_CLUSTER=false"
                )
        else:
            resolve_redis_target(self.redis_url, cluster=self.redis_cluster)
        return self

    @model_validator(mode="after")
    def _refuse_open_production(self) -> Settings:
        """Production must not run open: an unset key list would expose every session to everyone."""
        if self.environment == "production":
            missing = [
                name
                for name, value in (("API_KEYS", self.api_keys), ("ADMIN_TOKEN", self.admin_token))
                if not value
            ]
            if missing:
                raise ValueError(
                    f"ENVIRONMENT=production requires {' and '.join(missing)}: set them, or use "
                    "ENVIRONMENT=development for a local, unauthenticated server"
                )
        return self

    @property
    def redis_target(self) -> RedisTarget | None:
        """REDIS_URL and REDIS_CLUSTER resolved (a `redis+cluster://` URL implies a cluster); None when
        the embedded Redis is to be used."""
        if self.redis_url is None:
            return None
        return resolve_redis_target(self.redis_url, cluster=self.redis_cluster)

    @property
    def resolved_model_dir(self) -> Path:
        """MODEL_DIR, or the shipped checkpoint when unset."""
        return self.model_dir if self.model_dir is not None else SHIPPED_MODEL_DIR

    @property
    def requests_per_key(self) -> int:
        """MAX_REQUESTS_PER_KEY, or by default a quarter of the engine's running + queued slots (at least
        one): one caller's burst then fills its own share, never everyone's."""
        if self.max_requests_per_key is not None:
            return self.max_requests_per_key
        return max(1, (self.max_running_requests + self.max_waiting_requests) // 4)

    @property
    def docs_enabled(self) -> bool:
        """ENABLE_DOCS, or by default on in development and off in production."""
        return self.environment == "development" if self.enable_docs is None else self.enable_docs

    @property
    def max_body_bytes(self) -> int:
        """Largest accepted request body: the longest message, JSON-escaped at worst (6 bytes per
        character, `\\uXXXX`), plus room for the sampling fields."""
        return 6 * self.max_message_chars + 16 * 1024
