import dataclasses

import pytest

from model import ReformerConfig


def test_presets_are_valid_and_distinct() -> None:
    tiny, small, base = ReformerConfig.tiny(), ReformerConfig.small(), ReformerConfig.base()
    assert tiny.d_model < small.d_model < base.d_model
    assert ReformerConfig.from_name("small", vocab_size=123).vocab_size == 123


def test_round_trips_through_dict() -> None:
    config = ReformerConfig.small(vocab_size=777, dropout=0.1)
    assert ReformerConfig.from_dict(config.to_dict()) == config


@pytest.mark.parametrize(
    ("changes", "hint"),
    [
        ({"n_layers": 3}, "one entry per layer"),
        ({"attn_layers": ("local", "sparse")}, "use one of"),
        ({"n_buckets": 5}, "use 6"),
        ({"dropout": 1.0}, "[0, 1)"),
        ({"d_head": 15}, "use 16"),
        ({"bucket_size": 0}, "positive integer"),
        ({"self_attn_score": 0.0}, "use -1e5"),
        ({"shared_qk": 1}, "true or false"),
    ],
)
def test_invalid_combinations_say_the_fix(changes: dict, hint: str) -> None:
    with pytest.raises(ValueError) as info:
        dataclasses.replace(ReformerConfig.tiny(), **changes)
    assert hint in str(info.value)


def test_new_models_use_separate_qk_and_old_configs_mean_shared_qk() -> None:
    assert not any(ReformerConfig.from_name(name).shared_qk for name in ("tiny", "small", "base"))
    old = ReformerConfig.small().to_dict()
    del old["shared_qk"]  # as config.json files written before the field existed
    assert ReformerConfig.from_dict(old) == ReformerConfig.small(shared_qk=True)
    assert ReformerConfig.from_dict(ReformerConfig.small().to_dict()).shared_qk is False


def test_unknown_fields_are_refused() -> None:
    data = ReformerConfig.tiny().to_dict() | {"n_experts": 8}
    with pytest.raises(ValueError, match="n_experts"):
        ReformerConfig.from_dict(data)


def test_config_is_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        ReformerConfig.tiny().d_model = 3  # type: ignore[misc]
