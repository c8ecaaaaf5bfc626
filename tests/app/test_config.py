"""Settings: documented in .env.example field for field, read from the environment, refusing unsafe values."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from pydantic import ValidationError

from app.config import SHIPPED_MODEL_DIR, Settings
from app.factory import CheckpointNotFound, load_model

ENV_EXAMPLE = Path(__file__).resolve().parents[2] / ".env.example"


def test_env_example_documents_every_setting_and_nothing_else() -> None:
    documented = re.findall(r"^([A-Z][A-Z0-9_]*)=", ENV_EXAMPLE.read_text(), flags=re.MULTILINE)
    assert len(documented) == len(set(documented)), "a setting is listed twice"
    assert set(documented) == {name.upper() for name in Settings.model_fields}


def test_env_example_values_are_the_defaults() -> None:
    """Copying .env.example to .env changes nothing: its values are the defaults, blanks mean unset."""
    assert Settings(_env_file=ENV_EXAMPLE) == Settings(_env_file=None)


def test_environment_variables_are_parsed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("API_KEYS", " alpha, beta ,,gamma ")
    monkeypatch.setenv("REDIS_URL", "redis://example:6379/3")
    monkeypatch.setenv("MAX_NEW_TOKENS", "17")
    monkeypatch.setenv("ADMIN_TOKEN", "s3cret")
    settings = Settings(_env_file=None)
    assert settings.api_keys == ["alpha", "beta", "gamma"]
    assert settings.redis_url == "redis://example:6379/3"
    assert settings.max_new_tokens == 17
    assert settings.admin_token is not None and settings.admin_token.get_secret_value() == "s3cret"
    assert "s3cret" not in repr(settings)


def test_production_refuses_to_run_open() -> None:
    with pytest.raises(ValidationError, match="API_KEYS and ADMIN_TOKEN"):
        Settings(_env_file=None, environment="production")
    settings = Settings(_env_file=None, environment="production", api_keys=["k"], admin_token="t")
    assert settings.environment == "production"


def test_a_brace_in_the_key_prefix_is_refused() -> None:
    with pytest.raises(ValidationError, match="hash tag"):
        Settings(_env_file=None, redis_key_prefix="app{1}:")


def test_out_of_range_values_are_refused() -> None:
    for field, value in [("max_new_tokens", 0), ("default_top_p", 1.5), ("port", 70000), ("device", "tpu")]:
        with pytest.raises(ValidationError):
            Settings(_env_file=None, **{field: value})


def test_model_dir_defaults_to_the_shipped_checkpoint_in_the_repository() -> None:
    settings = Settings(_env_file=None)
    assert settings.resolved_model_dir == SHIPPED_MODEL_DIR
    assert SHIPPED_MODEL_DIR == Path(__file__).resolve().parents[2] / "checkpoints" / "reformer-chat-small"


def test_a_missing_model_dir_names_the_path_and_the_fix(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(CheckpointNotFound, match=r"nowhere.*set MODEL_DIR.*python -m model\.train"):
        load_model(Settings(_env_file=None, model_dir=missing))


def test_body_limit_fits_the_longest_message_fully_escaped() -> None:
    settings = Settings(_env_file=None, max_message_chars=1000)
    assert settings.max_body_bytes >= 6 * 1000
