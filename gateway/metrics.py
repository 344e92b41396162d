"""Prometheus metrics (``/metrics``), all prefixed ``ragline_``; labels carry key ids, never keys.

One registry per app (no module-level state), so tests and several apps in one process do not
collide.
"""

from __future__ import annotations

import platform
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as dist_version
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    Summary,
    disable_created_metrics,
)

# no `_created` series beside every counter and histogram (they double what a scrape holds and
# no dashboard reads them); a process-wide switch of prometheus_client's
disable_created_metrics()

_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 30, 60, 120)
_FAST = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1)


class Metrics:
    def __init__(self) -> None:
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}
        self.registry = r = CollectorRegistry()
        ProcessCollector(registry=r)  # process_cpu_seconds_total, process_resident_memory_bytes
        PlatformCollector(registry=r)  # python_info
        self.build = Gauge(
            "ragline_build_info",
            "ragline's version and Python's (always 1).",
            ["version", "python"],
            registry=r,
        )
        self.build.labels(_version(), platform.python_version()).set(1)
        self.responses = Counter(
            "ragline_http_responses_total",
            "Every HTTP response (401s, 404s and 413s included) by route template, method, "
            "status and error code (empty on success), and key id (`-`: no key).",
            ["route", "method", "status", "code", "key"],
            registry=r,
        )
        self.requests = Counter(
            "ragline_requests_total",
            "Admitted model requests (chat, completions, responses, embeddings) by route, "
            "model, key, status.",
            ["route", "model", "key", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "ragline_request_duration_seconds",
            "End-to-end latency.",
            ["route", "model"],
            buckets=_LATENCY,
            registry=r,
        )
        self.ttft = Histogram(
            "ragline_time_to_first_token_seconds",
            "Time to first token.",
            ["model"],
            buckets=_LATENCY,
            registry=r,
        )
        self.tpot = Histogram(
            "ragline_time_per_output_token_seconds",
            "Time per output token.",
            ["model"],
            buckets=_FAST,
            registry=r,
        )
        self.backend = Histogram(
            "ragline_backend_duration_seconds",
            "Time in the backend per call (a stream: until its first event).",
            ["model"],
            buckets=_LATENCY,
            registry=r,
        )
        self.retrieval = Histogram(
            "ragline_retrieval_duration_seconds",
            "Retrieval latency.",
            ["store"],
            buckets=_FAST,
            registry=r,
        )
        self.safety = Histogram(
            "ragline_safety_duration_seconds",
            "Safety scanning latency.",
            ["scanner"],
            buckets=_FAST,
            registry=r,
        )
        self.prompt_tokens = Counter(
            "ragline_prompt_tokens_total", "Prompt tokens.", ["model", "key"], registry=r
        )
        self.completion_tokens = Counter(
            "ragline_completion_tokens_total", "Completion tokens.", ["model", "key"], registry=r
        )
        self.cache = Counter(
            "ragline_cache_requests_total", "Response cache lookups.", ["result"], registry=r
        )
        self.rate_limited = Counter(
            "ragline_rate_limit_rejections_total",
            "Requests rejected by rate limits.",
            ["key"],
            registry=r,
        )
        self.safety_findings = Counter(
            "ragline_safety_findings_total",
            "Safety findings.",
            ["scanner", "type", "action"],
            registry=r,
        )
        variant = ["experiment", "variant", "template"]
        self.variant_requests = Counter(
            "ragline_prompt_requests_total",
            "Templated requests by experiment, variant, template version and status.",
            [*variant, "status"],
            registry=r,
        )
        self.variant_prompt_tokens = Counter(
            "ragline_prompt_variant_prompt_tokens_total",
            "Prompt tokens of templated requests.",
            variant,
            registry=r,
        )
        self.variant_completion_tokens = Counter(
            "ragline_prompt_variant_completion_tokens_total",
            "Completion tokens of templated requests.",
            variant,
            registry=r,
        )
        self.variant_latency = Histogram(
            "ragline_prompt_variant_duration_seconds",
            "End-to-end latency of templated requests.",
            variant,
            buckets=_LATENCY,
            registry=r,
        )
        self.variant_feedback = Summary(
            "ragline_prompt_feedback_score",
            "Feedback scores (POST /v1/feedback) per variant: _sum / _count is the mean.",
            variant,
            registry=r,
        )
        self.fallbacks = Counter(
            "ragline_fallbacks_total",
            "Requests moved to a model's next fallback before the first byte.",
            ["model", "to"],
            registry=r,
        )
        self.budget_rejections = Counter(
            "ragline_budget_rejections_total",
            "Requests refused because a key's or team's budget was spent.",
            ["scope", "period", "unit"],
            registry=r,
        )
        self.budget_soft = Counter(
            "ragline_budget_soft_limit_total",
            "Budgets that crossed their soft threshold (once per budget and period).",
            ["scope", "period", "unit"],
            registry=r,
        )
        self.in_flight = Gauge("ragline_in_flight_requests", "Requests being served.", registry=r)
        self.backend_running = Gauge(
            "ragline_backend_running_sequences",
            "Sequences being decoded (embedded) or requests outstanding (HTTP replicas).",
            ["model"],
            registry=r,
        )
        self.backend_waiting = Gauge(
            "ragline_backend_waiting_requests",
            "Requests queued for a batch slot (embedded engine).",
            ["model"],
            registry=r,
        )
        self.backend_slots = Gauge(
            "ragline_backend_kv_slots",
            "The most sequences the embedded engine decodes in one batch (max_batch, a cap).",
            ["model"],
            registry=r,
        )
        self.kv_blocks = Gauge(
            "ragline_engine_kv_blocks",
            "Paged KV cache blocks of the embedded engine, by state: used by running sequences, "
            "cached (a reusable prefix nobody runs), total.",
            ["model", "state"],
            registry=r,
        )
        self.prefix_tokens = Counter(
            "ragline_engine_prefix_cache_tokens",
            "Prompt tokens the embedded engine looked up in its prefix cache (result=queried) "
            "and found there (result=hit); hit rate = rate(hit) / rate(queried).",
            ["model", "result"],
            registry=r,
        )
        self.preemptions = Counter(
            "ragline_engine_preemptions",
            "Sequences the embedded engine paused because its KV cache was full (resumed by "
            "recomputing).",
            ["model"],
            registry=r,
        )
        self._engine_seen: dict[tuple[str, str], float] = {}
        self.backend_healthy = Gauge(
            "ragline_backend_healthy_replicas",
            "Healthy replicas (1 for a loaded embedded model).",
            ["model"],
            registry=r,
        )

    def observe_backends(self, status: dict[str, dict[str, object]]) -> None:
        """The gauges ``/ready`` reports in JSON, per model, for ``/metrics``."""
        for model, load in status.items():
            healthy = load.get("healthy", 1 if load["status"] == "ready" else 0)
            self.backend_healthy.labels(model).set(float(healthy))  # type: ignore[arg-type]
            self.backend_running.labels(model).set(float(load.get("running", 0)))  # type: ignore[arg-type]
            self.backend_waiting.labels(model).set(float(load.get("waiting", 0)))  # type: ignore[arg-type]
            if "slots" in load:
                self.backend_slots.labels(model).set(float(load["slots"]))  # type: ignore[arg-type]
            if "kv_blocks" in load:
                self._observe_engine(model, load)

    def _observe_engine(self, model: str, load: dict[str, object]) -> None:
        def number(key: str) -> float:
            value = load[key]
            assert isinstance(value, int)
            return float(value)

        self.kv_blocks.labels(model, "total").set(number("kv_blocks"))
        self.kv_blocks.labels(model, "used").set(number("kv_blocks_used"))
        self.kv_blocks.labels(model, "cached").set(number("kv_blocks_cached"))
        # the engine counts from its start; the counters advance by what is new since last time
        for counter, labels, key in (
            (self.prefix_tokens, (model, "queried"), "prefix_queried_tokens"),
            (self.prefix_tokens, (model, "hit"), "prefix_hit_tokens"),
            (self.preemptions, (model,), "preemptions"),
        ):
            seen = self._engine_seen.get((key, model), 0.0)
            now = number(key)
            if now != seen:  # less: the engine restarted and counts from zero again
                counter.labels(*labels).inc(now - seen if now > seen else now)
            self._engine_seen[(key, model)] = now

    def child(self, metric: Any, *labels: str) -> Any:
        """``metric.labels(*labels)``, remembered: prometheus_client validates and locks on
        every call, and the request path asks for the same few children again and again."""
        key = (id(metric), labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*labels)
        return found


def _version() -> str:
    try:
        return dist_version("ragline")
    except PackageNotFoundError:
        return "unknown"
