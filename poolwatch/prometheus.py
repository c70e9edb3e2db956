"""Prometheus export: every instrumented pool on a prometheus_client registry.

    poolwatch.prometheus.enable()                 # the default registry
    poolwatch.prometheus.start_http_server(9464)  # serves /metrics on 127.0.0.1

In one process, a collector reads every pool at scrape time: nothing is exported on the
request path. Under prometheus_client's multiprocess mode (``PROMETHEUS_MULTIPROC_DIR`` set,
gunicorn or uvicorn workers), custom collectors are not supported, so each worker instead
copies its pools' figures into multiprocess metrics once a second, with gauge modes that add
up across workers (see ``_multiprocess.py``).
"""

from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Iterable
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client import start_http_server as _prometheus_start_http_server
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.samples import Sample

from . import _api
from ._catalogue import CATALOGUE, MetricSpec
from ._histogram import HistogramSnapshot
from ._safety import report_internal_error
from ._samples import samples

__all__ = ["PoolCollector", "enable", "start_http_server"]

_lock = threading.Lock()
#: Registries poolwatch is on (weakly: a collected registry's id may come back).
_enabled: weakref.WeakKeyDictionary[CollectorRegistry, object] = weakref.WeakKeyDictionary()


class PoolCollector:
    """A prometheus_client collector for every instrumented pool, present and future.

    Label dictionaries are built once per series and reused by every scrape (prometheus_client
    only reads them); most of a scrape's cost is prometheus_client formatting the text.
    """

    def __init__(self) -> None:
        self._labels: dict[tuple[MetricSpec, tuple[str, ...]], _SeriesLabels] = {}

    def describe(self) -> Iterable[Metric]:
        """Empty families, so registering never reads a pool."""
        return [_family(spec) for spec in CATALOGUE]

    def collect(self) -> Iterable[Metric]:
        families = {spec: _family(spec) for spec in CATALOGUE}
        seen: set[tuple[MetricSpec, tuple[str, ...]]] = set()
        for watch in _api.watches():
            try:
                for s in samples(watch.snapshot()):
                    key = (s.spec, s.labels)
                    seen.add(key)
                    labels = self._labels.get(key)
                    if labels is None:
                        labels = self._labels[key] = _SeriesLabels(s.spec, s.labels)
                    labels.add_to(families[s.spec], s.value)
            except Exception as exc:  # a failing pool never fails the scrape
                report_internal_error("prometheus collect", exc)
        if len(self._labels) > 2 * len(seen) + 1024:  # series of pools long gone
            self._labels = {k: v for k, v in self._labels.items() if k in seen}
        return list(families.values())


class _SeriesLabels:
    """One series' label dicts (with ``le`` for each bucket of a histogram), built once."""

    __slots__ = ("buckets", "labels", "name")

    def __init__(self, spec: MetricSpec, values: tuple[str, ...]) -> None:
        self.name = spec.prometheus_name
        self.labels = dict(zip(spec.labels, values, strict=True))
        self.buckets = [
            {**self.labels, "le": _le(bound)} for bound in (*spec.buckets, float("inf"))
        ]

    def add_to(self, family: Metric, value: float | HistogramSnapshot) -> None:
        if not isinstance(value, HistogramSnapshot):
            family.samples.append(Sample(self.name, self.labels, value))
            return
        out = family.samples
        bucket = self.name + "_bucket"
        running = 0
        for labels, n in zip(self.buckets, value.counts, strict=True):
            running += n
            out.append(Sample(bucket, labels, running))
        out.append(Sample(self.name + "_count", self.labels, running))
        out.append(Sample(self.name + "_sum", self.labels, value.sum))


def enable(registry: CollectorRegistry | None = None) -> None:
    """Make every instrumented pool, present and future, appear on ``registry``.

    Args:
        registry: prometheus_client's default registry when ``None``.

    Calling it again (for the same registry) does nothing. With ``PROMETHEUS_MULTIPROC_DIR``
    set, figures are written to the multiprocess files instead, for
    ``prometheus_client.multiprocess.MultiProcessCollector`` to merge at scrape time.
    """
    registry = REGISTRY if registry is None else registry
    with _lock:
        if registry in _enabled:
            return
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            from ._multiprocess import MultiprocessPusher  # noqa: PLC0415

            _enabled[registry] = MultiprocessPusher.start(registry)
            return
        collector = PoolCollector()
        registry.register(collector)
        _enabled[registry] = collector


def start_http_server(
    port: int, addr: str = "127.0.0.1", registry: CollectorRegistry | None = None
) -> tuple[Any, threading.Thread]:
    """Serve ``/metrics`` on ``addr:port`` (loopback unless told otherwise), pools enabled.

    Returns prometheus_client's (server, thread); ``server.server_address[1]`` is the port
    when ``port`` is 0. Under multiprocess mode the page merges every worker's files.
    """
    registry = REGISTRY if registry is None else registry
    enable(registry)
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR") and registry is REGISTRY:
        from prometheus_client import multiprocess  # noqa: PLC0415

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    server, thread = _prometheus_start_http_server(port, addr=addr, registry=registry)
    return server, thread


def _family(spec: MetricSpec) -> Metric:
    labels = list(spec.labels)
    if spec.kind == "counter":
        return CounterMetricFamily(spec.exposition_name, spec.help, labels=labels)
    if spec.kind == "histogram":
        return HistogramMetricFamily(spec.exposition_name, spec.help, labels=labels)
    return GaugeMetricFamily(spec.exposition_name, spec.help, labels=labels)


def _le(bound: float) -> str:
    """A bucket bound as Prometheus writes it: ``+Inf``, ``0.5``, ``1.0``."""
    return "+Inf" if bound == float("inf") else repr(float(bound))
