"""Prometheus export: every instrumented pool on a prometheus_client registry.

    poolwatch.prometheus.enable()                 # the default registry
    poolwatch.prometheus.start_http_server(9464)  # serves /metrics on 127.0.0.1

In one process, a collector reads every pool at scrape time: nothing is exported on the
request path. Whatever renders the registry (prometheus_client's ``generate_latest``, a
framework's ``/metrics`` route) sees the pools through that collector. poolwatch's own
``start_http_server`` and ``generate_latest`` write the pools' part of the page themselves,
15-25 times faster than prometheus_client's formatter (``_exposition.py``), and the rest
of the registry through prometheus_client.

Under prometheus_client's multiprocess mode (``PROMETHEUS_MULTIPROC_DIR`` set, gunicorn or
uvicorn workers), custom collectors are not supported, so each worker instead copies its
pools' figures into multiprocess metrics once a second, with gauge modes that add up across
workers (see ``_multiprocess.py``).
"""

from __future__ import annotations

import gzip
import os
import socket
import threading
import weakref
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from typing import Any
from urllib.parse import parse_qs
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client import start_http_server as _prometheus_start_http_server
from prometheus_client.exposition import choose_encoder, gzip_accepted
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.samples import Sample

from . import _api
from ._catalogue import CATALOGUE, MetricSpec
from ._exposition import Exposition
from ._histogram import HistogramSnapshot
from ._safety import report_internal_error
from ._samples import every_snapshot, samples

__all__ = ["PoolCollector", "enable", "generate_latest", "start_http_server"]

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
        if getattr(_writing_pools_natively, "active", False):
            return []  # poolwatch writes the pools itself on this render (see _render)
        families = {spec: _family(spec) for spec in CATALOGUE}
        seen: set[tuple[MetricSpec, tuple[str, ...]]] = set()
        for watch in _api.watches():
            try:
                for spec, values, value in samples(watch.snapshot()):
                    key = (spec, values)
                    seen.add(key)
                    labels = self._labels.get(key)
                    if labels is None:
                        labels = self._labels[key] = _SeriesLabels(spec, values)
                    labels.add_to(families[spec], value)
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


def generate_latest(registry: CollectorRegistry | None = None) -> bytes:
    """``prometheus_client.generate_latest(registry)``, with the pools written by poolwatch.

    The same page (text format 0.0.4), 15-25 times faster to make when many pools and
    origins are watched: serve it from a framework's own ``/metrics`` route with
    ``prometheus_client.CONTENT_TYPE_PLAIN_0_0_4``. On a registry poolwatch is not enabled
    on, or under multiprocess mode, it is prometheus_client's page.
    """
    body, _content_type = _render(REGISTRY if registry is None else registry, "")
    return body


def start_http_server(
    port: int, addr: str = "127.0.0.1", registry: CollectorRegistry | None = None
) -> tuple[WSGIServer, threading.Thread]:
    """Serve ``/metrics`` on ``addr:port`` (loopback unless told otherwise), pools enabled.

    Returns the (server, thread); ``server.server_address[1]`` is the port when ``port`` is
    0, ``server.shutdown()`` stops it. The page is negotiated as prometheus_client's own server
    does (OpenMetrics when the scraper asks for it, as Prometheus does; gzip when accepted).
    Under multiprocess mode the page merges every worker's files.
    """
    registry = REGISTRY if registry is None else registry
    enable(registry)
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        if registry is REGISTRY:
            from prometheus_client import multiprocess  # noqa: PLC0415

            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        server, thread = _prometheus_start_http_server(port, addr=addr, registry=registry)
        return server, thread

    class Server(_ThreadingWSGIServer):
        address_family = socket.AF_INET6 if ":" in addr else socket.AF_INET

    httpd = make_server(addr, port, _metrics_app(registry), Server, _QuietHandler)
    thread = threading.Thread(
        target=httpd.serve_forever, name="poolwatch-metrics-server", daemon=True
    )
    thread.start()
    return httpd, thread


#: Set while poolwatch renders a registry and writes the pools itself.
_writing_pools_natively = threading.local()
_exposition = Exposition()
_OPENMETRICS_EOF = b"# EOF\n"


def _render(registry: CollectorRegistry, accept: str) -> tuple[bytes, str]:
    """The registry's page in the format ``accept`` asks for, and its content type."""
    encoder, content_type = choose_encoder(accept)
    if not isinstance(_enabled.get(registry), PoolCollector):
        return encoder(registry), content_type
    openmetrics = content_type.startswith("application/openmetrics-text")
    _writing_pools_natively.active = True
    try:
        rest = encoder(registry)
    finally:
        _writing_pools_natively.active = False
    before: bytes | memoryview = rest
    end = b""
    if openmetrics and rest.endswith(_OPENMETRICS_EOF):
        before, end = memoryview(rest)[: -len(_OPENMETRICS_EOF)], _OPENMETRICS_EOF
    try:
        page = _exposition.render(
            every_snapshot("prometheus collect"), openmetrics=openmetrics, before=before, after=end
        )
    except Exception as exc:  # poolwatch's own writer failed: prometheus_client writes it all
        report_internal_error("prometheus render", exc)  # (and collects the rest once more)
        return encoder(registry), content_type
    return page, content_type


_WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


def _metrics_app(registry: CollectorRegistry) -> _WSGIApp:
    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if environ.get("PATH_INFO") == "/favicon.ico":
            start_response("200 OK", [])
            return [b""]
        params = parse_qs(environ.get("QUERY_STRING", ""))
        accept = environ.get("HTTP_ACCEPT", "")
        if "name[]" in params:  # a filtered page: prometheus_client filters by sample name
            encoder, content_type = choose_encoder(accept)
            body = encoder(registry.restricted_registry(params["name[]"]))
        else:
            body, content_type = _render(registry, accept)
        headers = [("Content-Type", content_type)]
        if gzip_accepted(environ.get("HTTP_ACCEPT_ENCODING", "")):
            body = gzip.compress(
                body, compresslevel=1
            )  # level 1: 5x faster than 9, ~same size here
            headers.append(("Content-Encoding", "gzip"))
        start_response("200 OK", headers)
        return [body]

    return app


class _ThreadingWSGIServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass  # no access log on the host's stderr


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
