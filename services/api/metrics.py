"""Prometheus metrics of one API app (its own registry, so several apps can share a process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest


class ApiMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "flotilla_api_requests",
            "HTTP requests answered, by method, route template and status",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "flotilla_api_request_seconds",
            "HTTP request latency, by method and route template",
            ["method", "route"],
            registry=self.registry,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
        )
        self.events = Counter(
            "flotilla_api_events_projected",
            "Domain events taken from the bus, by type and outcome "
            "(applied, removed, logged, stale, duplicate)",
            ["type", "outcome"],
            registry=self.registry,
        )
        self.rpc_errors = Counter(
            "flotilla_api_rpc_errors",
            "RPCs to the scheduler or compute nodes that failed, by command and code",
            ["command", "code"],
            registry=self.registry,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
