"""/metrics in Prometheus' text format, with prometheus_client and one registry per app (so that
several apps in one process, as in the tests, do not collide)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

disable_created_metrics()  # no *_created series beside every counter: only the numbers a dashboard reads

# Seconds: from a few ms (a tiny model's token) to a minute (a long prompt behind a full queue).
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    def __init__(self, models: dict):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("allformers_http_responses", "HTTP responses by path and status", ["path", "status"],
                                registry=r)
        self.prompt_tokens = Counter("allformers_prompt_tokens", "Prompt tokens received", ["model"], registry=r)
        self.generation_tokens = Counter("allformers_generation_tokens", "Tokens generated", ["model"], registry=r)
        self.finished = Counter("allformers_sequences_finished", "Sequences finished, by reason (stop, length, "
                                "cancelled, error)", ["model", "reason"], registry=r)
        self.ttft = Histogram("allformers_time_to_first_token_seconds", "Request arrival to its first text",
                              ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("allformers_inter_token_latency_seconds", "Time between two text deltas of one choice",
                             ["model"], buckets=LATENCY_BUCKETS, registry=r)
        r.register(_EngineCollector(models))

    def render(self):
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class _EngineCollector:
    """The engines' live state, read at scrape time."""

    def __init__(self, models: dict):
        self.models = models

    def collect(self):
        running = GaugeMetricFamily("allformers_running_sequences", "Sequences holding a slot", labels=["model"])
        waiting = GaugeMetricFamily("allformers_waiting_sequences", "Sequences queued for a slot", labels=["model"])
        slots = GaugeMetricFamily("allformers_slots", "KV-cache slots (sequences decoded together)", labels=["model"])
        steps = CounterMetricFamily("allformers_engine_steps", "Forward passes of the batching engine", labels=["model"])
        busy = CounterMetricFamily("allformers_engine_busy_seconds", "Seconds the engine spent in steps", labels=["model"])
        for name, s in self.models.items():
            if s.engine is None:
                continue
            e = s.engine
            running.add_metric([name], e.n_running)
            waiting.add_metric([name], e.n_waiting)
            slots.add_metric([name], e.slots)
            steps.add_metric([name], e.stats["steps"])
            busy.add_metric([name], e.step_time)
        yield from (running, waiting, slots, steps, busy)
