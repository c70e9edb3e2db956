"""poolwatch never breaks the host: make each of its own sites raise, and every request of
the host still ends exactly as it does without poolwatch (same status, same body, same
exception class), while each failing site is logged exactly once on the ``poolwatch`` logger
(the autouse fixture in conftest forgets the logged sites between tests).

The sites: every step of ``PoolCore`` (``start``, ``acquire``, ``requeue``,
``on_trace_event``, ``headers``, ``call_failed``, ``finish``, ``leaked``, ``connection_closed``),
``ClientWatch.snapshot`` (read by every exporter) and ``ClientWatch.pressure`` (the saturation
sampler's reading), the Prometheus
collector's ``samples()``, the OpenTelemetry exporter's per-request hooks and metric
callbacks (SDK in-memory providers), and the saturation check and its callback.

When ``PoolCore.start`` fails the request runs unwatched, and when ``finish`` fails the
counters may be off: these tests demand only that the host does not notice, and that the
log says so once.
"""

from __future__ import annotations

import gc
import importlib
import logging
import ssl
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import anyio
import pytest
from chaos_routes import chaos_routes
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import CollectorRegistry, generate_latest

import poolwatch
import poolwatch.otel
import poolwatch.prometheus
from poolwatch import _api
from poolwatch._core import PoolCore
from poolwatch._loopback import LoopbackServer
from poolwatch._saturation import SaturationMonitor, check_all
from poolwatch._watch import ClientWatch


class Injected(Exception):
    """The failure planted in poolwatch."""


def _raise(*args: Any, **kwargs: Any) -> Any:
    raise Injected("planted by test_fault_injection")


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(autouse=True)
def _forget_this_tests_exporters() -> Iterator[None]:
    """``poolwatch.otel.enable()`` is process-wide: forget this test's exporters after it."""
    enabled = list(poolwatch.otel._enabled)
    listeners = list(_api._listeners)
    yield
    with poolwatch.otel._lock:
        poolwatch.otel._enabled[:] = enabled
    with _api._lock:
        _api._listeners[:] = listeners


@pytest.fixture
def errors_logged(caplog: pytest.LogCaptureFixture) -> Callable[[], Counter[str]]:
    """``() -> Counter`` of the sites that logged an internal error, and how many times."""
    caplog.set_level(logging.DEBUG, logger="poolwatch")

    def sites() -> Counter[str]:
        found: Counter[str] = Counter()
        for record in caplog.records:
            if record.name != "poolwatch" or record.levelno < logging.ERROR:
                continue
            assert record.msg.startswith("poolwatch internal error in %s"), record.msg
            site, exc_type = record.args[0], record.args[1]  # type: ignore[index]
            assert exc_type == "Injected", record.getMessage()
            found[str(site)] += 1
        return found

    return sites


def assert_each_site_logged_once(sites: Counter[str]) -> None:
    assert sites, "the planted failure was never reached"
    assert all(n == 1 for n in sites.values()), sites


# -- the host's workload, as an application runs it ----------------------------------------

Outcome = tuple[str, Any]


def _exception(exc: BaseException) -> str:
    return f"{type(exc).__module__}.{type(exc).__qualname__}"


async def host_workload_async(hx: Any, client: Any, base: str) -> list[Outcome]:
    """Every way a request can end, on a pool of one connection; what the host saw."""
    out: list[Outcome] = []

    async def step(name: str, fn: Callable[[], Any]) -> None:
        try:
            out.append((name, await fn()))
        except Exception as exc:
            out.append((name, _exception(exc)))

    async def get(path: str, **kwargs: Any) -> tuple[int, bytes]:
        r = await client.get(f"{base}{path}", **kwargs)
        return r.status_code, r.content

    async def read_fully() -> tuple[int, bytes]:
        async with client.stream("GET", f"{base}/stream?chunks=3&size=5") as r:
            return r.status_code, await r.aread()

    async def close_early() -> tuple[int, bytes]:
        async with client.stream("GET", f"{base}/stream?chunks=20&size=100&delay=0.01") as r:
            async for chunk in r.aiter_raw():
                return r.status_code, chunk[:1]  # how reads coalesce is timing
        raise AssertionError("no chunk")

    await step("200 with a body", lambda: get("/ok"))
    await step("503 with a body", lambda: get("/status?code=503"))
    await step("stream read fully", read_fully)
    await step("stream closed early", close_early)
    await step("dropped", lambda: get("/drop"))
    await step("reset mid-body", lambda: get("/reset"))
    await step("stalled body", lambda: get("/stall", timeout=hx.Timeout(5.0, read=0.1)))

    # Four requests on one connection: httpcore hands a freed connection to every waiter,
    # all but one fail with ConnectionNotAvailable inside the pool and queue again.
    queued: list[Any] = []

    async def one_of_four() -> None:
        try:
            queued.append(await get("/stream?chunks=2&size=10&delay=0.02"))
        except Exception as exc:
            queued.append(_exception(exc))

    async with anyio.create_task_group() as tg:
        for _ in range(4):
            tg.start_soon(one_of_four)
    out.append(("four queued behind one connection", sorted(queued, key=repr)))

    async with client.stream("GET", f"{base}/stream?chunks=2&size=10") as held:
        await step("pool timeout", lambda: get("/ok", timeout=hx.Timeout(5.0, pool=0.05)))
        with anyio.move_on_after(0.05) as scope:
            await client.get(f"{base}/ok")
        out.append(("cancelled while queued", scope.cancelled_caught))
        out.append(("the held stream", (held.status_code, await held.aread())))

    leaked = await client.send(client.build_request("GET", f"{base}/ok"), stream=True)
    out.append(("leaked response", leaked.status_code))
    del leaked
    gc.collect()
    return out


def host_workload_sync(hx: Any, client: Any, base: str) -> list[Outcome]:
    """The same workload for a sync client, with threads where the async one has tasks."""
    out: list[Outcome] = []

    def step(name: str, fn: Callable[[], Any]) -> None:
        try:
            out.append((name, fn()))
        except Exception as exc:
            out.append((name, _exception(exc)))

    def get(path: str, **kwargs: Any) -> tuple[int, bytes]:
        r = client.get(f"{base}{path}", **kwargs)
        return r.status_code, r.content

    def read_fully() -> tuple[int, bytes]:
        with client.stream("GET", f"{base}/stream?chunks=3&size=5") as r:
            return r.status_code, r.read()

    def close_early() -> tuple[int, bytes]:
        with client.stream("GET", f"{base}/stream?chunks=20&size=100&delay=0.01") as r:
            for chunk in r.iter_raw():
                return r.status_code, chunk[:1]  # how reads coalesce is timing
        raise AssertionError("no chunk")

    step("200 with a body", lambda: get("/ok"))
    step("503 with a body", lambda: get("/status?code=503"))
    step("stream read fully", read_fully)
    step("stream closed early", close_early)
    step("dropped", lambda: get("/drop"))
    step("reset mid-body", lambda: get("/reset"))
    step("stalled body", lambda: get("/stall", timeout=hx.Timeout(5.0, read=0.1)))

    queued: list[Any] = []
    lock = threading.Lock()

    def one_of_four() -> None:
        try:
            result: Any = get("/stream?chunks=2&size=10&delay=0.02")
        except Exception as exc:
            result = _exception(exc)
        with lock:
            queued.append(result)

    threads = [threading.Thread(target=one_of_four) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    out.append(("four queued behind one connection", sorted(queued, key=repr)))

    with client.stream("GET", f"{base}/stream?chunks=2&size=10") as held:
        step("pool timeout", lambda: get("/ok", timeout=hx.Timeout(5.0, pool=0.05)))
        out.append(("the held stream", (held.status_code, held.read())))

    leaked = client.send(client.build_request("GET", f"{base}/ok"), stream=True)
    out.append(("leaked response", leaked.status_code))
    del leaked
    gc.collect()
    return out


async def http2_workload(hx: Any, client: Any, server: LoopbackServer) -> list[Outcome]:
    """Concurrent HTTP/2 requests (TLS, stream slots, RST_STREAM), then a GOAWAY that refuses
    three streams in flight: httpcore retries them on a new connection (the requeue path,
    the only one httpcore2 takes: its pool never hands one connection to two waiters)."""
    base = server.url
    results: list[Any] = []

    async def call(path: str, into: list[Any], body: bool = True) -> None:
        try:
            r = await client.get(f"{base}{path}")
            into.append((path, r.status_code, r.content if body else None))
        except Exception as exc:
            into.append((path, _exception(exc)))

    async with anyio.create_task_group() as tg:
        for path in ("/ok", "/ok", "/status?code=404", "/reset"):
            tg.start_soon(call, path, results)

    refused: list[Any] = []
    first: list[Any] = []  # httpcore may fail the GOAWAY's own stream: not compared
    async with anyio.create_task_group() as tg:
        tg.start_soon(call, "/goaway_refusing?streams=4", first)
        while server.stats.in_flight_requests < 1:
            await anyio.sleep(0.005)
        # Headers after the GOAWAY: a stream refused once its headers are in fails with
        # httpcore's own ConnectionNotAvailable, poolwatch or not. (/delay's body says how
        # long it slept: compared by status only.)
        for _ in range(3):
            tg.start_soon(call, "/delay?s=0.2", refused, False)

    leaked = await client.send(client.build_request("GET", f"{base}/ok"), stream=True)
    leaked_status = leaked.status_code
    del leaked
    gc.collect()
    return [
        ("http2", sorted(results, key=repr)),
        ("refused by a GOAWAY", sorted(refused, key=repr)),
        ("leaked response", leaked_status),
    ]


def run_async(hx: Any, server: LoopbackServer, *, watched: bool, **options: Any) -> list[Outcome]:
    async def main() -> list[Outcome]:
        limits = hx.Limits(max_connections=1)
        async with hx.AsyncClient(limits=limits, timeout=5.0, **options) as client:
            if watched:
                poolwatch.instrument(client, name="faulty")
            return await host_workload_async(hx, client, server.url)

    return anyio.run(main)


def run_sync(hx: Any, server: LoopbackServer, *, watched: bool) -> list[Outcome]:
    with hx.Client(limits=hx.Limits(max_connections=1), timeout=5.0) as client:
        if watched:
            poolwatch.instrument(client, name="faulty-sync")
        return host_workload_sync(hx, client, server.url)


def run_http2(
    hx: Any, server: LoopbackServer, verify: ssl.SSLContext, *, watched: bool
) -> list[Outcome]:
    async def main() -> list[Outcome]:
        async with hx.AsyncClient(http2=True, verify=verify, timeout=5.0) as client:
            if watched:
                poolwatch.instrument(client, name="faulty-h2")
            return await http2_workload(hx, client, server)

    return anyio.run(main)


#: httpcore2's pool reserves a connection for the one request it hands it to, so on
#: HTTP/1.1 it never requeues; its requeue path is exercised over HTTP/2 (GOAWAY) below.
H1_CASES = [
    (library, step)
    for library in ("httpx", "httpx2")
    for step in (
        "start",
        "acquire",
        "requeue",
        "on_trace_event",
        "headers",
        "call_failed",
        "finish",
        "leaked",
        "connection_closed",
    )
    if (library, step) != ("httpx2", "requeue")
]
H1_IDS = [f"{library}-{step}" for library, step in H1_CASES]

#: No connection call of the HTTP/2 workload raises (its faults hit the stream after the
#: headers, or the pool): ``call_failed`` is planted over HTTP/1.1 only.
HTTP2_CORE_STEPS = [
    "start",
    "acquire",
    "requeue",
    "on_trace_event",
    "headers",
    "finish",
    "leaked",
    "connection_closed",
]


# -- the core's steps, on the request path --------------------------------------------------


@pytest.mark.parametrize(("library", "step"), H1_CASES, ids=H1_IDS)
def test_a_failing_core_step_leaves_every_async_request_as_it_is_without_poolwatch(
    library: str,
    step: str,
    loopback_server: LoopbackServer,
    monkeypatch: pytest.MonkeyPatch,
    errors_logged: Callable[[], Counter[str]],
) -> None:
    hx = importlib.import_module(library)
    without = run_async(hx, loopback_server, watched=False)
    monkeypatch.setattr(PoolCore, step, _raise)
    with_fault = run_async(hx, loopback_server, watched=True)
    assert with_fault == without
    assert_each_site_logged_once(errors_logged())


@pytest.mark.parametrize(("library", "step"), H1_CASES, ids=H1_IDS)
def test_a_failing_core_step_leaves_every_sync_request_as_it_is_without_poolwatch(
    library: str,
    step: str,
    loopback_server: LoopbackServer,
    monkeypatch: pytest.MonkeyPatch,
    errors_logged: Callable[[], Counter[str]],
) -> None:
    hx = importlib.import_module(library)
    without = run_sync(hx, loopback_server, watched=False)
    monkeypatch.setattr(PoolCore, step, _raise)
    with_fault = run_sync(hx, loopback_server, watched=True)
    assert with_fault == without
    assert_each_site_logged_once(errors_logged())


@pytest.mark.parametrize("step", HTTP2_CORE_STEPS)
def test_a_failing_core_step_leaves_http2_requests_as_they_are_without_poolwatch(
    hx: Any,
    step: str,
    loopback_server_factory: Callable[..., LoopbackServer],
    server_ssl_context: ssl.SSLContext,
    trustme_ca: Any,
    monkeypatch: pytest.MonkeyPatch,
    errors_logged: Callable[[], Counter[str]],
) -> None:
    server = loopback_server_factory(chaos_routes(), tls=server_ssl_context)

    def verify() -> ssl.SSLContext:  # httpcore sets ALPN on it: one per client
        ctx = ssl.create_default_context()
        trustme_ca.configure_trust(ctx)
        return ctx

    without = run_http2(hx, server, verify(), watched=False)
    monkeypatch.setattr(PoolCore, step, _raise)
    with_fault = run_http2(hx, server, verify(), watched=True)
    assert with_fault == without
    assert_each_site_logged_once(errors_logged())


# -- readers: snapshot, exporters, saturation ----------------------------------------------


def test_a_failing_snapshot_breaks_no_request_no_scrape_and_no_saturation_check(
    hx: Any,
    loopback_server: LoopbackServer,
    monkeypatch: pytest.MonkeyPatch,
    errors_logged: Callable[[], Counter[str]],
) -> None:
    registry = CollectorRegistry()
    poolwatch.prometheus.enable(registry)
    reader = InMemoryMetricReader()
    meter_provider = MeterProvider(metric_readers=[reader])
    poolwatch.otel.enable(meter_provider, TracerProvider(), spans=False)
    without = run_async(hx, loopback_server, watched=False)
    monkeypatch.setattr(ClientWatch, "snapshot", _raise)
    monkeypatch.setattr(ClientWatch, "pressure", _raise)  # the saturation sampler's reading

    scraped: list[bytes] = []

    async def main() -> list[Outcome]:
        limits = hx.Limits(max_connections=1)
        async with hx.AsyncClient(limits=limits, timeout=5.0) as client:
            poolwatch.instrument(client, name="unreadable", saturation_threshold=0.5)
            outcomes = await host_workload_async(hx, client, loopback_server.url)
            for _ in range(3):  # scrapes and checks while the pool is live
                scraped.append(generate_latest(registry))
                reader.collect()
                check_all()
            return outcomes

    with_fault = anyio.run(main)
    meter_provider.shutdown()
    assert with_fault == without
    assert all(b"# HELP poolwatch_pool_pending_requests" in text for text in scraped)
    sites = errors_logged()
    assert_each_site_logged_once(sites)
    assert {"prometheus collect", "otel collect", "saturation check"} <= set(sites)


def test_failing_prometheus_samples_leave_the_scrape_and_the_requests_working(
    hx: Any,
    loopback_server: LoopbackServer,
    monkeypatch: pytest.MonkeyPatch,
    errors_logged: Callable[[], Counter[str]],
) -> None:
    registry = CollectorRegistry()
    poolwatch.prometheus.enable(registry)
    without = run_async(hx, loopback_server, watched=False)
    monkeypatch.setattr(poolwatch.prometheus, "samples", _raise)

    async def main() -> tuple[list[Outcome], list[bytes]]:
        async with hx.AsyncClient(limits=hx.Limits(max_connections=1), timeout=5.0) as client:
            poolwatch.instrument(client, name="unsampled")
            outcomes = await host_workload_async(hx, client, loopback_server.url)
            return outcomes, [generate_latest(registry) for _ in range(3)]

    with_fault, scraped = anyio.run(main)
    assert with_fault == without
    assert all(b"# TYPE poolwatch_pool_requests_total counter" in text for text in scraped)
    assert errors_logged() == {"prometheus collect": 1}


def test_failing_opentelemetry_hooks_and_callbacks_leave_every_request_as_it_is(
    hx: Any,
    loopback_server: LoopbackServer,
    monkeypatch: pytest.MonkeyPatch,
    errors_logged: Callable[[], Counter[str]],
) -> None:
    reader = InMemoryMetricReader()
    meter_provider = MeterProvider(metric_readers=[reader])
    exporter = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
    poolwatch.otel.enable(meter_provider, tracer_provider)
    without = run_async(hx, loopback_server, watched=False)
    for hook in ("_on_start", "_on_headers", "_on_finish", "_record_phases", "_origin_attributes"):
        monkeypatch.setattr(poolwatch.otel._OtelExporter, hook, _raise)
    monkeypatch.setattr(poolwatch._samples, "samples", _raise)  # what every_pool() reads

    async def main() -> list[Outcome]:
        async with hx.AsyncClient(limits=hx.Limits(max_connections=1), timeout=5.0) as client:
            poolwatch.instrument(client, name="otel-faulty")
            outcomes = await host_workload_async(hx, client, loopback_server.url)
            for _ in range(3):
                reader.collect()
            return outcomes

    with_fault = anyio.run(main)
    meter_provider.shutdown()
    tracer_provider.shutdown()
    assert with_fault == without
    sites = errors_logged()
    assert_each_site_logged_once(sites)
    assert {
        "request start hook",
        "response headers hook",
        "request finish hook",
        "otel collect",
    } <= set(sites)


@pytest.mark.parametrize("fault", ["the on_saturation callback", "the saturation evaluation"])
def test_a_failing_saturation_check_or_callback_is_logged_once_and_the_pool_serves_on(
    hx: Any,
    fault: str,
    loopback_server: LoopbackServer,
    monkeypatch: pytest.MonkeyPatch,
    errors_logged: Callable[[], Counter[str]],
) -> None:
    without = run_async(hx, loopback_server, watched=False)
    if fault == "the saturation evaluation":
        monkeypatch.setattr(SaturationMonitor, "evaluate", _raise)
    called: list[Any] = []

    def on_saturation(event: Any) -> None:
        called.append(event)
        raise Injected("planted in the callback")

    async def main() -> list[Outcome]:
        async with hx.AsyncClient(limits=hx.Limits(max_connections=1), timeout=5.0) as client:
            poolwatch.instrument(
                client,
                name="saturated",
                saturation_threshold=0.5,
                warning_interval=1.0,
                on_saturation=on_saturation,
            )
            # Saturate the pool (its one connection held), and check it again and again.
            url = f"{loopback_server.url}/stream?chunks=2&size=10"
            async with client.stream("GET", url) as held:
                for second in range(5):
                    check_all(now=1000.0 + 2 * second)
                body = await held.aread()
            assert body == b"a" * 10 + b"b" * 10
            return await host_workload_async(hx, client, loopback_server.url)

    with_fault = anyio.run(main)
    assert with_fault == without
    sites = errors_logged()
    if fault == "the on_saturation callback":
        assert len(called) == 5  # saturated, then still saturated at every interval
        assert sites == {"on_saturation callback": 1}
    else:
        assert sites == {"saturation check": 1}
