"""The OpenTelemetry exporter against the SDK's own readers and exporters, after real traffic
on the loopback server: every catalogue metric with the snapshot's figures, one CLIENT span
per request (poolwatch's own, or the httpx instrumentation's enriched), and OTLP end to end
into real gRPC and HTTP/protobuf receivers. Each scenario runs on httpx and httpx2."""

from __future__ import annotations

import gc
import importlib
import logging
import os
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import anyio
import pytest
from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import (
    OTLPMetricExporter as GrpcMetricExporter,
)
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
    OTLPSpanExporter as GrpcSpanExporter,
)
from opentelemetry.exporter.otlp.proto.http.metric_exporter import (
    OTLPMetricExporter as HttpMetricExporter,
)
from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
    OTLPSpanExporter as HttpSpanExporter,
)
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    Gauge,
    Histogram,
    InMemoryMetricReader,
    Metric,
    PeriodicExportingMetricReader,
    Sum,
)
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from otlp_receivers import GrpcOtlpReceiver, HttpOtlpReceiver, OtlpReceiver, attributes_of
from truth import await_until, wait_until

import poolwatch
import poolwatch.otel
from poolwatch import _api
from poolwatch import _catalogue as c
from poolwatch._histogram import HistogramSnapshot
from poolwatch._loopback import LoopbackServer
from poolwatch._redact import redact_url
from poolwatch._samples import samples
from poolwatch._watch import ClientWatch

POOLWATCH_SCOPE = "poolwatch"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(autouse=True)
def _forget_this_tests_exporters() -> Iterator[None]:
    """Restore ``poolwatch.otel``'s process-wide state after each test.

    ``enable()`` keeps every exporter for the life of the process and subscribes it to every
    client instrumented later. Two exporters on one request share the request's span slot
    (see ``test_two_tracer_providers_each_get_one_ended_span_per_request``), so an earlier
    test's exporter would end, or annotate, this test's spans. Each test here enables its
    own providers; this forgets them afterwards so the next test starts clean.
    """
    enabled = list(poolwatch.otel._enabled)
    listeners = list(_api._listeners)
    yield
    with poolwatch.otel._lock:
        poolwatch.otel._enabled[:] = enabled
    with _api._lock:
        _api._listeners[:] = listeners


@dataclass
class Otel:
    """One test's own SDK providers, enabled for poolwatch (never the global ones)."""

    meter_provider: MeterProvider
    tracer_provider: TracerProvider
    reader: InMemoryMetricReader
    exporter: InMemorySpanExporter

    def metrics(self, pool: str) -> dict[str, Metric]:
        """poolwatch's metrics, reduced to ``pool``'s data points (other tests' live pools
        are in the process too)."""
        return collect(self.reader, pool)

    def spans(self) -> list[ReadableSpan]:
        return list(self.exporter.get_finished_spans())


def make_otel(**enable_options: Any) -> Otel:
    reader = InMemoryMetricReader()
    meter_provider = MeterProvider(metric_readers=[reader])
    exporter = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
    poolwatch.otel.enable(meter_provider, tracer_provider, **enable_options)
    return Otel(meter_provider, tracer_provider, reader, exporter)


@pytest.fixture
def otel() -> Iterator[Otel]:
    """Everything on, so that every catalogue metric can be checked."""
    o = make_otel(request_histograms=True)
    yield o
    o.meter_provider.shutdown()
    o.tracer_provider.shutdown()


def collect(reader: InMemoryMetricReader, pool: str) -> dict[str, Metric]:
    data = reader.get_metrics_data()
    out: dict[str, Metric] = {}
    if data is None:
        return out
    for resource_metrics in data.resource_metrics:
        for scope_metrics in resource_metrics.scope_metrics:
            if scope_metrics.scope.name != POOLWATCH_SCOPE:
                continue
            for metric in scope_metrics.metrics:
                points = [p for p in metric.data.data_points if p.attributes["pool.name"] == pool]
                if points:
                    out[metric.name] = metric_with(metric, points)
    return out


def metric_with(metric: Metric, points: list[Any]) -> Metric:
    data = metric.data
    if isinstance(data, Sum):
        new: Any = Sum(points, data.aggregation_temporality, data.is_monotonic)
    elif isinstance(data, Histogram):
        new = Histogram(points, data.aggregation_temporality)
    else:
        new = Gauge(points)
    return Metric(metric.name, metric.description, metric.unit, new)


def key_of(spec: c.MetricSpec, attributes: Any) -> tuple[str, ...]:
    """A data point's attributes as the label tuple ``samples()`` yields."""
    return tuple(str(attributes[a]) for a in spec.attributes)


def expected_values(snap: poolwatch.PoolSnapshot) -> dict[str, dict[tuple[str, ...], Any]]:
    """What the exporter must show for ``snap``: ``{otel_name: {labels: value}}``."""
    out: dict[str, dict[tuple[str, ...], Any]] = {}
    for spec, labels, value in samples(snap):
        out.setdefault(spec.otel_name, {})[labels] = value
    return out


def observed_values(metrics: dict[str, Metric]) -> dict[str, dict[tuple[str, ...], Any]]:
    by_name = {spec.otel_name: spec for spec in c.CATALOGUE}
    out: dict[str, dict[tuple[str, ...], Any]] = {}
    for name, metric in metrics.items():
        spec = by_name[name]
        for p in metric.data.data_points:
            out.setdefault(name, {})[key_of(spec, p.attributes)] = (
                p if isinstance(metric.data, Histogram) else p.value
            )
    return out


def assert_gauges_and_counters_equal_the_snapshot(
    metrics: dict[str, Metric], snap: poolwatch.PoolSnapshot
) -> None:
    expected = expected_values(snap)
    observed = observed_values(metrics)
    for spec in c.CATALOGUE:
        if spec.kind == "histogram":
            continue
        want = expected.get(spec.otel_name, {})
        if spec in (c.PENDING_MAX_AGE, c.ACTIVE_MAX_AGE):  # ages grow between the two reads
            want = {k: pytest.approx(v, abs=0.1) for k, v in want.items()}
        assert observed.get(spec.otel_name, {}) == want, spec.otel_name


def assert_histograms_equal_the_snapshot(
    metrics: dict[str, Metric], snap: poolwatch.PoolSnapshot, specs: tuple[c.MetricSpec, ...]
) -> None:
    expected = expected_values(snap)
    observed = observed_values(metrics)
    for spec in specs:
        for labels, want in expected[spec.otel_name].items():
            assert isinstance(want, HistogramSnapshot)
            if want.count == 0:
                assert labels not in observed.get(spec.otel_name, {}), spec.otel_name
                continue
            point = observed[spec.otel_name][labels]
            assert tuple(point.explicit_bounds) == spec.buckets, spec.otel_name
            assert point.count == want.count, spec.otel_name
            assert tuple(point.bucket_counts) == want.counts, spec.otel_name
            assert point.sum == pytest.approx(want.sum, rel=1e-6, abs=1e-9), spec.otel_name


def port_of(server: LoopbackServer) -> int:
    return int(server.url.rsplit(":", 1)[1])


def get_concurrently(
    client: Any, url: str, n: int, *, allow_errors: bool = False
) -> list[Exception]:
    """``n`` GETs from ``n`` threads that start together (a barrier), so that they queue.

    Returns what the callers caught; any is a failure unless ``allow_errors``."""
    barrier = threading.Barrier(n)
    caught: list[Exception] = []

    def get() -> None:
        barrier.wait()
        try:
            client.get(url)
        except Exception as exc:
            caught.append(exc)

    threads = [threading.Thread(target=get) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if not allow_errors:
        assert caught == []
    return caught


# --------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------


def test_every_catalogue_metric_is_exported_with_its_unit_attributes_and_the_snapshot_figures(
    hx: Any,
    otel: Otel,
    loopback_server_factory: Callable[..., LoopbackServer],
    server_ssl_context_factory: Callable[..., ssl.SSLContext],
    client_ssl_context: ssl.SSLContext,
) -> None:
    server = loopback_server_factory(tls=server_ssl_context_factory(("http/1.1",)))
    base = server.url
    errors: list[BaseException] = []

    def call(path: str) -> None:
        try:
            client.get(f"{base}{path}")
        except Exception as exc:
            errors.append(exc)

    limits = hx.Limits(max_connections=2)
    with hx.Client(limits=limits, timeout=5.0, verify=client_ssl_context) as client:
        poolwatch.instrument(client, name="otel-catalogue")
        name = poolwatch.snapshot(client).name

        # A busy pool: two requests hold both connections, one waits, one timed out waiting.
        holders = [threading.Thread(target=call, args=("/delay?s=0.4",)) for _ in range(2)]
        for t in holders:
            t.start()
        wait_until(lambda: server.stats.in_flight_requests == 2, what="2 in flight")
        with pytest.raises(hx.PoolTimeout):
            client.get(f"{base}/ok", timeout=hx.Timeout(5.0, pool=0.05))
        waiter = threading.Thread(target=call, args=("/ok",))
        waiter.start()
        wait_until(lambda: poolwatch.snapshot(client).pending_requests == 1, what="1 waiting")
        busy = otel.metrics(name)
        snap = poolwatch.snapshot(client)
        assert (snap.active_connections, snap.pending_requests, snap.utilization) == (2, 1, 1.0)
        assert snap.active_requests == 3
        assert_gauges_and_counters_equal_the_snapshot(busy, snap)
        for t in [*holders, waiter]:
            t.join()
        assert errors == []

        # Reuse, a server error status, and a connection the server drops.
        client.get(f"{base}/ok")
        assert client.get(f"{base}/status?code=503").status_code == 503
        with pytest.raises(hx.RemoteProtocolError):
            client.get(f"{base}/drop")
        time.sleep(0.25)  # the exporter reads the pools at most once per 0.2 s
        at_rest = otel.metrics(name)
        snap = poolwatch.snapshot(client)
        assert snap.pool_timeouts_total == 1
        assert snap.requests_total == 6 == server.stats.requests
        assert snap.reused_requests_total >= 3
        assert snap.errors == {"PoolTimeout": 1, "RemoteProtocolError": 1}
        assert_gauges_and_counters_equal_the_snapshot(at_rest, snap)
        assert_histograms_equal_the_snapshot(
            at_rest,
            snap,
            (c.TIME_IN_QUEUE, c.REQUEST_DURATION, c.TIME_TO_FIRST_BYTE, c.CONNECT_TIME, c.TLS_TIME),
        )
    # Connection lifetimes are recorded as the connections close.
    closed = otel.metrics(name)
    snap = poolwatch.snapshot(client)
    assert snap.origins[0].connection_duration.count == snap.connections_created_total == 2
    assert_histograms_equal_the_snapshot(closed, snap, (c.CONNECTION_DURATION,))

    # Every metric, under its OTel name and unit, with exactly the catalogue's attributes.
    metrics = {**at_rest, **closed}
    assert sorted(metrics) == sorted(spec.otel_name for spec in c.CATALOGUE)
    for spec in c.CATALOGUE:
        metric = metrics[spec.otel_name]
        assert metric.unit == spec.unit, spec.otel_name
        data = metric.data
        if spec.kind == "counter":
            assert isinstance(data, Sum), spec.otel_name
            assert data.is_monotonic, spec.otel_name
        elif spec.kind == "gauge":
            assert isinstance(data, Gauge) or (isinstance(data, Sum) and not data.is_monotonic)
        else:
            assert isinstance(data, Histogram), spec.otel_name
            assert data.data_points[0].explicit_bounds[-1] >= 600.0
        for point in data.data_points:
            assert tuple(point.attributes) == spec.attributes, spec.otel_name
            if spec.per_origin:
                assert point.attributes["server.port"] == port_of(server)
                assert point.attributes["server.address"] == urlsplit(server.url).hostname
                assert point.attributes["url.scheme"] == "https"


def test_requests_by_reuse_and_open_connections_by_state_and_version_read_like_the_snapshot(
    hx: Any, otel: Otel, loopback_server: LoopbackServer
) -> None:
    with hx.Client(limits=hx.Limits(max_connections=3)) as client:
        poolwatch.instrument(client, name="otel-reuse")
        name = poolwatch.snapshot(client).name
        for _ in range(4):
            client.get(f"{loopback_server.url}/ok")
        metrics = otel.metrics(name)
    port = port_of(loopback_server)
    origin = ("127.0.0.1", port, "http")

    def points(metric: str) -> dict[tuple[Any, ...], Any]:
        return {tuple(p.attributes.values())[1:]: p.value for p in metrics[metric].data.data_points}

    assert points("poolwatch.pool.requests") == {(*origin, "true"): 3, (*origin, "false"): 1}
    assert points("http.client.open_connections") == {
        (*origin, "active", "1.1"): 0,
        (*origin, "idle", "1.1"): 1,
    }
    assert points("poolwatch.pool.connections.created") == {origin: 1}
    assert points("poolwatch.pool.timeouts") == {origin: 0}
    assert points("poolwatch.pool.connection.max") == {(): 3}
    assert points("poolwatch.pool.utilization") == {(): 0.0}
    assert points("poolwatch.pool.pending_requests") == {(): 0}


def test_a_collection_right_after_another_sees_the_requests_made_in_between(
    hx: Any, otel: Otel, loopback_server: LoopbackServer
) -> None:
    def requests(pool: str) -> int:
        points = otel.metrics(pool)["poolwatch.pool.requests"].data.data_points
        return int(sum(p.value for p in points))

    with hx.Client() as client:
        poolwatch.instrument(client, name="otel-back-to-back")
        seen = []
        for _ in range(3):  # collections milliseconds apart, as two readers may make them
            client.get(f"{loopback_server.url}/ok")
            seen.append(requests("otel-back-to-back"))
    assert seen == [1, 2, 3]


def test_one_collection_reads_each_pool_once_for_all_its_metrics(
    hx: Any, otel: Otel, loopback_server: LoopbackServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    reads: list[str] = []
    real = ClientWatch.snapshot

    def counted(watch: ClientWatch) -> poolwatch.PoolSnapshot:
        reads.append(watch.name)
        return real(watch)

    with hx.Client() as client:
        poolwatch.instrument(client, name="otel-read-once")
        client.get(f"{loopback_server.url}/ok")
        monkeypatch.setattr(ClientWatch, "snapshot", counted)
        for collection in (1, 2):
            metrics = otel.metrics("otel-read-once")
            assert len(metrics) >= 10  # every gauge and counter, from the one reading
            assert reads.count("otel-read-once") == collection


def test_histograms_of_a_new_client_carry_its_own_pool_name_after_older_clients_were_collected(
    hx: Any, otel: Otel, loopback_server: LoopbackServer
) -> None:
    # Clients come and go in a long-lived process (one per job, per tenant, per test...).
    names = []
    tls = ssl.create_default_context()  # once: a client's own context costs ~30 ms
    gc.freeze()  # the collections below then only walk what the loop made: fast
    try:
        for i in range(20):
            client = hx.Client(verify=tls)
            poolwatch.instrument(client, name=f"otel-churn-{i}")
            names.append(poolwatch.snapshot(client).name)
            client.get(f"{loopback_server.url}/ok")
            client.close()
            del client
            gc.collect()
    finally:
        gc.unfreeze()
    counts: dict[str, int] = {}
    data = otel.reader.get_metrics_data()
    assert data is not None
    for resource_metrics in data.resource_metrics:
        for scope_metrics in resource_metrics.scope_metrics:
            for metric in scope_metrics.metrics:
                if metric.name == c.REQUEST_DURATION.otel_name:
                    for p in metric.data.data_points:
                        pool = str(p.attributes["pool.name"])
                        counts[pool] = counts.get(pool, 0) + p.count
    assert counts == dict.fromkeys(names, 1)


# --------------------------------------------------------------------------------------------
# Spans, poolwatch alone
# --------------------------------------------------------------------------------------------


def client_spans(spans: list[ReadableSpan]) -> list[ReadableSpan]:
    return [s for s in spans if s.kind is SpanKind.CLIENT]


def wait_spans(spans: list[ReadableSpan]) -> list[ReadableSpan]:
    return [s for s in spans if s.name == "wait_for_connection"]


def assert_wait_spans_match_the_queue(spans: list[ReadableSpan]) -> int:
    """Each CLIENT span that queued at least WAIT_SPAN_THRESHOLD has exactly one wait child
    covering the queue time, and no other has one. Returns how many queued."""
    waits = wait_spans(spans)
    queued = 0
    for span in client_spans(spans):
        assert span.attributes is not None
        queue = span.attributes["http.client.request.time_in_queue"]
        assert isinstance(queue, float)
        children = [w for w in waits if w.parent is not None and w.parent == span.context]
        if queue < poolwatch.otel.WAIT_SPAN_THRESHOLD:
            assert children == []
            continue
        queued += 1
        (child,) = children
        assert child.kind is SpanKind.INTERNAL
        assert child.context.trace_id == span.context.trace_id
        assert child.start_time is not None
        assert child.end_time is not None
        assert span.start_time is not None
        assert span.end_time is not None
        if span.instrumentation_scope.name == POOLWATCH_SCOPE:
            assert abs(child.start_time - span.start_time) <= 1_000  # both start at the pool
        else:  # the other instrumentation's span starts earlier, at the transport
            assert span.start_time <= child.start_time
        assert child.end_time <= span.end_time
        assert abs((child.end_time - child.start_time) - queue * 1e9) <= 2_000
    assert all(w.parent is not None for w in waits)
    assert len(waits) == queued
    return queued


def test_poolwatch_alone_makes_one_client_span_per_request_with_semconv_and_pool_attributes(
    hx: Any, otel: Otel, loopback_server: LoopbackServer
) -> None:
    base = loopback_server.url
    urls = [f"{base}/ok", f"{base}/ok?model=m&api_key=k-123#frag", f"{base}/echo"]
    with hx.Client() as client:
        poolwatch.instrument(client, name="otel-alone")
        name = poolwatch.snapshot(client).name
        client.get(urls[0])
        client.get(urls[1])
        client.post(urls[2], content=b"{}")
    spans = otel.spans()
    assert len(client_spans(spans)) == 3
    assert all(s.instrumentation_scope.name == POOLWATCH_SCOPE for s in spans)
    port = port_of(loopback_server)
    for i, (span, url) in enumerate(zip(client_spans(spans), urls, strict=True)):
        method = "POST" if i == 2 else "GET"
        assert span.name == method
        attributes = dict(span.attributes or {})
        assert attributes["http.request.method"] == method
        assert attributes["server.address"] == "127.0.0.1"
        assert attributes["server.port"] == port
        assert attributes["url.full"] == redact_url(url)
        assert "url.scheme" not in attributes  # opt-in on client spans; url.full has it
        assert attributes["http.response.status_code"] == 200
        assert attributes["network.protocol.version"] == "1.1"
        assert attributes["poolwatch.pool.name"] == name
        assert isinstance(attributes["http.client.request.time_in_queue"], float)
        assert attributes["poolwatch.connection.reused"] is (i > 0)
        assert ("poolwatch.connection.connect_time" in attributes) is (i == 0)
        assert 0 < attributes["poolwatch.request.time_to_first_byte"] < 1
        assert span.status.status_code is StatusCode.UNSET
        assert "error.type" not in attributes
        assert list(span.events) == []  # every figure is an attribute: events cost
    assert client_spans(spans)[1].attributes["url.full"] == (  # type: ignore[index]
        f"{base}/ok?model=m&api_key=REDACTED"
    )
    assert_wait_spans_match_the_queue(spans)


def test_a_finished_request_waiting_to_be_counted_keeps_no_span_state(
    hx: Any, otel: Otel, loopback_server: LoopbackServer
) -> None:
    # The core keeps a finished request's record until a reading counts it: the span's
    # attributes and parent context must not wait with it.
    with hx.Client() as client:
        poolwatch.instrument(client, name="otel-state")
        core = _api._lookup(client).core  # type: ignore[union-attr]
        for _ in range(3):
            client.get(f"{loopback_server.url}/ok")
        waiting = list(core._finished)
        assert len(waiting) == 3  # nothing read them yet
        assert [rec.extra for rec in waiting] == [None, None, None]
        assert len(client_spans(otel.spans())) == 3
        assert poolwatch.snapshot(client).requests_total == 3
        assert core._finished == []


def test_requests_that_queue_get_a_wait_for_connection_child_spanning_their_queue_time(
    hx: Any, otel: Otel, loopback_server: LoopbackServer
) -> None:
    with hx.Client(limits=hx.Limits(max_connections=1)) as client:
        poolwatch.instrument(client, name="otel-queue")
        get_concurrently(client, f"{loopback_server.url}/delay?s=0.05", 4)
        snap = poolwatch.snapshot(client)
    spans = otel.spans()
    assert len(client_spans(spans)) == 4 == snap.requests_total
    queued = assert_wait_spans_match_the_queue(spans)
    assert queued >= 3  # one request at a time: the last three waited about 50, 100, 150 ms
    waits = sorted(
        s.attributes["http.client.request.time_in_queue"]  # type: ignore[index]
        for s in client_spans(spans)
    )
    assert waits[-1] > 0.12
    for w in wait_spans(spans):
        assert w.attributes == {
            "server.address": "127.0.0.1",
            "server.port": port_of(loopback_server),
        }


def test_the_span_of_a_streamed_response_ends_when_the_response_is_closed_not_at_the_headers(
    hx: Any, otel: Otel, loopback_server: LoopbackServer
) -> None:
    url = f"{loopback_server.url}/stream?chunks=5&size=10&delay=0.06"
    with hx.Client() as client:
        poolwatch.instrument(client, name="otel-stream")
        # Read to the end: the span covers the body.
        with client.stream("GET", url) as response:
            headers_at = time.time_ns()
            received, partial_at = 0, 0
            for chunk in response.iter_raw():
                received += len(chunk)
                if received < 50:
                    partial_at = time.time_ns()
                    assert client_spans(otel.spans()) == []
        closed_at = time.time_ns()
        # Closed early, mid-body: the span ends at the close.
        with client.stream("GET", url) as response:
            chunks = response.iter_raw()  # kept: a dropped iterator closes the stream
            next(chunks)
            time.sleep(0.15)
            assert client_spans(otel.spans())[1:] == []
            closing_at = time.time_ns()
        del chunks
    full, early = client_spans(otel.spans())
    for span in (full, early):
        assert span.attributes is not None
        assert span.attributes["http.response.status_code"] == 200
        assert span.status.status_code is StatusCode.UNSET
        assert span.start_time is not None
        assert span.end_time is not None
        assert span.start_time <= headers_at < span.end_time or span is early
    assert received == 50
    assert partial_at <= full.end_time <= closed_at  # type: ignore[operator]
    assert full.end_time - full.start_time > 200_000_000  # type: ignore[operator]
    assert closing_at <= early.end_time  # type: ignore[operator]


def test_over_http2_a_wait_for_a_stream_slot_is_a_wait_for_connection_too(
    hx: Any,
    otel: Otel,
    loopback_server_factory: Callable[..., LoopbackServer],
    server_ssl_context: ssl.SSLContext,
    client_ssl_context: ssl.SSLContext,
) -> None:
    server = loopback_server_factory(tls=server_ssl_context, h2_max_concurrent_streams=2)
    with hx.Client(http2=True, verify=client_ssl_context) as client:
        poolwatch.instrument(client, name="otel-h2")
        name = poolwatch.snapshot(client).name
        client.get(f"{server.url}/ok")  # settle the connection and its SETTINGS
        # Under load httpcore's sync HTTP/2 connection now and then opens a stream past the
        # server's limit ("Max outbound streams is 2, 2 open") and the server drops the
        # connection: then what poolwatch recorded must match what the callers caught.
        errors = get_concurrently(client, f"{server.url}/delay?s=0.1", 4, allow_errors=True)
        metrics = otel.metrics(name)
        snap = poolwatch.snapshot(client)
    assert snap.connections_created_total == server.stats.accepted_connections
    assert snap.connections_created_total == 1 or errors
    assert_gauges_and_counters_equal_the_snapshot(metrics, snap)
    versions = {
        p.attributes["network.protocol.version"] for p in _points(metrics, c.OPEN_CONNECTIONS)
    }
    assert versions == {"2"}
    spans = otel.spans()
    clients = client_spans(spans)
    assert len(clients) == 5
    failed = [s for s in clients if s.attributes and "error.type" in s.attributes]
    assert sorted(str(s.attributes["error.type"]) for s in failed) == sorted(  # type: ignore[index]
        type(e).__name__ for e in errors
    )
    answered = [s for s in clients if s not in failed]
    assert {s.attributes["network.protocol.version"] for s in answered} == {"2"}  # type: ignore[index]
    queued = assert_wait_spans_match_the_queue(spans)
    assert queued >= 2 or errors  # two of four waited for a slot


def _points(metrics: dict[str, Metric], spec: c.MetricSpec) -> list[Any]:
    return list(metrics[spec.otel_name].data.data_points)


def test_poolwatchs_span_is_a_child_of_the_callers_current_span(
    hx: Any, otel: Otel, loopback_server: LoopbackServer
) -> None:
    tracer = otel.tracer_provider.get_tracer("the-application")
    with hx.Client() as client:
        poolwatch.instrument(client, name="otel-parent")
        with tracer.start_as_current_span("handle-job") as job:
            client.get(f"{loopback_server.url}/ok")
    (span,) = client_spans(otel.spans())
    assert span.parent is not None
    assert span.parent.span_id == job.get_span_context().span_id
    assert span.context.trace_id == job.get_span_context().trace_id


def test_poolwatchs_span_keeps_the_parent_it_started_under_when_the_response_closes_elsewhere(
    hx: Any, otel: Otel, loopback_server: LoopbackServer
) -> None:
    """poolwatch hands its span to the SDK when the response closes, with the context the
    request started in: a stream read and closed under another span keeps its real parent."""
    tracer = otel.tracer_provider.get_tracer("the-application")
    with hx.Client() as client:
        poolwatch.instrument(client, name="otel-parent-later")
        before = time.time_ns()
        with tracer.start_as_current_span("handle-job") as job:
            response = client.send(
                client.build_request("GET", f"{loopback_server.url}/ok"), stream=True
            )
        with tracer.start_as_current_span("other-work") as other:
            assert client_spans(otel.spans()) == []  # still open
            response.read()
            response.close()
    (span,) = client_spans(otel.spans())
    assert span.parent is not None
    assert span.parent.span_id == job.get_span_context().span_id
    assert span.parent.span_id != other.get_span_context().span_id
    assert span.start_time is not None
    assert span.end_time is not None
    assert before <= span.start_time < job.end_time <= span.end_time  # type: ignore[operator]


def test_with_spans_off_there_are_histograms_but_no_spans(
    hx: Any, loopback_server: LoopbackServer
) -> None:
    o = make_otel(spans=False, request_histograms=True)
    with hx.Client() as client:
        poolwatch.instrument(client, name="otel-no-spans")
        name = poolwatch.snapshot(client).name
        client.get(f"{loopback_server.url}/ok")
        metrics = o.metrics(name)
    assert o.spans() == []
    (point,) = _points(metrics, c.REQUEST_DURATION)
    assert point.count == 1


def test_a_client_instrumented_before_enable_is_exported_too(
    hx: Any, loopback_server: LoopbackServer
) -> None:
    with hx.Client() as client:
        poolwatch.instrument(client, name="otel-early")
        name = poolwatch.snapshot(client).name
        client.get(f"{loopback_server.url}/ok")
        o = make_otel(request_histograms=True)
        client.get(f"{loopback_server.url}/ok")
        metrics = o.metrics(name)
    (span,) = client_spans(o.spans())
    assert span.attributes is not None
    assert span.attributes["poolwatch.connection.reused"] is True
    assert _points(metrics, c.REQUESTS)[0].value + _points(metrics, c.REQUESTS)[1].value == 2
    (point,) = _points(metrics, c.REQUEST_DURATION)
    assert point.count == 1  # recorded from enable() on


def ipv6_loopback_works() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not ipv6_loopback_works(), reason="no IPv6 loopback here")
def test_url_full_of_an_ipv6_origin_keeps_the_brackets_around_the_address(
    hx: Any, otel: Otel, loopback_server_factory: Callable[..., LoopbackServer]
) -> None:
    server = loopback_server_factory(host="::1")
    assert server.url.startswith("http://[::1]:")
    with hx.Client() as client:
        poolwatch.instrument(client, name="otel-ipv6")
        client.get(f"{server.url}/ok?sig=s3cr3t")
    (span,) = client_spans(otel.spans())
    assert span.attributes is not None
    assert span.attributes["server.address"] == "::1"
    assert span.attributes["url.full"] == f"{server.url}/ok?sig=REDACTED"


def test_a_pool_timeout_gives_error_type_pool_timeout_and_an_error_status(
    hx: Any, otel: Otel, loopback_server: LoopbackServer
) -> None:
    with hx.Client(limits=hx.Limits(max_connections=1)) as client:
        poolwatch.instrument(client, name="otel-pool-timeout")
        holder = threading.Thread(target=client.get, args=(f"{loopback_server.url}/delay?s=0.3",))
        holder.start()
        wait_until(lambda: loopback_server.stats.in_flight_requests == 1)
        with pytest.raises(hx.PoolTimeout):
            client.get(f"{loopback_server.url}/ok", timeout=hx.Timeout(5.0, pool=0.05))
        holder.join()
    spans = client_spans(otel.spans())
    assert len(spans) == 2
    failed = [s for s in spans if s.status.status_code is StatusCode.ERROR]
    assert len(failed) == 1
    attributes = failed[0].attributes or {}
    assert attributes["error.type"] == "PoolTimeout"
    assert "http.response.status_code" not in attributes
    assert failed[0].end_time is not None
    assert failed[0].start_time is not None
    assert failed[0].end_time - failed[0].start_time >= 45_000_000


@pytest.mark.anyio
async def test_a_cancelled_request_is_not_an_error(
    hx: Any, otel: Otel, loopback_server: LoopbackServer
) -> None:
    async with hx.AsyncClient(limits=hx.Limits(max_connections=1)) as client:
        poolwatch.instrument(client, name="otel-cancel")
        async with anyio.create_task_group() as tg:
            tg.start_soon(client.get, f"{loopback_server.url}/delay?s=0.25")
            await await_until(lambda: loopback_server.stats.in_flight_requests == 1)
            with anyio.move_on_after(0.05) as scope:
                await client.get(f"{loopback_server.url}/ok")  # queued, then cancelled
            assert scope.cancelled_caught
        with anyio.move_on_after(0.1) as scope:  # cancelled mid-body
            async with client.stream(
                "GET", f"{loopback_server.url}/stream?chunks=20&size=10&delay=0.05"
            ) as response:
                async for _ in response.aiter_raw():
                    pass
        assert scope.cancelled_caught
        assert poolwatch.snapshot(client).errors == {"cancelled": 2}
    spans = client_spans(otel.spans())
    assert len(spans) == 3
    for span in spans:
        assert span.status.status_code is StatusCode.UNSET
        assert "error.type" not in (span.attributes or {})
        assert span.end_time is not None


def test_a_503_response_sets_error_type_503_and_an_error_status(
    hx: Any, otel: Otel, loopback_server: LoopbackServer
) -> None:
    with hx.Client() as client:
        poolwatch.instrument(client, name="otel-503")
        assert client.get(f"{loopback_server.url}/status?code=503").status_code == 503
        assert client.get(f"{loopback_server.url}/status?code=200").status_code == 200
    bad, good = client_spans(otel.spans())
    assert bad.attributes is not None
    assert bad.attributes["error.type"] == "503"
    assert bad.attributes["http.response.status_code"] == 503
    assert bad.status.status_code is StatusCode.ERROR
    assert good.status.status_code is StatusCode.UNSET
    assert "error.type" not in (good.attributes or {})


def test_request_headers_the_user_names_are_recorded_and_others_are_not(
    hx: Any, loopback_server: LoopbackServer
) -> None:
    o = make_otel(request_headers=["X-Request-Id"])
    with hx.Client() as client:
        poolwatch.instrument(client, name="otel-headers")
        client.get(f"{loopback_server.url}/ok", headers={"x-request-id": "req-42", "x-other": "no"})
    (span,) = client_spans(o.spans())
    attributes = dict(span.attributes or {})
    assert attributes["http.request.header.x-request-id"] == ("req-42",)
    assert not [k for k in attributes if k.startswith("http.request.header.x-other")]


def test_enabling_the_same_providers_twice_still_makes_one_span_per_request(
    hx: Any, otel: Otel, loopback_server: LoopbackServer
) -> None:
    poolwatch.otel.enable(otel.meter_provider, otel.tracer_provider)
    with hx.Client() as client:
        poolwatch.instrument(client, name="otel-twice")
        client.get(f"{loopback_server.url}/ok")
        client.get(f"{loopback_server.url}/ok")
    assert len(client_spans(otel.spans())) == 2


def test_enabling_the_same_providers_again_with_other_options_keeps_the_first_and_says_so(
    hx: Any, loopback_server: LoopbackServer, caplog: pytest.LogCaptureFixture
) -> None:
    o = make_otel(spans=False)
    with caplog.at_level(logging.WARNING, logger="poolwatch"):
        poolwatch.otel.enable(o.meter_provider, o.tracer_provider, spans=False)  # the same
        assert not caplog.records
        poolwatch.otel.enable(o.meter_provider, o.tracer_provider, request_headers=["x-tenant"])
    (record,) = caplog.records
    assert record.levelno == logging.WARNING
    message = record.getMessage()
    assert "spans=True, request_headers=('x-tenant',)" in message
    assert "first call's stay in force (spans=False, request_headers=())" in message
    with hx.Client() as client:
        poolwatch.instrument(client, name="otel-options-kept")
        client.get(f"{loopback_server.url}/ok", headers={"x-tenant": "t1"})
        metrics = o.metrics("otel-options-kept")
    assert o.spans() == []  # still no spans: the first call's options
    assert sum(p.value for p in metrics["poolwatch.pool.requests"].data.data_points) == 1


def test_two_tracer_providers_each_get_one_ended_span_per_request(
    hx: Any, loopback_server: LoopbackServer, caplog: pytest.LogCaptureFixture
) -> None:
    # Two enable() calls: e.g. a library's providers and the application's, or tests.
    first, second = make_otel(), make_otel()
    with hx.Client(limits=hx.Limits(max_connections=1)) as client:
        poolwatch.instrument(client, name="otel-two-providers")
        get_concurrently(client, f"{loopback_server.url}/delay?s=0.03", 3)
    for o in (first, second):
        assert len(client_spans(o.spans())) == 3
        assert_wait_spans_match_the_queue(o.spans())
    assert "ended span" not in caplog.text


# --------------------------------------------------------------------------------------------
# Spans, with opentelemetry-instrumentation-httpx also on
# --------------------------------------------------------------------------------------------


def otel_instrumentor(hx: Any) -> Any:
    module = importlib.import_module("opentelemetry.instrumentation.httpx")
    name = "HTTPXClientInstrumentor" if hx.__name__ == "httpx" else "HTTPX2ClientInstrumentor"
    instrumentor = getattr(module, name, None)
    if instrumentor is None:
        pytest.skip(f"opentelemetry-instrumentation-httpx has no {name}")
    return instrumentor


@pytest.mark.parametrize("order", ["poolwatch_first", "otel_first"])
@pytest.mark.parametrize("mode", ["sync", "async"])
def test_with_the_httpx_instrumentation_there_is_exactly_one_client_span_carrying_poolwatchs(
    hx: Any, otel: Otel, loopback_server: LoopbackServer, order: str, mode: str
) -> None:
    instrumentor = otel_instrumentor(hx)
    url = f"{loopback_server.url}/delay?s=0.04"
    n = 3

    def instrument(client: Any) -> None:
        if order == "poolwatch_first":
            poolwatch.instrument(client, name="otel-enriched")
        instrumentor.instrument_client(
            client, tracer_provider=otel.tracer_provider, meter_provider=otel.meter_provider
        )
        if order == "otel_first":
            poolwatch.instrument(client, name="otel-enriched")

    if mode == "sync":
        with hx.Client(limits=hx.Limits(max_connections=1)) as client:
            instrument(client)
            get_concurrently(client, url, n)
            snap = poolwatch.snapshot(client)
    else:

        async def main() -> poolwatch.PoolSnapshot:
            async with hx.AsyncClient(limits=hx.Limits(max_connections=1)) as client:
                instrument(client)
                async with anyio.create_task_group() as tg:
                    for _ in range(n):
                        tg.start_soon(client.get, url)
                return poolwatch.snapshot(client)

        snap = anyio.run(main)
    assert snap.requests_total == n
    spans = otel.spans()
    clients = client_spans(spans)
    assert len(clients) == n
    assert all(s.instrumentation_scope.name != POOLWATCH_SCOPE for s in clients)
    for span in clients:
        attributes = dict(span.attributes or {})
        assert attributes["poolwatch.pool.name"] == snap.name
        assert isinstance(attributes["http.client.request.time_in_queue"], float)
        assert isinstance(attributes["poolwatch.connection.reused"], bool)
        assert 0 < attributes["poolwatch.request.time_to_first_byte"] < 1
    assert sorted(s.attributes["poolwatch.connection.reused"] for s in clients) == [  # type: ignore[index]
        False,
        True,
        True,
    ]
    assert assert_wait_spans_match_the_queue(spans) >= 2
    assert all(s.instrumentation_scope.name == POOLWATCH_SCOPE for s in wait_spans(spans))
    assert len(spans) == len(clients) + len(wait_spans(spans))


# --------------------------------------------------------------------------------------------
# OTLP end to end: the SDK's own exporters into real receivers
# --------------------------------------------------------------------------------------------


@dataclass
class OtlpSetup:
    receiver: OtlpReceiver
    meter_provider: MeterProvider
    tracer_provider: TracerProvider

    def flush(self) -> None:
        assert self.tracer_provider.force_flush(5_000)
        assert self.meter_provider.force_flush(5_000)

    def shutdown(self) -> None:
        self.tracer_provider.shutdown()
        self.meter_provider.shutdown()


@pytest.fixture(params=["grpc", "http"])
def otlp(request: pytest.FixtureRequest) -> Iterator[OtlpSetup]:
    """poolwatch enabled on providers whose OTLP exporters send to an in-process receiver."""
    receiver: OtlpReceiver
    if request.param == "grpc":
        receiver = GrpcOtlpReceiver()
        receiver.start()
        span_exporter: Any = GrpcSpanExporter(endpoint=receiver.endpoint, insecure=True, timeout=2)
        metric_exporter: Any = GrpcMetricExporter(
            endpoint=receiver.endpoint, insecure=True, timeout=2
        )
    else:
        http = HttpOtlpReceiver()
        http.start()
        receiver = http
        span_exporter = HttpSpanExporter(endpoint=http.traces_endpoint, timeout=2)
        metric_exporter = HttpMetricExporter(endpoint=http.metrics_endpoint, timeout=2)
    meter_provider = MeterProvider(
        metric_readers=[
            PeriodicExportingMetricReader(metric_exporter, export_interval_millis=600_000)
        ]
    )
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(
        BatchSpanProcessor(span_exporter, schedule_delay_millis=600_000)
    )
    setup = OtlpSetup(receiver, meter_provider, tracer_provider)
    poolwatch.otel.enable(meter_provider, tracer_provider, request_histograms=True)
    try:
        yield setup
    finally:
        setup.shutdown()  # while the receiver still answers: a dead endpoint blocks ~7 s
        receiver.stop()


def number_points(metric: Any, pool: str) -> dict[tuple[Any, ...], Any]:
    data = metric.sum if metric.WhichOneof("data") == "sum" else metric.gauge
    out = {}
    for p in data.data_points:
        attributes = attributes_of(p)
        if attributes["pool.name"] == pool:
            value = p.as_int if p.WhichOneof("value") == "as_int" else p.as_double
            out[tuple(attributes.items())] = value
    return out


def test_otlp_exporters_deliver_poolwatchs_metrics_and_spans_to_a_real_receiver(
    hx: Any, otlp: OtlpSetup, loopback_server: LoopbackServer
) -> None:
    with hx.Client(limits=hx.Limits(max_connections=1)) as client:
        poolwatch.instrument(client, name="otel-otlp")
        get_concurrently(client, f"{loopback_server.url}/delay?s=0.03&token=t0k", 3)
        snap = poolwatch.snapshot(client)
        otlp.flush()
    rx = otlp.receiver
    rx.wait_for(lambda r: len(r.spans()) >= 3 and r.metrics())
    name, port = snap.name, port_of(loopback_server)
    origin = (("pool.name", name), ("server.address", "127.0.0.1"), ("server.port", port))
    origin += (("url.scheme", "http"),)
    metrics = rx.last_metrics()

    open_connections = metrics["http.client.open_connections"]
    assert open_connections.unit == "{connection}"
    assert not open_connections.sum.is_monotonic
    assert number_points(open_connections, name) == {
        (*origin, ("http.connection.state", "active"), ("network.protocol.version", "1.1")): 0,
        (*origin, ("http.connection.state", "idle"), ("network.protocol.version", "1.1")): 1,
    }
    requests = metrics["poolwatch.pool.requests"]
    assert requests.sum.is_monotonic
    assert number_points(requests, name) == {
        (*origin, ("connection.reused", "true")): snap.reused_requests_total,
        (*origin, ("connection.reused", "false")): 1,
    }
    assert snap.reused_requests_total == 2
    assert number_points(metrics["poolwatch.pool.connection.max"], name) == {
        (("pool.name", name),): 1
    }
    assert number_points(metrics["poolwatch.pool.utilization"], name) == {
        (("pool.name", name),): 0.0
    }
    queue = metrics["http.client.request.time_in_queue"]
    assert queue.unit == "s"
    (point,) = [p for p in queue.histogram.data_points if attributes_of(p)["pool.name"] == name]
    assert tuple(attributes_of(point).items()) == origin
    assert tuple(point.explicit_bounds) == c.REQUEST_TIME_BUCKETS
    assert point.count == 3 == snap.origins[0].time_in_queue.count
    assert tuple(point.bucket_counts) == snap.origins[0].time_in_queue.counts

    spans = [s for s in rx.spans() if s.name == "GET"]
    assert len(spans) == 3
    for span in spans:
        attributes = attributes_of(span)
        assert span.kind == span.SPAN_KIND_CLIENT
        assert attributes["url.full"] == f"{loopback_server.url}/delay?s=0.03&token=REDACTED"
        assert attributes["server.port"] == port
        assert attributes["http.response.status_code"] == 200
        assert attributes["poolwatch.pool.name"] == name
        assert isinstance(attributes["http.client.request.time_in_queue"], float)
    waits = [s for s in rx.spans() if s.name == "wait_for_connection"]
    assert len(waits) >= 2
    assert {w.parent_span_id for w in waits} <= {s.span_id for s in spans}


def test_by_default_only_the_pool_histograms_cost_a_record_per_request(
    hx: Any, loopback_server: LoopbackServer
) -> None:
    otel = make_otel()
    with hx.Client() as client:
        poolwatch.instrument(client, name="otel-default-histograms")
        for _ in range(3):
            client.get(f"{loopback_server.url}/ok")
    metrics = otel.metrics("otel-default-histograms")
    assert metrics["http.client.request.time_in_queue"].data.data_points[0].count == 3
    assert metrics["poolwatch.connection.connect_time"].data.data_points[0].count == 1
    assert "poolwatch.request.duration" not in metrics
    assert "poolwatch.request.time_to_first_byte" not in metrics


def test_histogram_values_reach_the_sdk_at_the_next_collection_with_their_requests_trace(
    hx: Any, otel: Otel, loopback_server: LoopbackServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # poolwatch records its histograms in a batch when a collection begins, each value with
    # the context its request ran in: the SDK's exemplar still points at that request's trace,
    # though the collection runs outside it. The recorder thread sees no exporter here, so
    # only the collection can have recorded the value.
    monkeypatch.setattr(poolwatch.otel, "_enabled", [])
    tracer = otel.tracer_provider.get_tracer("the-application")
    with hx.Client() as client:
        poolwatch.instrument(client, name="otel-exemplars")
        with tracer.start_as_current_span("handle-job") as job:
            client.get(f"{loopback_server.url}/ok")
    metrics = otel.metrics("otel-exemplars")
    (point,) = metrics["http.client.request.time_in_queue"].data.data_points
    assert point.count == 1
    assert [e.trace_id for e in point.exemplars] == [job.get_span_context().trace_id]


def test_histogram_values_waiting_for_the_sdk_stay_few_when_nothing_collects(
    hx: Any, loopback_server: LoopbackServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(poolwatch.otel, "_RECORD_AT", 8)
    otel = make_otel()
    exporter = poolwatch.otel._enabled[-1]
    # Hidden from the recorder thread: only the requests themselves can record the backlog.
    monkeypatch.setattr(poolwatch.otel, "_enabled", [])
    with hx.Client() as client:
        poolwatch.instrument(client, name="otel-bounded")
        for _ in range(20):
            client.get(f"{loopback_server.url}/ok")
            assert len(exporter._pending) < 8
    metrics = otel.metrics("otel-bounded")
    assert metrics["http.client.request.time_in_queue"].data.data_points[0].count == 20


def test_histogram_values_reach_the_sdk_within_a_few_seconds_without_a_collection(
    hx: Any, loopback_server: LoopbackServer
) -> None:
    otel = make_otel()
    exporter = poolwatch.otel._enabled[-1]
    with hx.Client() as client:
        poolwatch.instrument(client, name="otel-recorder")
        for _ in range(3):
            client.get(f"{loopback_server.url}/ok")
        wait_until(lambda: not exporter._pending, timeout=5.0, what="the recorder thread")
    metrics = otel.metrics("otel-recorder")
    assert metrics["http.client.request.time_in_queue"].data.data_points[0].count == 3


def test_a_forked_worker_starts_without_its_parents_waiting_values_and_with_a_recorder(
    hx: Any, loopback_server: LoopbackServer
) -> None:
    make_otel()
    exporter = poolwatch.otel._enabled[-1]
    with hx.Client() as client:
        poolwatch.instrument(client, name="otel-fork")
        with exporter._pending_lock:  # the recorder thread cannot take the value meanwhile
            client.get(f"{loopback_server.url}/ok")
            assert exporter._pending
            pid = os.fork()
            if pid == 0:  # the child: report through the exit code only
                recorder = poolwatch.otel._recorder._thread
                fine = not exporter._pending and recorder is not None and recorder.is_alive()
                os._exit(0 if fine else 1)
        _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    wait_until(lambda: not exporter._pending, timeout=5.0, what="the parent's recorder")
