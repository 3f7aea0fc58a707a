"""Prometheus metrics of the ONNX server (``GET /metrics``, text exposition format).

One registry per app, so several servers in one process (tests) do not share counters.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST, disable_created_metrics

from kdship.serve.engine import BatchStats

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)

CONTENT_TYPE = CONTENT_TYPE_LATEST
disable_created_metrics()  # no *_created series: they only add noise to the scrape


class ServerMetrics(BatchStats):
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("kdship_requests", "HTTP requests by endpoint and status code", ["endpoint", "status"], registry=r)
        self.latency = Histogram(
            "kdship_request_latency_seconds", "End-to-end latency of generation requests", ["endpoint"], buckets=_LATENCY_BUCKETS, registry=r
        )
        self.ttft = Histogram("kdship_time_to_first_token_seconds", "Arrival to first sampled token", buckets=_LATENCY_BUCKETS, registry=r)
        self.batch = Histogram("kdship_decode_batch_size", "Sequences per decode step", buckets=_BATCH_BUCKETS, registry=r)
        self.prefill_batch = Histogram("kdship_prefill_batch_size", "Prompts per prefill pass", buckets=_BATCH_BUCKETS, registry=r)
        self.step_time = Histogram("kdship_decode_step_seconds", "Wall time of one decode forward pass", buckets=_LATENCY_BUCKETS, registry=r)
        self.queue_depth = Gauge("kdship_queue_depth", "Requests waiting for a batch slot", registry=r)
        self.running = Gauge("kdship_running_sequences", "Sequences in the running batch", registry=r)
        self.prompt_tokens = Counter("kdship_prompt_tokens", "Prompt tokens prefilled", registry=r)
        self.generation_tokens = Counter("kdship_generation_tokens", "Tokens generated", registry=r)
        self.finished_requests = Counter("kdship_finished_requests", "Generations finished, by reason", ["finish_reason"], registry=r)

    # BatchStats hooks (scheduler thread; prometheus_client is thread-safe)
    def decode_step(self, batch_size: int, seconds: float) -> None:
        self.batch.observe(batch_size)
        self.step_time.observe(seconds)

    def prefill(self, batch_size: int, tokens: int, seconds: float) -> None:
        self.prefill_batch.observe(batch_size)

    def first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def queue(self, waiting: int, running: int) -> None:
        self.queue_depth.set(waiting)
        self.running.set(running)

    def finished(self, prompt_tokens: int, completion_tokens: int, reason: str) -> None:
        self.prompt_tokens.inc(prompt_tokens)
        self.generation_tokens.inc(completion_tokens)
        self.finished_requests.labels(reason).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
