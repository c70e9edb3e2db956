"""Randomized workloads: Hypothesis draws the client library, the event loop, the protocol,
the pool's limit and timeout, the concurrency and a mix of calls (healthy, slow, streamed,
closed early, leaked, reset, dropped, stalled), some cancelled at random moments. After each
workload, at rest, poolwatch's books must balance against ground truth: the loopback
server's counters, httpcore's own connections, what the callers caught, and poolwatch's
own Prometheus exposition.

Profiles (``tests/conftest.py``): ``ci`` (default) is derandomized and short;
``pytest tests/test_randomized.py --hypothesis-profile=dev`` runs many fresh examples and
shrinks a failure to a minimal workload.
"""

from __future__ import annotations

import gc
import importlib
import itertools
import math
import ssl
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import anyio
import trustme
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

import poolwatch
import poolwatch.prometheus
from poolwatch._histogram import HistogramSnapshot
from poolwatch._loopback import LoopbackServer, default_routes
from poolwatch._samples import samples

#: The read timeout of a ``stall`` call (every other call gets 5 s).
STALL_READ_TIMEOUT = 0.1
#: A short pool timeout, when the workload draws one.
SHORT_POOL_TIMEOUT = 0.05
#: If a workload has not finished by then (httpcore#1093 can leave a slot taken forever,
#: and the pool timeout may be None), what is left is cancelled: cancellations too must
#: balance the books.
WORKLOAD_DEADLINE = 4.0

ROUTES = (
    "ok",
    "delay",
    "stream_full",
    "stream_early",
    "leak",
    "reset",
    "drop",
    "stall",
)


@dataclass(frozen=True)
class Call:
    route: str
    #: Cancel the call after this many seconds (an anyio cancel scope), or never.
    cancel_after: float | None


@dataclass(frozen=True)
class Workload:
    library: str  # "httpx" or "httpx2"
    backend: str  # "asyncio" or "trio"
    protocol: str  # "h1" (clear) or "h2" (TLS, ALPN)
    max_connections: int
    pool_timeout: float | None
    #: One list of calls per concurrent task, run one after another.
    tasks: tuple[tuple[Call, ...], ...]

    @property
    def calls(self) -> list[Call]:
        return [c for task in self.tasks for c in task]


calls = st.builds(
    Call,
    route=st.sampled_from(ROUTES),
    cancel_after=st.one_of(st.none(), st.none(), st.sampled_from([0.0, 0.005, 0.02, 0.05, 0.1])),
)


@st.composite
def workloads(draw: st.DrawFn) -> Workload:
    protocol = draw(st.sampled_from(["h1", "h2"]))
    max_connections = draw(st.integers(1, 4))
    tasks = draw(st.lists(st.lists(calls, min_size=1, max_size=3), min_size=1, max_size=12))
    # A leaked response holds its HTTP/1.1 connection forever: leave the pool one connection
    # to serve the rest, or every later call would just wait for the deadline.
    leaks_allowed = max_connections - 1 if protocol == "h1" else 3
    leaks = itertools.count()
    tasks = [
        [
            Call("stream_full", c.cancel_after)
            if c.route == "leak" and next(leaks) >= leaks_allowed
            else c
            for c in task
        ]
        for task in tasks
    ]
    return Workload(
        library=draw(st.sampled_from(["httpx", "httpx2"])),
        backend=draw(st.sampled_from(["asyncio", "trio"])),
        protocol=protocol,
        max_connections=max_connections,
        pool_timeout=draw(st.sampled_from([None, SHORT_POOL_TIMEOUT])),
        tasks=tuple(tuple(task) for task in tasks),
    )


@dataclass
class Book:
    """What the callers saw."""

    caught: Counter[str] = field(default_factory=Counter)
    cancelled: int = 0
    leaked: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    #: TCP connects cancelled before httpcore saw them complete (from the callers' own
    #: ``trace`` extension): the server may have accepted those, the pool never had them.
    connects_cancelled: int = 0
    #: Exceptions that are not the library's own (httpcore2's HTTP/2 code can raise
    #: ``ValueError: semaphore released too many times`` after a cancellation, and then
    #: keeps a phantom request and a busy connection in its pool, poolwatch or not).
    foreign: Counter[str] = field(default_factory=Counter)

    async def trace(self, name: str, info: dict[str, Any]) -> None:
        if name.endswith("connect_tcp.failed") and is_cancellation(info.get("exception")):
            self.connects_cancelled += 1


def is_cancellation(exc: BaseException | None) -> bool:
    """A cancellation, also as trio's nurseries raise it: a group of cancellations only."""
    if isinstance(exc, BaseExceptionGroup):
        return all(is_cancellation(e) for e in exc.exceptions)
    return isinstance(exc, anyio.get_cancelled_exc_class())


# -- the calls -----------------------------------------------------------------------------


async def _call(client: Any, hx: Any, base: str, call: Call, book: Book) -> None:
    route = call.route
    ext = {"trace": book.trace}
    if route == "ok":
        book.statuses[(await client.get(f"{base}/ok", extensions=ext)).status_code] += 1
    elif route == "delay":
        r = await client.get(f"{base}/delay?s=0.03", extensions=ext)
        book.statuses[r.status_code] += 1
    elif route == "stream_full":
        url = f"{base}/stream?chunks=3&size=100&delay=0.01"
        async with client.stream("GET", url, extensions=ext) as r:
            await r.aread()
            book.statuses[r.status_code] += 1
    elif route == "stream_early":
        url = f"{base}/stream?chunks=20&size=1000&delay=0.005"
        async with client.stream("GET", url, extensions=ext) as r:
            book.statuses[r.status_code] += 1
            async for _ in r.aiter_raw():
                break
    elif route == "leak":
        request = client.build_request("GET", f"{base}/stream?chunks=2&size=10", extensions=ext)
        response = await client.send(request, stream=True)
        book.leaked += 1  # no await since the response came: a cancel cannot fall between
        book.statuses[response.status_code] += 1
        del response
    elif route == "reset":
        await client.get(f"{base}/reset", extensions=ext)
    elif route == "drop":
        await client.get(f"{base}/drop", extensions=ext)
    elif route == "stall":
        timeout = hx.Timeout(5.0, read=STALL_READ_TIMEOUT, pool=client.timeout.pool)
        await client.get(f"{base}/stall", timeout=timeout, extensions=ext)
    else:  # pragma: no cover
        raise AssertionError(route)


async def _one(client: Any, hx: Any, base: str, call: Call, book: Book) -> None:
    deadline = math.inf if call.cancel_after is None else call.cancel_after
    try:
        with anyio.move_on_after(deadline) as scope:
            try:
                await _call(client, hx, base, call, book)
            except Exception as exc:
                book.caught[type(exc).__name__] += 1
                if not isinstance(exc, hx.HTTPError | hx.StreamError):
                    book.foreign[type(exc).__name__] += 1
        if scope.cancelled_caught:
            book.cancelled += 1
    except anyio.get_cancelled_exc_class():  # the workload's deadline
        book.cancelled += 1
        raise


async def _task(client: Any, hx: Any, base: str, calls: tuple[Call, ...], book: Book) -> None:
    for call in calls:
        await _one(client, hx, base, call, book)


# -- ground truth --------------------------------------------------------------------------


def exposition(registry: CollectorRegistry, pool: str) -> dict[tuple[str, tuple[Any, ...]], float]:
    """The pool's samples as Prometheus clients read them: (name, sorted labels) -> value."""
    text = generate_latest(registry).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.labels.get("pool_name") == pool
    }


def expected_exposition(snap: poolwatch.PoolSnapshot) -> dict[tuple[str, tuple[Any, ...]], float]:
    """The same, built from the snapshot alone."""
    out: dict[tuple[str, tuple[Any, ...]], float] = {}
    for spec, values, value in samples(snap):
        labels = dict(zip(spec.labels, values, strict=True))
        if isinstance(value, HistogramSnapshot):
            h = value
            name = spec.prometheus_name
            bounds = [*(repr(float(b)) for b in h.bounds), "+Inf"]
            for le, n in zip(bounds, h.cumulative(), strict=True):
                out[(f"{name}_bucket", tuple(sorted({**labels, "le": le}.items())))] = n
            out[(f"{name}_count", tuple(sorted(labels.items())))] = h.count
            out[(f"{name}_sum", tuple(sorted(labels.items())))] = h.sum
        else:
            out[(spec.prometheus_name, tuple(sorted(labels.items())))] = value
    return out


def total(series: dict[tuple[str, tuple[Any, ...]], float], name: str, **labels: str) -> float:
    return sum(
        v for (n, ls), v in series.items() if n == name and labels.items() <= dict(ls).items()
    )


_names = itertools.count()


async def run_workload(
    w: Workload,
    server: LoopbackServer,
    client_ssl: ssl.SSLContext | None,
    registry: CollectorRegistry,
) -> None:
    hx = importlib.import_module(w.library)
    name = f"random-{next(_names)}"
    options: dict[str, Any] = {}
    if w.protocol == "h2":
        options = {"http2": True, "verify": client_ssl}
    book = Book()
    async with hx.AsyncClient(
        limits=hx.Limits(max_connections=w.max_connections),
        timeout=hx.Timeout(5.0, pool=w.pool_timeout),
        **options,
    ) as client:
        poolwatch.instrument(client, name=name)
        with anyio.move_on_after(WORKLOAD_DEADLINE):
            async with anyio.create_task_group() as tg:
                for calls in w.tasks:
                    tg.start_soon(_task, client, hx, server.url, calls, book)
        gc.collect()
        if server_count_is_exact(w):
            await _settle(client, server)
        check_at_rest(w, client, server, book, registry, name)


def httpcore_busy_and_idle(client: Any) -> tuple[int, int]:
    """(busy, idle) connections by httpcore's own objects, as they really are.

    Busy: serving a request, that is HTTP/1.1 not idle, HTTP/2 with a stream in the
    connection's own stream table. Not ``is_idle()`` for HTTP/2: a request cancelled while
    it waits for a stream slot (or for the connection's preface) leaves the connection
    ``ACTIVE`` with no stream at all, for good (httpcore and httpcore2 alike).
    """
    busy = idle = 0
    for conn in client._transport._pool.connections:
        if conn.is_closed() or conn.info() == "CONNECTING":
            continue
        inner = conn._connection
        streams = getattr(inner, "_events", None)
        in_use = bool(streams) if streams is not None else not conn.is_idle()
        if streams is None and not in_use and inner._network_stream.get_extra_info("is_readable"):
            # HTTP/1.1 the server closed, httpcore not told yet: has_expired's own rule.
            continue
        busy += in_use
        idle += not in_use
    return busy, idle


def server_count_is_exact(w: Workload) -> bool:
    """Whether the server's open-connection count can be held against the client's.

    Not for HTTP/2 (TLS) with cancellations: a request cancelled in the middle of its TLS
    handshake makes httpcore drop the connection without closing its TCP socket (its
    ``start_tls`` closes the stream on ``Exception`` only), so the server keeps counting a
    connection that no pool holds any more, until the garbage collector or a timeout ends it.
    Those examples are held against httpcore's own list of connections instead.
    """
    return w.protocol == "h1" or all(c.cancel_after is None for c in w.calls)


async def _settle(client: Any, server: LoopbackServer) -> None:
    """Give the server's connection count a moment to catch up with closes in flight."""
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline:
        snap = poolwatch.snapshot(client)
        if server.stats.open_connections == snap.idle_connections + snap.active_connections:
            return
        await anyio.sleep(0.01)


def check_at_rest(
    w: Workload,
    client: Any,
    server: LoopbackServer,
    book: Book,
    registry: CollectorRegistry,
    name: str,
) -> None:
    snap = poolwatch.snapshot(client)
    busy, idle = httpcore_busy_and_idle(client)
    stats = server.stats
    assert snap.active_requests == 0
    assert snap.pending_requests == 0
    # A leaked response keeps its connection forever: httpcore's own books say which
    # (unless httpcore broke its own books, see ``Book.foreign``).
    httpcore_sane = not book.foreign
    if httpcore_sane:
        assert snap.active_connections == busy
    if w.protocol == "h1":
        assert snap.active_connections == book.leaked
    else:  # HTTP/2: leaked streams may share a connection, which another stream may kill
        assert snap.active_connections <= book.leaked
    if httpcore_sane:
        assert snap.idle_connections == idle
    if server_count_is_exact(w):
        assert snap.idle_connections == stats.open_connections - snap.active_connections
    # A connect cancelled the moment the kernel completed it reaches the server's accept()
    # but never the pool; the callers' own trace saw each such connect fail.
    assert (
        snap.connections_created_total
        <= stats.accepted_connections
        <= snap.connections_created_total + book.connects_cancelled
    )
    assert snap.pool_timeouts_total == book.caught["PoolTimeout"]
    assert snap.leaked_responses_total == book.leaked
    # Every request that entered the pool ended once, and saw its queue wait observed once.
    durations = snap.request_duration.count
    assert sum(o.time_in_queue.count for o in snap.origins) == durations
    assert durations <= len(w.calls)
    errors = Counter(snap.errors or {})
    # A cancel can land after the pool has finished with the request (in httpx's own code),
    # so poolwatch may count fewer cancellations than the callers saw, never more.
    assert errors.pop("cancelled", 0) <= book.cancelled
    # A foreign exception out of a response stream's close is not told from one the
    # application raised while the stream was open, so poolwatch may count fewer of those.
    for error_type, n in book.foreign.items():
        assert errors.pop(error_type, 0) <= n
    assert errors == book.caught - book.foreign

    series = exposition(registry, name)
    assert series, f"{name} is missing from a private registry poolwatch was enabled on"
    assert series == expected_exposition(snap)
    assert total(series, "poolwatch_pool_requests_total") == snap.requests_total
    assert (
        total(series, "poolwatch_pool_requests_total", connection_reused="true")
        == snap.reused_requests_total
    )
    assert (
        total(series, "poolwatch_pool_connections_created_total") == snap.connections_created_total
    )
    assert total(series, "poolwatch_pool_timeouts_total") == snap.pool_timeouts_total
    assert total(series, "poolwatch_pool_leaked_responses_total") == snap.leaked_responses_total
    assert total(series, "poolwatch_pool_pending_requests") == 0
    assert total(series, "http_client_active_requests") == 0
    assert (
        total(series, "http_client_open_connections", http_connection_state="active")
        == snap.active_connections
    )
    assert (
        total(series, "http_client_open_connections", http_connection_state="idle")
        == snap.idle_connections
    )
    assert total(series, "poolwatch_pool_request_errors_total") == sum((snap.errors or {}).values())
    assert total(series, "http_client_request_time_in_queue_seconds_count") == durations


@given(w=workloads())
def test_any_workload_leaves_books_that_balance_against_the_server_httpcore_and_callers(
    w: Workload,
    trustme_ca: trustme.CA,
    server_ssl_context: ssl.SSLContext,
) -> None:
    server = LoopbackServer(
        default_routes(), tls=server_ssl_context if w.protocol == "h2" else None
    ).start()
    client_ssl = None
    if w.protocol == "h2":
        client_ssl = ssl.create_default_context()
        trustme_ca.configure_trust(client_ssl)
    registry = CollectorRegistry()
    poolwatch.prometheus.enable(registry)
    try:
        anyio.run(run_workload, w, server, client_ssl, registry, backend=w.backend)
    finally:
        server.stop()


def test_a_fresh_private_registry_always_shows_the_pools(hx: Any) -> None:
    # What each randomized example does: a new registry, enable(), scrape.
    with hx.Client() as client:
        poolwatch.instrument(client, name="fresh-registry")
        missing = 0
        for _ in range(50):
            registry = CollectorRegistry()
            poolwatch.prometheus.enable(registry)
            if not exposition(registry, "fresh-registry"):
                missing += 1
            del registry
            gc.collect()
        assert missing == 0, f"{missing} of 50 fresh registries got no poolwatch collector"


def test_a_request_cancelled_while_waiting_for_an_http2_stream_slot_still_has_its_wait_observed(
    hx: Any,
    loopback_server_factory: Any,
    server_ssl_context: ssl.SSLContext,
    client_ssl_context: ssl.SSLContext,
) -> None:
    # The smallest workload Hypothesis found to break "every request that ended observed its
    # queue wait once", made deterministic: a request waits inside an HTTP/2 connection (for
    # a stream slot) and is cancelled there, before any trace event ended its wait.
    server: LoopbackServer = loopback_server_factory(
        tls=server_ssl_context, h2_max_concurrent_streams=1
    )

    async def main() -> None:
        async with hx.AsyncClient(http2=True, verify=client_ssl_context) as client:
            poolwatch.instrument(client, name="h2-slot-cancel")
            await client.get(f"{server.url}/ok")  # the connection, and its SETTINGS
            async with anyio.create_task_group() as tg:
                tg.start_soon(client.get, f"{server.url}/delay?s=0.3")
                while server.stats.in_flight_requests < 1:
                    await anyio.sleep(0.005)
                with anyio.move_on_after(0.1) as scope:
                    await client.get(f"{server.url}/ok")  # waits for the only slot
                # Failed once in a full run (not reproduced in 18 runs alone, under load too):
                # say what the server saw, so that a next time tells why.
                assert scope.cancelled_caught, f"no wait for the slot: {server.stats.snapshot()}"
            snap = poolwatch.snapshot(client)
        (origin,) = snap.origins
        assert snap.errors == {"cancelled": 1}
        # Like a request cancelled in the pool's queue, it never obtained a connection to
        # send on: it is no request in requests_total, and the server never saw it.
        assert snap.requests_total == 2 == server.stats.requests
        assert snap.request_duration.count == 3
        assert origin.time_in_queue.count == 3
        assert origin.time_in_queue.sum >= 0.09  # the cancelled one waited ~0.1 s (its own clock)

    anyio.run(main)


def test_a_trio_cancellation_during_the_connect_is_counted_as_cancelled(hx: Any) -> None:
    # Found by the "dev" profile: trio connects through a nursery (happy eyeballs), so a
    # cancel that lands in the connect leaves httpcore as a BaseExceptionGroup of Cancelled.
    # The caller's cancel scope sees a plain cancellation; the books must say "cancelled".
    server = LoopbackServer(default_routes()).start()
    seen: Counter[str] = Counter()

    async def trace(name: str, info: dict[str, Any]) -> None:
        if name.endswith("connect_tcp.failed"):
            seen[type(info["exception"]).__name__] += 1

    async def main() -> Counter[str]:
        errors: Counter[str] = Counter()
        cancelled = 0
        for deadline in [0.0, 0.0001, 0.0002, 0.0005, 0.001, 0.002] * 10:
            async with hx.AsyncClient() as client:
                poolwatch.instrument(client, name="trio-connect-cancel")
                with anyio.move_on_after(deadline) as scope:
                    await client.get(f"{server.url}/ok", extensions={"trace": trace})
                cancelled += scope.cancelled_caught
                errors.update(poolwatch.snapshot(client).errors or {})
        assert errors["cancelled"] <= cancelled
        return errors

    try:
        errors = anyio.run(main, backend="trio")
    finally:
        server.stop()
    assert seen["BaseExceptionGroup"] > 0, "no connect was cancelled inside trio's nursery"
    assert set(errors) <= {"cancelled"}, errors
