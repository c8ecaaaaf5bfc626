"""The engine: one thread that owns the model and runs every reply in a continuous batch.

- engine.py: `ChatEngine`, the thread and its step loop (admit, prefill, decode, sample, finish).
- requests.py: what crosses between the event loop and that thread (request, handle, result, `Outbox`).
- batching.py: the rows decoded together at each step, joining and leaving between steps.
- state_cache.py: `StateCache`, recently used sessions' decode states under a byte budget.
"""

from app.engine.engine import ChatEngine
from app.engine.requests import GenerationHandle, GenerationRequest, GenerationResult
from app.engine.state_cache import CachedState, CacheKey, StateCache

__all__ = [
    "CacheKey",
    "CachedState",
    "ChatEngine",
    "GenerationHandle",
    "GenerationRequest",
    "GenerationResult",
    "StateCache",
]
