"""OpenTelemetry export: pool metrics and per-request spans through the OTel providers.

    poolwatch.otel.enable()          # the global MeterProvider and TracerProvider

Metrics use the semantic-convention names where one exists (``http.client.open_connections``,
``http.client.active_requests``, ``http.client.request.time_in_queue``,
``http.client.connection.duration``) and ``poolwatch.*`` otherwise. Gauges and counters are
observable instruments, read at collection time. OTel has no observable histogram, so the
histograms get one value per request; poolwatch hands them to the SDK off the request path,
in batches: from a background thread once a second, and when a collection begins (so it
sees every value until then), each value with the context of the request it came from (the
SDK's exemplars link to that request's trace). Run in a loop, the SDK's ``record()`` costs
~10 µs a call here; between a request's own work, with its code and data gone cold, more
(``bench/paired.py``, httpx2 at C=1: 11 to 37 µs less per request in all). Only a backlog of
``_RECORD_AT`` values, should the thread fall behind, is recorded on the request path.

Spans: when another instrumentation already made the HTTP CLIENT span of the request
(opentelemetry-instrumentation-httpx, or a span of the caller's with ``http.request.method``),
poolwatch never makes a second one. It adds to that span: attributes for the queue wait,
reuse, connect and TLS time, and an INTERNAL child span ``wait_for_connection`` (as .NET
does) for requests that waited at least 5 ms. Otherwise poolwatch makes the CLIENT span
itself: it starts when the request enters the pool and **ends when the response is closed**,
so a streamed LLM response's span covers the whole stream (minutes);
``poolwatch.request.time_to_first_byte`` says when the headers came. A cancellation is not an
error. The span is handed to the SDK whole when the response closes (with the start time and
the parent context of the request's start): one call with every attribute, where starting it
early and adding to it costs a second call per span, and span processors see it only then.
"""

from __future__ import annotations

import inspect
import os
import threading
import time
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

from opentelemetry import context, metrics, trace
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.trace import SpanKind, Status, StatusCode

from . import _api
from . import _catalogue as c
from ._core import OriginStats, RequestRecord
from ._histogram import HistogramSnapshot
from ._redact import FORBIDDEN_HEADERS, redact_url
from ._safety import logger, report_internal_error
from ._samples import Sample, every_pool
from ._version import __version__
from ._watch import ClientWatch

__all__ = ["enable"]

_KNOWN_METHODS = frozenset(
    {"CONNECT", "DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT", "TRACE"}
)
_ATTRIBUTE_CACHE_SIZE = 4096

#: Queue waits shorter than this get attributes but no ``wait_for_connection`` child span.
#: httpcore 1.x yields to the event loop once even when a connection is free, so on a busy
#: loop a request "waits" a few milliseconds that say nothing about the pool.
WAIT_SPAN_THRESHOLD = 0.005

#: How often the background thread hands the waiting histogram values to the SDK.
_RECORD_INTERVAL = 1.0
#: Waiting values at which a request records them itself (the thread fell behind).
_RECORD_AT = 4096

_lock = threading.Lock()
_enabled: list[_OtelExporter] = []


def enable(
    meter_provider: metrics.MeterProvider | None = None,
    tracer_provider: trace.TracerProvider | None = None,
    *,
    spans: bool = True,
    request_histograms: bool = False,
    request_headers: Sequence[str] = (),
    sensitive_query_parameters: Sequence[str] = (),
) -> None:
    """Export every instrumented pool, present and future, through OpenTelemetry.

    Args:
        meter_provider: the global one when ``None``.
        tracer_provider: the global one when ``None``.
        spans: make (or enrich) a span per request.
        request_histograms: also record ``poolwatch.request.time_to_first_byte`` and
            ``poolwatch.request.duration``. Off by default: each costs the OTel SDK a
            ``record()`` per request (~8-11 µs here, in poolwatch's batches), and the HTTP
            instrumentation's ``http.client.request.duration`` usually covers them
            (Prometheus always has them: there they cost nothing on the request path).
        request_headers: request headers to record as ``http.request.header.<name>``;
            ``authorization``, ``x-api-key``, ``cookie`` and ``set-cookie`` never are.
        sensitive_query_parameters: more query keys whose values ``url.full`` redacts.

    Calling it again with the same providers does nothing (with other options, it says so in
    the log: the first call's options stay).
    """
    headers = tuple(h.lower() for h in request_headers)
    refused = sorted(set(headers) & FORBIDDEN_HEADERS)
    if refused:
        raise ValueError(f"poolwatch never records credential headers: {', '.join(refused)}")
    options = _Options(spans, request_histograms, headers, tuple(sensitive_query_parameters))
    with _lock:
        for exporter in _enabled:
            if (
                exporter.meter_provider is meter_provider
                and exporter.tracer_provider is tracer_provider
            ):
                if exporter.options != options:
                    logger.warning(
                        "poolwatch: otel.enable() was called again for the same providers with "
                        "other options (%s); the first call's stay in force (%s)",
                        options.differences(exporter.options),
                        exporter.options.differences(options),
                    )
                return
        exporter = _OtelExporter(meter_provider, tracer_provider, options)
        _enabled.append(exporter)
        _recorder.ensure_running()
    _api.subscribe(exporter.attach)
    for watch in _api.watches():
        exporter.attach(watch)


class _Options(NamedTuple):
    """What ``enable()`` was asked for, beyond the providers."""

    spans: bool
    request_histograms: bool
    request_headers: tuple[str, ...]
    sensitive_query_parameters: tuple[str, ...]

    def differences(self, other: _Options) -> str:
        """This side of what differs from ``other``, as ``name=value`` pairs."""
        return ", ".join(
            f"{name}={mine!r}"
            for name, mine, theirs in zip(self._fields, self, other, strict=True)
            if mine != theirs
        )


class _OtelExporter:
    def __init__(
        self,
        meter_provider: metrics.MeterProvider | None,
        tracer_provider: trace.TracerProvider | None,
        options: _Options,
    ) -> None:
        self.meter_provider = meter_provider
        self.tracer_provider = tracer_provider
        self.options = options
        spans, request_histograms, request_headers, sensitive_keys = options
        provider = meter_provider or metrics.get_meter_provider()
        meter = provider.get_meter("poolwatch", __version__)
        self._tracer = (tracer_provider or trace.get_tracer_provider()).get_tracer(
            "poolwatch", __version__
        )
        self._spans = spans
        self._request_histograms = request_histograms
        self._request_headers = request_headers
        self._sensitive_keys = sensitive_keys
        self._reading_lock = threading.Lock()
        #: The observations of one reading of every pool, by metric, and the metrics whose
        #: callback has had them: a collection calls each callback once, so a callback asking
        #: again means a new collection (of this reader or another), which reads anew.
        self._reading: dict[c.MetricSpec, list[Observation]] = {}
        self._served: set[c.MetricSpec] | None = None
        #: Attribute dicts by (pool, scheme, address, port): built once, reused per request.
        self._attributes: dict[tuple[str, str, str, int], dict[str, Any]] = {}
        self._watches: list[ClientWatch] = []
        for spec in c.CATALOGUE:
            if spec.kind == "histogram":
                continue
            make = {
                "counter": meter.create_observable_counter,
                "gauge": meter.create_observable_gauge
                if spec.unit in ("s", "1")
                else meter.create_observable_up_down_counter,
            }[spec.kind]
            make(
                spec.otel_name,
                callbacks=[self._callback(spec)],
                unit=spec.unit,
                description=spec.help,
            )
        self._histograms = {
            spec: meter.create_histogram(
                spec.otel_name,
                unit=spec.unit,
                description=spec.help,
                explicit_bucket_boundaries_advisory=list(spec.buckets),
            )
            for spec in c.CATALOGUE
            if spec.kind == "histogram"
        }
        #: (histogram, value, attributes, the request's context), not yet recorded.
        self._pending: list[tuple[Any, float, dict[str, Any], context.Context]] = []
        self._pending_lock = threading.Lock()
        histogram = next(iter(self._histograms.values()))
        self._record_takes_context = "context" in inspect.signature(histogram.record).parameters

    # -- metrics ---------------------------------------------------------------------------

    def _record(self, spec: c.MetricSpec, value: float, attributes: dict[str, Any]) -> None:
        """Hand a histogram value to the SDK with the next batch (see the module's doc)."""
        pending = self._pending
        pending.append((self._histograms[spec], value, attributes, context.get_current()))
        if len(pending) >= _RECORD_AT:
            self.record_pending()

    def record_pending(self) -> None:
        """Record the waiting histogram values now (a collection is beginning)."""
        with self._pending_lock:  # appends need no lock: values after the copy stay
            batch = self._pending[:]
            del self._pending[: len(batch)]
        with_context = self._record_takes_context
        for histogram, value, attributes, ctx in batch:
            try:
                if with_context:
                    histogram.record(value, attributes, context=ctx)
                else:  # an OTel API older than 1.28: the collection's context
                    histogram.record(value, attributes)
            except Exception as exc:
                report_internal_error("otel histogram record", exc)

    def forget_pending(self) -> None:
        self._pending_lock = threading.Lock()
        self._pending.clear()

    def _observations(self, spec: c.MetricSpec) -> list[Observation]:
        """``spec``'s observations, from one reading of every pool per collection."""
        with self._reading_lock:
            served = self._served
            if served is None or spec in served:
                # A collection begins: its histograms too must hold every value until now.
                self.record_pending()
                self._reading = _observations_by_metric(every_pool("otel collect"))
                served = self._served = set()
            served.add(spec)
            return self._reading.get(spec, [])

    def _callback(self, spec: c.MetricSpec) -> Any:
        def observe(options: CallbackOptions) -> Iterable[Observation]:
            del options
            try:
                return self._observations(spec)
            except Exception as exc:
                report_internal_error("otel callback", exc)
                return []

        return observe

    # -- per request -----------------------------------------------------------------------

    def attach(self, watch: ClientWatch) -> None:
        """Hook into a watch's requests: histograms always, spans if asked for."""
        hooks = watch.hooks
        name = watch.name
        pool_attributes = {"pool.name": name}  # the request phases are pool-wide
        chained_start = hooks.on_start
        chained_headers = hooks.on_headers
        chained_finish = hooks.on_finish
        chained_closed = hooks.on_connection_closed

        def on_start(rec: RequestRecord, request: Any) -> None:
            if chained_start is not None:
                chained_start(rec, request)
            self._on_start(rec, request, name)

        def on_headers(rec: RequestRecord) -> None:
            if chained_headers is not None:
                chained_headers(rec)
            self._record_phases(rec, name, pool_attributes)
            if self._request_histograms and rec.t_headers is not None and rec.t_ready is not None:
                self._record(c.TIME_TO_FIRST_BYTE, rec.t_headers - rec.t_ready, pool_attributes)
            if self._spans:
                self._on_headers(rec)

        def on_finish(rec: RequestRecord) -> None:
            if chained_finish is not None:
                chained_finish(rec)
            self._on_finish(rec, name, pool_attributes)

        def on_connection_closed(origin: OriginStats, lifetime: float) -> None:
            if chained_closed is not None:
                chained_closed(origin, lifetime)
            self._record(c.CONNECTION_DURATION, lifetime, self._origin_attributes(origin, name))

        hooks.on_finish = on_finish
        hooks.on_headers = on_headers
        hooks.on_connection_closed = on_connection_closed
        if self._spans:
            hooks.on_start = on_start

    def _origin_attributes(self, origin: OriginStats, pool_name: str) -> dict[str, Any]:
        key = (pool_name, origin.scheme, origin.address, origin.port)
        attributes = self._attributes.get(key)
        if attributes is None:
            if len(self._attributes) >= _ATTRIBUTE_CACHE_SIZE:
                self._attributes.clear()  # pools come and go; stay bounded
            attributes = {
                "pool.name": pool_name,
                "server.address": origin.address,
                "server.port": origin.port,
                "url.scheme": origin.scheme,
            }
            self._attributes[key] = attributes
        return attributes

    def _state(self, rec: RequestRecord) -> _Enriched | _Owned | None:
        """This exporter's span state of a request (several exporters may be enabled)."""
        states = rec.extra
        if states is None:
            return None
        state: _Enriched | _Owned | None = states.get(self)
        return state

    def _take_state(self, rec: RequestRecord) -> _Enriched | _Owned | None:
        """This exporter's state of a request that is over, removed from it: the record may
        wait a while to be counted (``PoolCore.finish()``), the parent context need not."""
        states = rec.extra
        if states is None:
            return None
        state: _Enriched | _Owned | None = states.pop(self, None)
        if not states:
            rec.extra = None
        return state

    def _set_state(self, rec: RequestRecord, state: _Enriched | _Owned) -> None:
        """``rec.extra`` is the exporters' dict of states, by exporter (only they set it)."""
        states = rec.extra
        if states is None:
            rec.extra = {self: state}
        else:
            states[self] = state

    def _on_start(self, rec: RequestRecord, request: Any, pool_name: str) -> None:
        parent = context.get_current()
        current = trace.get_current_span(parent)
        if current.is_recording() and _is_http_client_span(current):
            self._set_state(rec, _Enriched(current, pool_name))
            return
        method, url = _method_and_url(request)
        attributes: dict[str, Any] = {
            "http.request.method": method if method in _KNOWN_METHODS else "_OTHER",
            "server.address": rec.origin.address,
            "server.port": rec.origin.port,
            "url.full": redact_url(url, self._sensitive_keys),
        }
        if method not in _KNOWN_METHODS:
            attributes["http.request.method_original"] = method
        for name in self._request_headers:
            value = _header(request, name)
            if value is not None:
                attributes[f"http.request.header.{name}"] = [value]
        name = method if method in _KNOWN_METHODS else "HTTP"
        self._set_state(rec, _Owned(pool_name, name, attributes, parent))

    def _on_headers(self, rec: RequestRecord) -> None:
        state = self._state(rec)
        if isinstance(state, _Enriched):
            # The other instrumentation ends its span when the headers are in: add now.
            state.span.set_attributes(_pool_attributes(rec, state.pool_name))
            self._wait_span(state.span, rec)

    def _record_phases(
        self, rec: RequestRecord, pool_name: str, pool_attributes: dict[str, Any]
    ) -> None:
        queue = rec.queue_time
        if queue is not None:
            self._record(c.TIME_IN_QUEUE, queue, self._origin_attributes(rec.origin, pool_name))
        if rec.connect_time is not None:
            self._record(c.CONNECT_TIME, rec.connect_time, pool_attributes)
        if rec.tls_time is not None:
            self._record(c.TLS_TIME, rec.tls_time, pool_attributes)

    def _on_finish(
        self, rec: RequestRecord, pool_name: str, pool_attributes: dict[str, Any]
    ) -> None:
        if rec.t_headers is None:  # never got a response: the phases are known only now
            self._record_phases(rec, pool_name, pool_attributes)
        if self._request_histograms and rec.t_end is not None:
            self._record(c.REQUEST_DURATION, rec.t_end - rec.t_start, pool_attributes)
        state = self._take_state(rec)
        if isinstance(state, _Owned):
            # The span is made now, with everything learnt since the start in one go: the
            # SDK's cost is per call and per attribute. Its start time and parent are the
            # request's (the context it started in), as if it had been open all along.
            attributes = state.attributes
            attributes.update(_pool_attributes(rec, state.pool_name))
            if rec.status is not None:
                attributes["http.response.status_code"] = rec.status
            if rec.http_version is not None:
                attributes["network.protocol.version"] = rec.http_version
            error = None
            if rec.error_type is not None and rec.error_type != "cancelled":
                error = rec.error_type
            elif rec.status is not None and rec.status >= 400:
                error = str(rec.status)
            if error is not None:
                attributes["error.type"] = error
            span = self._tracer.start_span(
                state.name,
                context=state.parent,
                kind=SpanKind.CLIENT,
                attributes=attributes,
                start_time=_ns(rec.t_start),
            )
            if error is not None:
                span.set_status(Status(StatusCode.ERROR))
            self._wait_span(span, rec)
            span.end(end_time=_ns(rec.t_end))

    def _wait_span(self, parent: Any, rec: RequestRecord) -> None:
        queue = rec.queue_time
        if queue is None or queue < WAIT_SPAN_THRESHOLD or rec.t_queue_end is None:
            return
        span = self._tracer.start_span(
            "wait_for_connection",
            context=trace.set_span_in_context(parent),
            kind=SpanKind.INTERNAL,
            start_time=_ns(rec.t_start),
            attributes={"server.address": rec.origin.address, "server.port": rec.origin.port},
        )
        span.end(end_time=_ns(rec.t_queue_end))


class _Recorder:
    """The daemon thread that hands every exporter's waiting histogram values to the SDK."""

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._fork_hook = False

    def ensure_running(self) -> None:
        with self._lock:
            if self._thread is not None and self._thread.is_alive():
                return
            self._thread = threading.Thread(target=self._loop, name="poolwatch-otel", daemon=True)
            self._thread.start()
            if not self._fork_hook:
                os.register_at_fork(after_in_child=self._after_fork)
                self._fork_hook = True

    def _after_fork(self) -> None:
        # The values waiting are the parent's requests, recorded by the parent; a forked
        # worker starts without them, and without threads (so no lock is taken here: one
        # held by another thread at the fork would stay held).
        exporters = list(_enabled)
        for exporter in exporters:
            exporter.forget_pending()
        self._lock = threading.Lock()
        self._thread = None
        if exporters:
            self.ensure_running()

    @staticmethod
    def _loop() -> None:
        while True:
            time.sleep(_RECORD_INTERVAL)
            # Copied without ``_lock`` (one C call under the GIL): a fork while this thread
            # held it would leave it held in the child, and its next ``enable()`` waiting.
            for exporter in list(_enabled):
                try:
                    exporter.record_pending()
                except Exception as exc:
                    report_internal_error("otel histogram recorder", exc)


_recorder = _Recorder()


class _Enriched:
    """Another instrumentation's CLIENT span, which poolwatch adds to."""

    __slots__ = ("pool_name", "span")

    def __init__(self, span: Any, pool_name: str) -> None:
        self.span = span
        self.pool_name = pool_name


class _Owned:
    """poolwatch's own CLIENT span, to be made when the response closes: its name, the
    attributes known at the start, and the context the request started in (its parent)."""

    __slots__ = ("attributes", "name", "parent", "pool_name")

    def __init__(
        self, pool_name: str, name: str, attributes: dict[str, Any], parent: context.Context
    ) -> None:
        self.pool_name = pool_name
        self.name = name
        self.attributes = attributes
        self.parent = parent


def _pool_attributes(rec: RequestRecord, pool_name: str) -> dict[str, Any]:
    attributes: dict[str, Any] = {"poolwatch.pool.name": pool_name}
    queue = rec.queue_time
    if queue is not None:
        attributes["http.client.request.time_in_queue"] = queue
    reused = rec.reused
    if reused is not None:
        attributes["poolwatch.connection.reused"] = reused
    if rec.connect_time is not None:
        attributes["poolwatch.connection.connect_time"] = rec.connect_time
    if rec.tls_time is not None:
        attributes["poolwatch.connection.tls_time"] = rec.tls_time
    if rec.t_headers is not None and rec.t_ready is not None:
        attributes["poolwatch.request.time_to_first_byte"] = rec.t_headers - rec.t_ready
    return attributes


def _is_http_client_span(span: Any) -> bool:
    if getattr(span, "kind", None) is not SpanKind.CLIENT:
        return False
    attributes = getattr(span, "attributes", None) or {}
    return "http.request.method" in attributes or "http.method" in attributes


def _method_and_url(request: Any) -> tuple[str, str]:
    method = request.method
    if isinstance(method, bytes):  # an httpcore Request
        url = request.url
        key = (method, url.scheme, url.host, url.port)
        known = _REQUEST_LINES.get(key)
        if known is None:
            if len(_REQUEST_LINES) >= _ATTRIBUTE_CACHE_SIZE:
                _REQUEST_LINES.clear()  # stay bounded
            port = f":{url.port}" if url.port is not None else ""
            host = url.host.decode()
            if ":" in host:  # an IPv6 address
                host = f"[{host}]"
            known = _REQUEST_LINES[key] = (method.decode(), f"{url.scheme.decode()}://{host}{port}")
        return known[0], known[1] + url.target.decode()
    return str(method), str(request.url)


#: (method, URL up to the path) by httpcore's (method, scheme, host, port): per origin, once.
_REQUEST_LINES: dict[tuple[bytes, bytes, bytes, int | None], tuple[str, str]] = {}


def _header(request: Any, name: str) -> str | None:
    for key, value in request.headers if isinstance(request.headers, list) else request.headers.raw:
        k = key.decode("latin-1") if isinstance(key, bytes) else key
        if k.lower() == name:
            return value.decode("latin-1") if isinstance(value, bytes) else str(value)
    return None


def _observations_by_metric(samples: Iterable[Sample]) -> dict[c.MetricSpec, list[Observation]]:
    """The gauges' and counters' samples as OTel observations (histograms are recorded per
    request: OTel has no observable histogram)."""
    out: dict[c.MetricSpec, list[Observation]] = {}
    for spec, labels, value in samples:
        if isinstance(value, HistogramSnapshot):
            continue
        attributes = dict(zip(spec.attributes, _typed(spec, labels), strict=True))
        out.setdefault(spec, []).append(Observation(value, attributes))
    return out


def _typed(spec: c.MetricSpec, labels: tuple[str, ...]) -> list[Any]:
    """Label strings as OTel attribute values (``server.port`` is an int)."""
    return [
        int(v) if a == "server.port" and v.isdigit() else v
        for a, v in zip(spec.attributes, labels, strict=True)
    ]


# perf_counter readings to epoch nanoseconds, for span timestamps.
_EPOCH_OFFSET = time.time() - time.perf_counter()


def _ns(t: float | None) -> int | None:
    if t is None:
        return None
    return int((t + _EPOCH_OFFSET) * 1e9)
