"""Process metrics in the Prometheus text format (``GET /metrics``).

A few counters, gauges and histograms kept in plain Python: one process, no locks needed
(everything runs on the event loop). With ``--workers`` each process reports its own.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable
from dataclasses import dataclass, field

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


@dataclass
class Counter:
    name: str
    help: str
    value: float = 0.0

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount

    def render(self) -> Iterable[str]:
        yield f"# HELP {self.name} {self.help}"
        yield f"# TYPE {self.name} counter"
        yield f"{self.name} {self.value:g}"


@dataclass
class Gauge:
    name: str
    help: str
    value: float = 0.0

    def set(self, value: float) -> None:
        self.value = value

    def add(self, amount: float) -> None:
        self.value += amount

    def render(self) -> Iterable[str]:
        yield f"# HELP {self.name} {self.help}"
        yield f"# TYPE {self.name} gauge"
        yield f"{self.name} {self.value:g}"


@dataclass
class Histogram:
    name: str
    help: str
    buckets: tuple[float, ...] = _LATENCY_BUCKETS
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        self.counts = [0] * len(self.buckets)

    def observe(self, value: float) -> None:
        index = bisect.bisect_left(self.buckets, value)
        if index < len(self.counts):
            self.counts[index] += 1
        self.total += value
        self.count += 1

    def render(self) -> Iterable[str]:
        yield f"# HELP {self.name} {self.help}"
        yield f"# TYPE {self.name} histogram"
        cumulative = 0
        for bound, count in zip(self.buckets, self.counts, strict=True):
            cumulative += count
            yield f'{self.name}_bucket{{le="{bound:g}"}} {cumulative}'
        yield f'{self.name}_bucket{{le="+Inf"}} {self.count}'
        yield f"{self.name}_sum {self.total:g}"
        yield f"{self.name}_count {self.count}"


class Metrics:
    """The metrics of one server process."""

    def __init__(self) -> None:
        self.connections = Gauge("costream_websocket_connections", "Open WebSocket connections.")
        self.viewers = Gauge("costream_viewers", "WebSocket sessions past welcome.")
        self.events_appended = Counter(
            "costream_events_appended_total", "Events this process appended to logs."
        )
        self.frames_sent = Counter("costream_frames_sent_total", "Frames sent to viewers.")
        self.catch_ups = Counter(
            "costream_slow_viewer_catchups_total",
            "Times a viewer's queue overflowed and it was fed from the log instead.",
        )
        self.slow_closes = Counter(
            "costream_slow_viewer_closes_total", "Viewers closed with 4008 (fell too far behind)."
        )
        self.runs_started = Counter("costream_runs_started_total", "Runs started here.")
        self.run_errors = Counter("costream_run_errors_total", "Runs that ended in RUN_ERROR.")
        self.run_seconds = Histogram("costream_run_duration_seconds", "Duration of runs.")
        self.first_token_seconds = Histogram(
            "costream_time_to_first_token_seconds",
            "From the start of an LLM call to its first streamed delta.",
        )

    def render(self) -> str:
        metrics = (
            self.connections,
            self.viewers,
            self.events_appended,
            self.frames_sent,
            self.catch_ups,
            self.slow_closes,
            self.runs_started,
            self.run_errors,
            self.run_seconds,
            self.first_token_seconds,
        )
        return "\n".join(line for metric in metrics for line in metric.render()) + "\n"
