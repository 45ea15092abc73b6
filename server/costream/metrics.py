"""Server metrics in the Prometheus text format (``GET /metrics``).

A few counters, gauges and histograms kept in plain Python: one process, no locks needed
(everything runs on the event loop). With ``--workers``, the workers of one server share
a directory (:class:`SharedMetrics`): each writes its values there every
``SHARE_INTERVAL_S``, and ``/metrics`` on any worker answers for all of them, its own
values live and the others' as last written. A worker that exits keeps its counters and
histograms in the sum (they only ever grow); its gauges leave it. With
``--metrics-listen``, the parent process answers instead, for all the workers as last
written (:func:`written_total`).
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import json
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

log = logging.getLogger(__name__)

SHARE_INTERVAL_S: Final = 0.5

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
            "costream_slow_viewer_closes_total",
            "Viewers closed with 4008 (fell too far behind, or stopped reading).",
        )
        self.runs_started = Counter("costream_runs_started_total", "Runs started here.")
        self.run_errors = Counter("costream_run_errors_total", "Runs that ended in RUN_ERROR.")
        self.run_seconds = Histogram("costream_run_duration_seconds", "Duration of runs.")
        self.first_token_seconds = Histogram(
            "costream_time_to_first_token_seconds",
            "From the start of an LLM call to its first streamed delta.",
        )

        self.shared: SharedMetrics | None = None  # set in a worker of ``--workers``

    def _all(self) -> tuple[Counter | Gauge | Histogram, ...]:
        return (
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

    def render(self) -> str:
        """This process's metrics, or with ``--workers`` those of all the server's workers."""
        source = self if self.shared is None else self.shared.total()
        return "\n".join(line for metric in source._all() for line in metric.render()) + "\n"

    def values(self) -> dict[str, object]:
        """Every value by metric name, as JSON can hold it."""
        out: dict[str, object] = {}
        for metric in self._all():
            if isinstance(metric, Histogram):
                out[metric.name] = [metric.counts, metric.total, metric.count]
            else:
                out[metric.name] = metric.value
        return out

    def add_values(self, values: dict[str, object], *, gauges: bool) -> None:
        """Add another process's ``values`` to these (its gauges only if ``gauges``)."""
        for metric in self._all():
            value = values.get(metric.name)
            if isinstance(metric, Histogram):
                if isinstance(value, list) and len(value) == 3:
                    counts, total, count = value
                    if isinstance(counts, list) and len(counts) == len(metric.counts):
                        metric.counts = [
                            a + int(b) for a, b in zip(metric.counts, counts, strict=True)
                        ]
                        metric.total += float(total)
                        metric.count += int(count)
            elif isinstance(value, int | float) and (gauges or isinstance(metric, Counter)):
                metric.value += value


class SharedMetrics:
    """One server's worker processes adding up their metrics through a directory."""

    def __init__(self, metrics: Metrics, directory: Path) -> None:
        self.metrics = metrics
        self.directory = directory
        self.pid = os.getpid()

    def total(self) -> Metrics:
        """This process's values now, plus every other worker's as last written."""
        total = Metrics()
        total.add_values(self.metrics.values(), gauges=True)
        add_written(total, self.directory, skip_pid=self.pid)
        return total

    def write(self) -> None:
        """Write this process's values, atomically (a reader never sees half a file)."""
        path = self.directory / f"{self.pid}.json"
        partial = path.with_suffix(".tmp")
        partial.write_text(json.dumps(self.metrics.values()))
        partial.replace(path)

    async def run(self) -> None:
        """Write every ``SHARE_INTERVAL_S`` until cancelled, and once more then."""
        try:
            while True:
                try:
                    self.write()
                except OSError as error:
                    log.warning("writing this worker's metrics failed: %s", error)
                await asyncio.sleep(SHARE_INTERVAL_S)
        finally:
            with contextlib.suppress(OSError):
                self.write()


def add_written(total: Metrics, directory: Path, skip_pid: int | None = None) -> None:
    """Add to ``total`` the values every worker last wrote in ``directory`` (but
    ``skip_pid``'s): counters and histograms of all, gauges of the living only."""
    for path in directory.glob("*.json"):
        if not path.stem.isdigit() or int(path.stem) == skip_pid:
            continue
        try:
            values = json.loads(path.read_text())
        except (OSError, ValueError):
            continue  # being replaced, or gone: the next scrape has it
        total.add_values(values, gauges=_alive(int(path.stem)))


def written_total(directory: Path) -> str:
    """The metrics of all the workers that write to ``directory``, rendered: what the
    parent of ``--workers`` serves on ``--metrics-listen``."""
    total = Metrics()
    add_written(total, directory)
    return total.render()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
