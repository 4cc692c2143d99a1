"""Prometheus metrics of one notifier process. Labels are bounded sets (outcomes, attempt
results): never a subscription, account or command id."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.deliveries = Counter(
            "tally_notify_deliveries",
            "Deliveries finished: acknowledged (2xx) or failed (parked after the horizon).",
            ["outcome"],
            registry=self.registry,
        )
        self.attempts = Counter(
            "tally_notify_attempts",
            "POST attempts, by result: 2xx, status (any other answer), timeout, connection.",
            ["result"],
            registry=self.registry,
        )
        self.retries = Counter(
            "tally_notify_retries", "Attempts that are retried after a backoff.",
            registry=self.registry,
        )  # fmt: skip
        self.read = Counter(
            "tally_notify_events_read",
            "Events read from the events topic, summed over subscriptions.",
            registry=self.registry,
        )
        self.latency = Histogram(
            "tally_notify_event_to_delivery_seconds",
            "From the engine's decision (at_ms) to the subscriber's acknowledgement.",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
            registry=self.registry,
        )
        self.subscriptions = Gauge(
            "tally_notify_subscriptions", "Subscriptions delivered by this process.",
            registry=self.registry,
        )  # fmt: skip
