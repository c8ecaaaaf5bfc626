"""StateCache: least recently used out first, within a byte budget measured by DecodeState.nbytes()."""

from __future__ import annotations

import pytest

from app.engine.state_cache import StateCache
from app.metrics import Metrics
from model.reformer import ReformerLM
from model.tokenizer import ChatTokenizer


@pytest.fixture
def model(tiny_model: tuple[ReformerLM, ChatTokenizer]) -> ReformerLM:
    return tiny_model[0]


def test_take_removes_and_counts_hits_and_queries(model: ReformerLM) -> None:
    metrics = Metrics()
    cache = StateCache(10 * model.init_state(1).nbytes(), metrics)
    state = model.init_state(1)
    cache.put(("alice", "s1"), state, 42)
    entry = cache.take(("alice", "s1"))
    assert entry is not None and entry.state is state and entry.tokens == 42
    assert cache.take(("alice", "s1")) is None  # taken: a turn owns it until it puts it back
    assert cache.take(("bob", "s1")) is None  # keyed by owner too
    assert metrics.state_cache_queries._value.get() == 3
    assert metrics.state_cache_hits._value.get() == 1
    assert cache.nbytes == 0 and metrics.state_cache_bytes._value.get() == 0


def test_least_recently_used_is_evicted_to_stay_within_budget(model: ReformerLM) -> None:
    size = model.init_state(1).nbytes()
    cache = StateCache(3 * size, Metrics())
    for name in ("a", "b", "c"):
        cache.put(("o", name), model.init_state(1), 1)
    cache.put(("o", "a"), cache.take(("o", "a")).state, 2)  # use "a": "b" is now the oldest
    cache.put(("o", "d"), model.init_state(1), 1)
    assert ("o", "b") not in cache
    assert all(("o", name) in cache for name in ("a", "c", "d"))
    assert cache.nbytes == 3 * size <= cache.budget_bytes


def test_a_state_bigger_than_the_budget_is_not_kept(model: ReformerLM) -> None:
    size = model.init_state(1).nbytes()
    cache = StateCache(size - 1, Metrics())
    cache.put(("o", "s"), model.init_state(1), 1)
    assert len(cache) == 0 and cache.nbytes == 0
    disabled = StateCache(0, Metrics())
    disabled.put(("o", "s"), model.init_state(1), 1)
    assert disabled.take(("o", "s")) is None


def test_discard_frees_the_bytes(model: ReformerLM) -> None:
    metrics = Metrics()
    cache = StateCache(10 * model.init_state(1).nbytes(), metrics)
    cache.put(("o", "s"), model.init_state(1), 1)
    assert metrics.state_cache_entries._value.get() == 1
    cache.discard(("o", "s"))
    assert len(cache) == 0 and cache.nbytes == 0 and metrics.state_cache_entries._value.get() == 0
