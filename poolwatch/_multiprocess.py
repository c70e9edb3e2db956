"""prometheus_client multiprocess mode: each worker pushes its pools' figures to its files.

prometheus_client does not support custom collectors under ``PROMETHEUS_MULTIPROC_DIR``:
the page is made by ``MultiProcessCollector`` merging every process's files. So here each
worker copies its snapshot into ordinary multiprocess metrics once a second (and at exit).
Gauge modes are chosen so that the merged page adds up across workers:

- counts of things (connections, requests, limits) are ``livesum``: the sum over live workers;
- ages and utilization are ``livemax``: the worst worker (a sum of ratios means nothing; use
  ``sum(active connections) / sum(max)`` for the fleet-wide ratio, as the dashboard does);
- counters and histograms are summed by prometheus_client, dead workers included, as they
  should be.

Histogram buckets are carried over by adding each bucket's increase to the worker's file
(prometheus_client's ``_buckets`` / ``_sum`` values, feature-detected).
"""

from __future__ import annotations

import atexit
import os
import threading
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from . import _api
from . import _catalogue as c
from ._histogram import HistogramSnapshot
from ._safety import report_internal_error
from ._samples import samples

_LIVEMAX = {c.PENDING_MAX_AGE, c.ACTIVE_MAX_AGE, c.UTILIZATION}

SeriesKey = tuple[c.MetricSpec, tuple[str, ...]]


class MultiprocessPusher:
    """Copies this worker's pool figures into multiprocess metric files, periodically."""

    _instance: MultiprocessPusher | None = None
    _instance_lock = threading.Lock()

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._metrics: dict[c.MetricSpec, Any] = {}
        for spec in c.CATALOGUE:
            labels = list(spec.labels)
            name = spec.exposition_name
            if spec.kind == "counter":
                self._metrics[spec] = Counter(name, spec.help, labels, registry=None)
            elif spec.kind == "histogram":
                self._metrics[spec] = Histogram(
                    name, spec.help, labels, registry=None, buckets=spec.buckets
                )
            else:
                self._metrics[spec] = Gauge(
                    name,
                    spec.help,
                    labels,
                    registry=None,
                    multiprocess_mode="livemax" if spec in _LIVEMAX else "livesum",
                )
        self._last: dict[SeriesKey, float | HistogramSnapshot] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @classmethod
    def start(cls, registry: CollectorRegistry, interval: float = 1.0) -> MultiprocessPusher:
        """The process's pusher, started once (and again in each forked child)."""
        del registry  # the merged page is made from the files, not from this registry
        with cls._instance_lock:
            if cls._instance is None:
                pusher = cls(interval)
                cls._instance = pusher
                pusher._run_thread()
                os.register_at_fork(after_in_child=pusher._after_fork)
                atexit.register(pusher.push)
            return cls._instance

    def _run_thread(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="poolwatch-push", daemon=True)
        self._thread.start()

    def _after_fork(self) -> None:
        # A forked worker starts with empty files of its own and no threads.
        self._lock = threading.Lock()
        self._last = {}
        self._run_thread()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.push()

    def push(self) -> None:
        """Copy every pool's figures into this process's files now."""
        with self._lock:
            seen: set[SeriesKey] = set()
            for watch in _api.watches():
                try:
                    for spec, labels, value in samples(watch.snapshot()):
                        key = (spec, labels)
                        seen.add(key)
                        self._write(spec, labels, value, self._last.get(key))
                        self._last[key] = value
                except Exception as exc:
                    report_internal_error("prometheus multiprocess push", exc)
            for key in [k for k in self._last if k not in seen]:
                spec, labels = key
                if spec.kind == "gauge":  # a pool that went away: its gauges drop to 0
                    self._metrics[spec].labels(*labels).set(0)
                del self._last[key]

    def _write(
        self,
        spec: c.MetricSpec,
        labels: tuple[str, ...],
        value: float | HistogramSnapshot,
        last: float | HistogramSnapshot | None,
    ) -> None:
        child = self._metrics[spec].labels(*labels)
        if spec.kind == "gauge":
            child.set(value)
        elif spec.kind == "counter":
            assert not isinstance(value, HistogramSnapshot)
            previous = last if isinstance(last, int | float) else 0
            if value > previous:
                child.inc(value - previous)
        else:
            assert isinstance(value, HistogramSnapshot)
            before = last if isinstance(last, HistogramSnapshot) else None
            _add_histogram_delta(child, value, before)


def _add_histogram_delta(
    child: Any, now: HistogramSnapshot, before: HistogramSnapshot | None
) -> None:
    buckets = getattr(child, "_buckets", None)
    total = getattr(child, "_sum", None)
    if buckets is None or total is None or len(buckets) != len(now.counts):
        raise RuntimeError("prometheus_client's Histogram has no _buckets/_sum of the known shape")
    for i, n in enumerate(now.counts):
        delta = n - (before.counts[i] if before is not None else 0)
        if delta > 0:
            buckets[i].inc(delta)
    delta_sum = now.sum - (before.sum if before is not None else 0.0)
    if delta_sum:
        total.inc(delta_sum)
