"""Prometheus metrics, named in the spirit of vLLM's, in a registry owned by one app.

A CollectorRegistry per Metrics object (never the global one) lets several apps live in one process,
as the tests do, without "duplicated timeseries" errors. prometheus-client is thread-safe, so the engine
thread observes directly.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

PREFIX = "reformer_chat"

# Latency buckets from 1 ms to 2 min: a tiny model's token takes about a millisecond, a long rebuild on
# a CPU a minute.
_LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
)
_REDIS_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class Metrics:
    """Every series the service exports; one instance per app."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests_running = Gauge(
            f"{PREFIX}_num_requests_running", "Generations the engine is stepping now.", registry=r
        )
        self.requests_waiting = Gauge(
            f"{PREFIX}_num_requests_waiting",
            "Generations queued for the engine, not started yet.",
            registry=r,
        )
        self.time_to_first_token = Histogram(
            f"{PREFIX}_time_to_first_token_seconds",
            "From submission to the first generated token (includes queueing and prefill).",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.inter_token_latency = Histogram(
            f"{PREFIX}_inter_token_latency_seconds",
            "Between consecutive generated tokens of one request.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.e2e_latency = Histogram(
            f"{PREFIX}_e2e_request_latency_seconds",
            "From submission to the end of generation.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_time = Histogram(
            f"{PREFIX}_request_queue_time_seconds",
            "From submission to the engine starting the request.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter(
            f"{PREFIX}_prompt_tokens",
            "Prompt tokens of generations (the new user turn; re-fed history counts in prefill_tokens).",
            registry=r,
        )
        self.prefill_tokens = Counter(
            f"{PREFIX}_prefill_tokens",
            "Tokens fed to the model before generating: the prompt plus any history re-fed on a cache miss.",
            registry=r,
        )
        self.generation_tokens = Counter(f"{PREFIX}_generation_tokens", "Generated tokens.", registry=r)
        self.decode_steps = Counter(f"{PREFIX}_decode_steps", "Batched decode steps.", registry=r)
        self.decode_step_rows = Counter(
            f"{PREFIX}_decode_step_rows",
            "Rows over all batched decode steps (divided by decode_steps: how full the batch runs).",
            registry=r,
        )
        self.request_success = Counter(
            f"{PREFIX}_request_success",
            "Finished generations by finish reason.",
            ["finished_reason"],
            registry=r,
        )
        self.request_failure = Counter(
            f"{PREFIX}_request_failure", "Generations that raised inside the model.", registry=r
        )
        self.state_cache_queries = Counter(
            f"{PREFIX}_state_cache_queries", "Turns that looked up a cached decode state.", registry=r
        )
        self.state_cache_hits = Counter(
            f"{PREFIX}_state_cache_hits", "Turns that found their decode state cached.", registry=r
        )
        self.state_cache_bytes = Gauge(
            f"{PREFIX}_state_cache_bytes", "Bytes held by cached decode states.", registry=r
        )
        self.state_cache_entries = Gauge(
            f"{PREFIX}_state_cache_entries", "Sessions with a cached decode state.", registry=r
        )
        self.snapshot_writes = Counter(
            f"{PREFIX}_snapshot_writes", "Decode-state snapshots written to Redis.", registry=r
        )
        self.snapshot_write_bytes = Counter(
            f"{PREFIX}_snapshot_write_bytes", "Bytes of decode-state snapshots written to Redis.", registry=r
        )
        self.snapshot_skipped = Counter(
            f"{PREFIX}_snapshot_skipped",
            "Snapshots not written: the ids changed since the turn (changed), too many writes in flight "
            "(busy), larger than SNAPSHOT_MAX_BYTES (too_big), or Redis failed (error).",
            ["reason"],
            registry=r,
        )
        self.snapshot_resumes = Counter(
            f"{PREFIX}_snapshot_resumes",
            "Turns that resumed their state from a snapshot: a state-cache miss that fed only the tail.",
            registry=r,
        )
        self.snapshot_rejected = Counter(
            f"{PREFIX}_snapshot_rejected",
            "Snapshots found but not used: foreign (another checkpoint), too_long (covers ids no longer "
            "stored), stale (written before a rewind), corrupt, truncated, version (another format).",
            ["reason"],
            registry=r,
        )
        self.snapshot_bytes = Gauge(
            f"{PREFIX}_snapshot_bytes",
            "Bytes of one conversation's snapshot for the model served (what each snapshot costs Redis).",
            registry=r,
        )
        self.redis_latency = Histogram(
            f"{PREFIX}_redis_operation_seconds",
            "Latency of the store's Redis operations.",
            ["operation"],
            buckets=_REDIS_BUCKETS,
            registry=r,
        )
        self.redis_errors = Counter(
            f"{PREFIX}_redis_errors",
            "Store operations that failed because Redis was unreachable.",
            ["operation"],
            registry=r,
        )

    def render(self) -> bytes:
        """The Prometheus text exposition of this app's registry."""
        return generate_latest(self.registry)
