"""Every snapshot figure against ground truth: the server's books, httpcore's own state, and
the exceptions the caller caught. Each scenario runs on httpx and httpx2, async on asyncio and
trio."""

from __future__ import annotations

import gc
import importlib
import select
import socket
import ssl
import threading
import time
from multiprocessing.pool import ThreadPool
from typing import Any

import anyio
import pytest
from truth import await_until, httpcore_view, wait_until

import poolwatch
from poolwatch import _api, _httpcore
from poolwatch._loopback import LoopbackServer


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


async def two_idle_connections(client: Any, url: str) -> None:
    """Two requests at once: two connections to the server, both idle after."""
    async with anyio.create_task_group() as tg:
        for _ in range(2):
            tg.start_soon(client.get, f"{url}/delay?ms=100")


def idle_connections_sync(client: Any, url: str, n: int) -> None:
    """``n`` requests at once, from ``n`` threads: ``n`` connections, all idle after."""
    with ThreadPool(n) as threads:
        threads.map(lambda _: client.get(f"{url}/delay?ms=100"), range(n))


def two_idle_connections_sync(client: Any, url: str) -> None:
    """``two_idle_connections`` for a sync client, from two threads."""
    idle_connections_sync(client, url, 2)


def assert_at_rest(snap: poolwatch.PoolSnapshot) -> None:
    assert snap.active_requests == 0
    assert snap.pending_requests == 0
    assert snap.active_connections == 0
    assert snap.pending_max_age == 0.0
    assert snap.active_max_age == 0.0


@pytest.mark.anyio
async def test_requests_queue_behind_a_small_pool_and_every_figure_matches_the_server(
    hx: Any, loopback_server: LoopbackServer
) -> None:
    url = f"{loopback_server.url}/delay?s=0.3"
    async with hx.AsyncClient(limits=hx.Limits(max_connections=2)) as client:
        poolwatch.instrument(client, name="small")
        async with anyio.create_task_group() as tg:
            for _ in range(10):
                tg.start_soon(client.get, url)
            await await_until(
                lambda: loopback_server.stats.in_flight_requests == 2, what="2 in flight"
            )
            snap = poolwatch.snapshot(client)
            assert snap.active_connections == 2 == httpcore_view(client).busy
            assert snap.pending_requests == 8
            assert snap.active_requests == 10
            assert snap.utilization == 1.0
            assert snap.max_connections == 2
            assert snap.pending_max_age > 0.0
        snap = poolwatch.snapshot(client)
        stats = loopback_server.stats
        assert snap.requests_total == 10 == stats.requests
        assert snap.connections_created_total == 2 == stats.accepted_connections
        assert snap.reused_requests_total == 8
        assert snap.reuse_ratio == 0.8
        assert_at_rest(snap)
        assert snap.idle_connections == 2 == stats.open_connections == httpcore_view(client).idle
        (origin,) = snap.origins
        assert origin.time_in_queue.count == 10
        # Five waves of two 0.3 s requests: the pairs waited 0, 0.3, 0.6, 0.9 and 1.2 s.
        assert 5.5 < origin.time_in_queue.sum < 7.5
        assert snap.request_duration.count == 10
        assert snap.time_to_first_byte.count == 10
        assert snap.connect_time.count == 2


@pytest.mark.anyio
async def test_pool_timeouts_equal_the_exceptions_the_caller_caught(
    hx: Any, loopback_server: LoopbackServer
) -> None:
    caught: list[BaseException] = []

    async def call() -> None:
        try:
            await client.get(f"{loopback_server.url}/delay?s=0.4")
        except Exception as exc:
            caught.append(exc)

    timeout = hx.Timeout(5.0, pool=0.1)
    async with hx.AsyncClient(limits=hx.Limits(max_connections=1), timeout=timeout) as client:
        poolwatch.instrument(client)
        async with anyio.create_task_group() as tg:
            for _ in range(4):
                tg.start_soon(call)
        snap = poolwatch.snapshot(client)
    assert caught, "the scenario must produce PoolTimeouts"
    assert all(type(e) is hx.PoolTimeout for e in caught)  # the library's own class, unwrapped
    assert snap.pool_timeouts_total == len(caught)
    assert snap.errors == {"PoolTimeout": len(caught)}
    assert snap.requests_total == 4 - len(caught) == loopback_server.stats.requests
    assert_at_rest(snap)


@pytest.mark.anyio
async def test_one_request_object_sent_twice_at_once_leaves_no_request_waiting_for_ever(
    hx: Any, loopback_server: LoopbackServer
) -> None:
    # httpcore lets a bodiless request object go through its pool twice at once; the record
    # poolwatch hangs on it for the connection's call can then be only the later one's.
    httpcore = importlib.import_module(hx.__name__.replace("httpx", "httpcore"))
    async with hx.AsyncClient(limits=hx.Limits(max_connections=1)) as client:
        poolwatch.instrument(client)
        pool = client._transport._pool
        url = hx.URL(f"{loopback_server.url}/ok")
        request = httpcore.Request("GET", str(url), headers=[(b"Host", url.netloc)])
        statuses = []

        async def send() -> None:
            response = await pool.handle_async_request(request)
            await response.aread()
            await response.aclose()
            statuses.append(response.status)

        # Both wait for the one connection, held by a third response, so both are tagged
        # before either reaches a connection's call.
        held = await client.send(client.build_request("GET", str(url)), stream=True)
        async with anyio.create_task_group() as tg:
            tg.start_soon(send)
            tg.start_soon(send)
            await await_until(lambda: poolwatch.snapshot(client).pending_requests == 2)
            await held.aclose()
        assert statuses == [200, 200]
        snap = poolwatch.snapshot(client)
        assert_at_rest(snap)  # none pending or active for ever
        assert snap.request_duration.count == 3


@pytest.mark.anyio
async def test_a_stream_read_to_the_end_gives_its_connection_back_for_reuse(
    hx: Any, loopback_server: LoopbackServer
) -> None:
    async with hx.AsyncClient() as client:
        poolwatch.instrument(client)
        for _ in range(3):
            async with client.stream("GET", f"{loopback_server.url}/stream?chunks=5&size=100") as r:
                chunks = [c async for c in r.aiter_raw()]
            assert sum(map(len, chunks)) == 500
        snap = poolwatch.snapshot(client)
        assert snap.connections_created_total == 1 == loopback_server.stats.accepted_connections
        assert snap.reused_requests_total == 2
        assert snap.idle_connections == 1 == httpcore_view(client).idle
        assert_at_rest(snap)


@pytest.mark.anyio
async def test_a_stream_closed_early_closes_its_connection_and_ends_the_request(
    hx: Any, loopback_server: LoopbackServer
) -> None:
    async with hx.AsyncClient() as client:
        poolwatch.instrument(client)
        async with client.stream(
            "GET", f"{loopback_server.url}/stream?chunks=20&size=1000&delay=0.02"
        ) as r:
            async for _ in r.aiter_raw():
                assert poolwatch.snapshot(client).active_requests == 1
                break
        snap = poolwatch.snapshot(client)
        assert_at_rest(snap)
        # httpcore closes a connection whose response was not read to the end.
        assert snap.idle_connections == 0 == httpcore_view(client).open
        await await_until(lambda: loopback_server.stats.open_connections == 0, what="server close")
        assert snap.origins[0].connection_duration.count == 1
        assert snap.errors == {}


@pytest.mark.anyio
async def test_a_connection_close_response_read_to_the_end_closes_its_connection_once(
    hx: Any, loopback_server: LoopbackServer
) -> None:
    # The release keeps no frame of poolwatch's in the await chain when it keeps the
    # connection open; when it closes it (here: ``Connection: close``), poolwatch must see it.
    async with hx.AsyncClient() as client:
        poolwatch.instrument(client)
        for _ in range(3):
            assert (await client.get(f"{loopback_server.url}/goaway")).status_code == 200
        await client.get(f"{loopback_server.url}/ok")
        snap = poolwatch.snapshot(client)
        assert_at_rest(snap)
        assert snap.connections_created_total == 4 == loopback_server.stats.accepted_connections
        assert snap.reused_requests_total == 0
        (origin,) = snap.origins
        assert origin.connection_duration.count == 3  # the closed ones, once each
        assert snap.idle_connections == 1 == httpcore_view(client).idle


def test_a_sync_connection_close_response_closes_its_connection_once(
    hx: Any, loopback_server: LoopbackServer
) -> None:
    with hx.Client() as client:
        poolwatch.instrument(client)
        for _ in range(3):
            assert client.get(f"{loopback_server.url}/goaway").status_code == 200
        client.get(f"{loopback_server.url}/ok")
        snap = poolwatch.snapshot(client)
        assert_at_rest(snap)
        assert snap.connections_created_total == 4 == loopback_server.stats.accepted_connections
        (origin,) = snap.origins
        assert origin.connection_duration.count == 3
        assert snap.idle_connections == 1 == httpcore_view(client).idle


@pytest.mark.anyio
@pytest.mark.parametrize("through_pool", [True, False], ids=["pool-close", "httpcore-1.0.2"])
async def test_a_connection_the_pool_drops_beyond_its_keep_alive_limit_ends_as_it_closes(
    hx: Any, loopback_server: LoopbackServer, monkeypatch: pytest.MonkeyPatch, through_pool: bool
) -> None:
    # The pool tells poolwatch through its ``_close_connections``; an httpcore before 1.0.3
    # has none and closes each connection itself, whose own close poolwatch then watches.
    if not through_pool:
        monkeypatch.setattr(_httpcore, "closes_through_pool", lambda pool: False)
    limits = hx.Limits(max_keepalive_connections=1)
    async with hx.AsyncClient(limits=limits) as client:
        poolwatch.instrument(client)
        url = f"{loopback_server.url}/ok"
        held = [await client.send(client.build_request("GET", url), stream=True) for _ in (0, 1)]
        conns = client._transport._pool.connections
        hooked = [_httpcore.instance_attr(c, "aclose") is not None for c in conns]
        assert hooked == [not through_pool] * 2
        for response in held:  # read to the end: two idle, one more than the pool keeps
            await response.aread()
            await response.aclose()
        snap = poolwatch.snapshot(client)
        assert snap.connections_created_total == 2 == loopback_server.stats.accepted_connections
        assert snap.idle_connections == 1 == httpcore_view(client).open
        (origin,) = snap.origins
        assert origin.connection_duration.count == 1  # the dropped one, at once
        await await_until(lambda: loopback_server.stats.open_connections == 1, what="a close")
    closed = poolwatch.snapshot(client).origins[0].connection_duration
    assert closed.count == 2  # and the kept one when the client closed


@pytest.mark.anyio
async def test_a_connection_closed_by_a_direct_call_ends_at_the_next_reading(
    hx: Any, loopback_server: LoopbackServer
) -> None:
    # No hook sees it: the pool drops a connection that closed itself without its close call.
    async with hx.AsyncClient() as client:
        poolwatch.instrument(client)
        await client.get(f"{loopback_server.url}/ok")
        (conn,) = client._transport._pool.connections
        await conn.aclose()
        await client.get(f"{loopback_server.url}/ok")  # the pool drops it, opens another
        snap = poolwatch.snapshot(client)
        assert snap.connections_created_total == 2 == loopback_server.stats.accepted_connections
        assert snap.origins[0].connection_duration.count == 1
        assert snap.idle_connections == 1 == httpcore_view(client).open
    assert poolwatch.snapshot(client).origins[0].connection_duration.count == 2  # once each


@pytest.mark.anyio
async def test_an_http2_connection_the_server_closed_while_idle_ends_at_the_next_reading(
    hx: Any,
    loopback_server_factory: Any,
    server_ssl_context: ssl.SSLContext,
    client_ssl_context: ssl.SSLContext,
) -> None:
    # It reads the server's GOAWAY at the next request and closes itself; httpcore retries
    # the request on a new connection and drops the old one without a close call.
    server: LoopbackServer = loopback_server_factory(tls=server_ssl_context, idle_timeout=0.2)
    async with hx.AsyncClient(http2=True, verify=client_ssl_context) as client:
        poolwatch.instrument(client)
        assert (await client.get(f"{server.url}/ok")).http_version == "HTTP/2"
        # Idle past the server's timeout: it sends GOAWAY and closes (its books count a TLS
        # connection open until the client answers, so they cannot say when).
        await anyio.sleep(0.5)
        await client.get(f"{server.url}/ok")
        snap = poolwatch.snapshot(client)
        assert snap.connections_created_total == 2 == server.stats.accepted_connections
        assert snap.requests_total == 2 == server.stats.requests
        assert snap.origins[0].connection_duration.count == 1
        assert snap.idle_connections == 1 == httpcore_view(client).open


@pytest.mark.anyio
async def test_an_exporter_failing_on_one_closed_connection_leaves_the_others_counted(
    hx: Any, loopback_server: LoopbackServer
) -> None:
    async with hx.AsyncClient() as client:
        poolwatch.instrument(client)
        url = f"{loopback_server.url}/ok"
        held = [await client.send(client.build_request("GET", url), stream=True) for _ in (0, 1, 2)]
        for response in held:
            await response.aread()
            await response.aclose()
        told: list[float] = []

        def broken(origin: Any, lifetime: float) -> None:
            told.append(lifetime)
            raise RuntimeError("an exporter's bug")

        _api._lookup(client).hooks.on_connection_closed = broken  # as an exporter sets it
    # The client's close hands the pool's three connections to one close call.
    assert len(told) == 3
    assert poolwatch.snapshot(client).origins[0].connection_duration.count == 3


def test_a_connection_past_its_keep_alive_expiry_ends_when_the_pool_drops_it(
    hx: Any, loopback_server: LoopbackServer
) -> None:
    with hx.Client(limits=hx.Limits(keepalive_expiry=0.2)) as client:
        poolwatch.instrument(client)
        t0 = time.monotonic()
        client.get(f"{loopback_server.url}/ok")
        time.sleep(0.3)
        assert poolwatch.snapshot(client).origins[0].connection_duration.count == 0
        client.get(f"{loopback_server.url}/ok")  # the pool drops the expired one first
        lifetime = time.monotonic() - t0
        snap = poolwatch.snapshot(client)
        assert snap.connections_created_total == 2 == loopback_server.stats.accepted_connections
        (origin,) = snap.origins
        assert origin.connection_duration.count == 1
        assert 0.3 <= origin.connection_duration.sum <= lifetime
        assert snap.idle_connections == 1 == httpcore_view(client).open


@pytest.mark.parametrize(
    ("path", "read", "keeps_open"),
    [
        ("/ok", True, True),  # keep-alive, read to the end
        ("/goaway", True, False),  # Connection: close
        ("/stream?chunks=20&size=1000", False, False),  # not read to the end
    ],
)
def test_whether_a_release_keeps_the_connection_open_is_told_as_httpcore_decides(
    hx: Any, loopback_server: LoopbackServer, path: str, read: bool, keeps_open: bool
) -> None:
    httpcore = importlib.import_module(hx.__name__.replace("httpx", "httpcore"))
    with httpcore.ConnectionPool() as pool:
        url = hx.URL(f"{loopback_server.url}{path}")
        request = httpcore.Request("GET", str(url), headers=[(b"Host", url.netloc)])
        response = pool.handle_request(request)
        if read:
            for _ in response.stream:  # exhausted, not closed: the release is still to come
                pass
        (conn,) = pool.connections
        inner = conn._connection
        told = _httpcore.release_keeps_open(inner)
        response.close()  # httpcore's own release decides
        assert told is keeps_open
        assert inner.is_closed() is not keeps_open


@pytest.mark.anyio
async def test_a_leaked_stream_is_counted_and_keeps_its_connection_forever(
    hx: Any, loopback_server: LoopbackServer
) -> None:
    timeout = hx.Timeout(5.0, pool=0.1)
    async with hx.AsyncClient(limits=hx.Limits(max_connections=1), timeout=timeout) as client:
        poolwatch.instrument(client)
        response = await client.send(
            client.build_request("GET", f"{loopback_server.url}/ok"), stream=True
        )
        assert poolwatch.snapshot(client).active_requests == 1
        del response
        gc.collect()
        snap = poolwatch.snapshot(client)
        assert snap.leaked_responses_total == 1
        assert snap.active_requests == 0
        # The connection stays held: httpcore's own books agree, and the pool is blocked.
        assert snap.active_connections == 1 == httpcore_view(client).busy
        with pytest.raises(hx.PoolTimeout):
            await client.get(f"{loopback_server.url}/ok")
        assert poolwatch.snapshot(client).pool_timeouts_total == 1


def test_a_leak_the_garbage_collector_finds_while_poolwatch_holds_its_lock_is_counted_after(
    hx: Any, loopback_server: LoopbackServer
) -> None:
    # The cyclic collector runs wherever an allocation triggers it, inside poolwatch's own
    # locked sections too. A leaked response freed there must not wait for the lock its own
    # thread holds (a deadlock of the host): it is counted once the lock is free.
    client = hx.Client()
    poolwatch.instrument(client, name="leak-under-lock")
    box = [client.send(client.build_request("GET", f"{loopback_server.url}/ok"), stream=True)]
    core = _api._lookup(client).core  # type: ignore[union-attr]
    assert core.active == 1

    def collect_while_locked() -> None:
        with core._lock:
            box.clear()
            gc.collect()

    thread = threading.Thread(target=collect_while_locked, daemon=True)
    thread.start()
    thread.join(5)
    if thread.is_alive():  # leave the client unclosed: closing it would hang on the lock
        pytest.fail("the leak's bookkeeping deadlocked on the lock its own thread held")
    snap = poolwatch.snapshot(client)
    assert snap.leaked_responses_total == 1
    assert snap.active_requests == 0
    assert snap.active_connections == 1 == httpcore_view(client).busy
    client.close()


@pytest.mark.anyio
async def test_a_request_cancelled_while_queued_leaves_nothing_behind(
    hx: Any, loopback_server: LoopbackServer
) -> None:
    async with hx.AsyncClient(limits=hx.Limits(max_connections=1)) as client:
        poolwatch.instrument(client)
        async with anyio.create_task_group() as tg:
            tg.start_soon(client.get, f"{loopback_server.url}/delay?s=0.3")
            await await_until(lambda: loopback_server.stats.in_flight_requests == 1)
            with anyio.move_on_after(0.1) as scope:
                await client.get(f"{loopback_server.url}/ok")
            assert scope.cancelled_caught
            snap = poolwatch.snapshot(client)
            assert snap.pending_requests == 0
            assert snap.active_requests == 1
        snap = poolwatch.snapshot(client)
        assert_at_rest(snap)
        assert snap.errors == {"cancelled": 1}
        assert snap.requests_total == 1 == loopback_server.stats.requests
        assert snap.origins[0].time_in_queue.count == 2


@pytest.mark.anyio
async def test_a_request_cancelled_mid_body_releases_its_connection(
    hx: Any, loopback_server: LoopbackServer
) -> None:
    async with hx.AsyncClient() as client:
        poolwatch.instrument(client)
        with anyio.move_on_after(0.15):
            async with client.stream(
                "GET", f"{loopback_server.url}/stream?chunks=50&size=10&delay=0.05"
            ) as r:
                async for _ in r.aiter_raw():
                    pass
        snap = poolwatch.snapshot(client)
        assert_at_rest(snap)
        assert snap.requests_total == 1
        assert httpcore_view(client).requests == 0
        await await_until(lambda: loopback_server.stats.open_connections == snap.idle_connections)


def test_sync_clients_shared_by_eight_threads_count_every_request(
    hx: Any, loopback_server: LoopbackServer
) -> None:
    errors: list[BaseException] = []
    with hx.Client(limits=hx.Limits(max_connections=3)) as client:
        poolwatch.instrument(client)

        def work() -> None:
            try:
                for _ in range(10):
                    client.get(f"{loopback_server.url}/delay?s=0.005").raise_for_status()
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=work) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        snap = poolwatch.snapshot(client)
        assert errors == []
        stats = loopback_server.stats
        assert snap.requests_total == 80 == stats.requests
        assert snap.connections_created_total == stats.accepted_connections <= 3
        assert snap.reused_requests_total == 80 - snap.connections_created_total
        assert_at_rest(snap)
        assert snap.idle_connections == httpcore_view(client).idle == stats.open_connections
        assert snap.origins[0].time_in_queue.count == 80


def test_a_connection_another_thread_takes_the_moment_it_is_released_ends_the_right_request(
    hx: Any, loopback_server: LoopbackServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # poolwatch learns an HTTP/1.1 request's end at its connection's release. httpcore 1.0.9
    # may hand the released connection to another thread's request before the releasing
    # thread runs on: here that request reaches its headers inside the release itself.
    # (httpcore2 hands it over only once the releasing request has left the pool.)
    httpcore = importlib.import_module("httpcore" if hx.__name__ == "httpx" else "httpcore2")
    original = httpcore.HTTP11Connection._response_closed
    url = f"{loopback_server.url}/ok"
    armed = threading.Event()
    headers = threading.Event()
    held: list[Any] = []
    others: list[threading.Thread] = []
    inside: list[bool] = []

    def other_request() -> None:
        held.append(client.send(client.build_request("GET", url), stream=True))
        headers.set()

    def release_then_let_another_thread_in(self: Any) -> None:
        original(self)
        if armed.is_set():
            armed.clear()
            others.append(threading.Thread(target=other_request))
            others[0].start()
            inside.append(headers.wait(timeout=1.0))

    monkeypatch.setattr(
        httpcore.HTTP11Connection, "_response_closed", release_then_let_another_thread_in
    )
    with hx.Client(limits=hx.Limits(max_connections=1)) as client:
        poolwatch.instrument(client)
        client.get(url).raise_for_status()
        armed.set()
        client.get(url).raise_for_status()
        others[0].join(timeout=10)
        assert inside == [hx.__name__ == "httpx"]
        assert len(held) == 1
        snap = poolwatch.snapshot(client)
        assert snap.active_requests == 1  # the other thread's, its response still open
        assert snap.active_connections == 1
        held[0].close()
        snap = poolwatch.snapshot(client)
    assert_at_rest(snap)
    assert snap.requests_total == 3 == loopback_server.stats.requests
    assert snap.connections_created_total == 1 == loopback_server.stats.accepted_connections
    assert snap.request_duration.count == 3


def test_sync_pool_timeouts_are_counted_from_threads(
    hx: Any, loopback_server: LoopbackServer
) -> None:
    caught: list[BaseException] = []
    timeout = hx.Timeout(5.0, pool=0.05)
    with hx.Client(limits=hx.Limits(max_connections=1), timeout=timeout) as client:
        poolwatch.instrument(client)

        def work() -> None:
            try:
                client.get(f"{loopback_server.url}/delay?s=0.3")
            except hx.PoolTimeout as exc:
                caught.append(exc)

        threads = [threading.Thread(target=work) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        snap = poolwatch.snapshot(client)
    assert len(caught) == 3
    assert snap.pool_timeouts_total == 3
    assert_at_rest(snap)


@pytest.fixture
def h2_server(loopback_server_factory: Any, server_ssl_context: ssl.SSLContext) -> LoopbackServer:
    server: LoopbackServer = loopback_server_factory(
        tls=server_ssl_context, h2_max_concurrent_streams=100
    )
    return server


@pytest.mark.anyio
async def test_http2_requests_share_one_connection_and_count_as_reused(
    hx: Any, h2_server: LoopbackServer, client_ssl_context: ssl.SSLContext
) -> None:
    async with hx.AsyncClient(http2=True, verify=client_ssl_context) as client:
        poolwatch.instrument(client)
        async with anyio.create_task_group() as tg:
            for _ in range(20):
                tg.start_soon(client.get, f"{h2_server.url}/delay?s=0.2")
            await await_until(lambda: h2_server.stats.in_flight_requests == 20)
            snap = poolwatch.snapshot(client)
            assert snap.active_connections == 1 == httpcore_view(client).busy
            assert snap.pending_requests == 0
            assert snap.active_requests == 20
        snap = poolwatch.snapshot(client)
        assert snap.connections_created_total == 1 == h2_server.stats.accepted_connections
        assert h2_server.stats.h2_connections == 1
        assert snap.requests_total == 20
        assert snap.reused_requests_total == 19
        assert_at_rest(snap)
        assert [(g.state, g.http_version, g.count) for g in snap.connections] == [("idle", "2", 1)]
        assert snap.tls_time.count == 1


@pytest.mark.anyio
async def test_http2_requests_waiting_for_a_stream_slot_are_pending_though_httpcore_shows_none(
    hx: Any,
    loopback_server_factory: Any,
    server_ssl_context: ssl.SSLContext,
    client_ssl_context: ssl.SSLContext,
) -> None:
    server: LoopbackServer = loopback_server_factory(
        tls=server_ssl_context, h2_max_concurrent_streams=2
    )
    async with hx.AsyncClient(http2=True, verify=client_ssl_context) as client:
        poolwatch.instrument(client)
        await client.get(f"{server.url}/ok")  # settle the connection and its SETTINGS
        async with anyio.create_task_group() as tg:
            for _ in range(6):
                tg.start_soon(client.get, f"{server.url}/delay?s=0.3")
            await await_until(lambda: server.stats.in_flight_requests == 2)
            await anyio.sleep(0.05)
            snap = poolwatch.snapshot(client)
            pool = client._transport._pool
            httpcore_queued = sum(1 for r in pool._requests if r.is_queued())
            assert snap.pending_requests == 4
            assert httpcore_queued == 0  # httpcore's own books hide stream-slot waits
            assert snap.active_requests == 6
        snap = poolwatch.snapshot(client)
        assert_at_rest(snap)
        assert snap.connections_created_total == 1 == server.stats.accepted_connections
        assert server.stats.peak_concurrent_requests == 2
        assert snap.requests_total == 7
        # Two of the six waited one round of 0.3 s for a slot, two waited two rounds.
        assert 1.6 < snap.origins[0].time_in_queue.sum < 2.4


@pytest.mark.anyio
async def test_every_mounted_pool_is_watched_and_summed(
    hx: Any, loopback_server_factory: Any
) -> None:
    a: LoopbackServer = loopback_server_factory()
    b: LoopbackServer = loopback_server_factory()
    mounts = {b.url: hx.AsyncHTTPTransport(limits=hx.Limits(max_connections=3))}
    async with hx.AsyncClient(limits=hx.Limits(max_connections=5), mounts=mounts) as client:
        poolwatch.instrument(client)
        for _ in range(3):
            await client.get(f"{a.url}/ok")
            await client.get(f"{b.url}/ok")
        snap = poolwatch.snapshot(client)
    assert snap.max_connections == 8
    assert snap.requests_total == 6
    assert (
        snap.connections_created_total
        == 2
        == a.stats.accepted_connections + b.stats.accepted_connections
    )
    assert sorted(o.port for o in snap.origins) == sorted(
        int(s.url.rsplit(":", 1)[1]) for s in (a, b)
    )
    assert {o.port: o.requests_new + o.requests_reused for o in snap.origins} == {
        int(a.url.rsplit(":", 1)[1]): 3,
        int(b.url.rsplit(":", 1)[1]): 3,
    }


def test_sync_http2_client_counts_like_the_async_one(
    hx: Any, h2_server: LoopbackServer, client_ssl_context: ssl.SSLContext
) -> None:
    with hx.Client(http2=True, verify=client_ssl_context) as client:
        poolwatch.instrument(client)
        for _ in range(5):
            assert client.get(f"{h2_server.url}/ok").http_version == "HTTP/2"
        snap = poolwatch.snapshot(client)
    assert snap.requests_total == 5
    assert snap.connections_created_total == 1 == h2_server.stats.accepted_connections
    assert_at_rest(snap)


def test_connections_opened_before_instrument_are_counted_as_idle(
    hx: Any, loopback_server: LoopbackServer
) -> None:
    with hx.Client() as client:
        client.get(f"{loopback_server.url}/ok")
        poolwatch.instrument(client)
        snap = poolwatch.snapshot(client)
        assert snap.idle_connections == 1 == loopback_server.stats.open_connections
        client.get(f"{loopback_server.url}/ok")
        snap = poolwatch.snapshot(client)
        assert snap.requests_total == 1
        assert snap.reused_requests_total == 1
        assert snap.connections_created_total == 0
        wait_until(lambda: loopback_server.stats.requests == 2)


@pytest.mark.anyio
async def test_a_proxy_pool_is_watched_like_any_other(
    hx: Any, loopback_server_factory: Any
) -> None:
    # The loopback server answers absolute-form targets itself: a forward proxy's view.
    proxy: LoopbackServer = loopback_server_factory()
    async with hx.AsyncClient(proxy=proxy.url, limits=hx.Limits(max_connections=1)) as client:
        poolwatch.instrument(client)
        (proxy_transport,) = [t for t in client._mounts.values() if t is not None]
        assert type(proxy_transport._pool).__name__ == "AsyncHTTPProxy"
        for _ in range(3):
            r = await client.get("http://upstream.test/ok")
            assert r.json()["path"] == "/ok"
        snap = poolwatch.snapshot(client)
    assert snap.requests_total == 3 == proxy.stats.requests
    assert snap.connections_created_total == 1 == proxy.stats.accepted_connections
    assert snap.max_connections == 1  # the default pool is unreachable behind all://
    assert [(o.address, o.port) for o in snap.origins] == [("upstream.test", 80)]
    assert_at_rest(snap)


def test_https_over_http1_times_the_tls_handshake_of_each_new_connection(
    hx: Any,
    loopback_server_factory: Any,
    server_ssl_context_factory: Any,
    client_ssl_context: ssl.SSLContext,
) -> None:
    server: LoopbackServer = loopback_server_factory(tls=server_ssl_context_factory(("http/1.1",)))
    with hx.Client(verify=client_ssl_context) as client:
        poolwatch.instrument(client)
        for _ in range(3):
            assert client.get(f"{server.url}/ok").http_version == "HTTP/1.1"
        snap = poolwatch.snapshot(client)
    (origin,) = snap.origins
    assert (origin.scheme, origin.address) == ("https", "localhost")
    assert snap.tls_time.count == 1 == server.stats.tls_handshakes
    assert snap.connect_time.count == 1
    assert snap.reused_requests_total == 2
    assert [(g.state, g.http_version) for g in snap.connections] == [("idle", "1.1")]


def test_a_url_with_the_default_port_and_its_connection_are_one_origin() -> None:
    from poolwatch._core import PoolCore

    core = PoolCore("ports")
    assert core.origin((b"http", b"api.test", None)) is core.origin((b"http", b"api.test", 80))
    assert core.origin((b"https", b"api.test", None)) is core.origin((b"https", b"api.test", 443))
    assert core.origin((b"https", b"api.test", 8443)) is not core.origin(
        (b"https", b"api.test", 443)
    )


def test_on_http1_only_the_request_that_opens_a_connection_carries_a_trace_callback(
    hx: Any, loopback_server: LoopbackServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The overhead budget depends on it: the other requests run without any trace callback.
    from poolwatch import _shells

    traced: list[object] = []
    original = _shells._sync_trace

    def counting(core: Any, rec: Any, user_trace: Any) -> Any:
        traced.append(rec)
        return original(core, rec, user_trace)

    monkeypatch.setattr(_shells, "_sync_trace", counting)
    with hx.Client() as client:
        poolwatch.instrument(client)
        for _ in range(10):
            client.get(f"{loopback_server.url}/ok")
        assert poolwatch.snapshot(client).requests_total == 10
    assert len(traced) == 1


def test_an_error_in_the_middle_of_the_body_is_counted_by_its_type(
    hx: Any, loopback_server: LoopbackServer
) -> None:
    with hx.Client() as client:
        poolwatch.instrument(client)
        with pytest.raises(hx.ReadError):
            client.get(f"{loopback_server.url}/reset")
        with pytest.raises(hx.RemoteProtocolError):
            client.get(f"{loopback_server.url}/short")
        snap = poolwatch.snapshot(client)
    assert snap.errors == {"ReadError": 1, "RemoteProtocolError": 1}
    assert snap.requests_total == 2 == loopback_server.stats.requests
    assert_at_rest(snap)


def test_a_streamed_response_is_counted_by_a_reading_while_open_and_not_again_at_its_close(
    hx: Any, loopback_server: LoopbackServer
) -> None:
    # The request path only notes times; readings count. A response still streaming (an LLM
    # answer) must be in the figures as soon as its headers came, and once only.
    with hx.Client() as client:
        poolwatch.instrument(client)
        with client.stream("GET", f"{loopback_server.url}/ok") as response:
            assert response.status_code == 200
            open_ = poolwatch.snapshot(client)
            assert open_.active_requests == 1
            assert open_.pending_requests == 0
            assert open_.requests_total == 1 == loopback_server.stats.requests
            assert open_.origins[0].time_in_queue.count == 1
            assert open_.time_to_first_byte.count == 1
            assert open_.request_duration.count == 0  # not over yet
            response.read()
        closed = poolwatch.snapshot(client)
    assert closed.requests_total == 1
    assert closed.origins[0].time_in_queue.count == 1
    assert closed.time_to_first_byte.count == 1
    assert closed.request_duration.count == 1
    assert_at_rest(closed)


def test_a_client_at_rest_is_read_once_and_read_again_after_a_request_or_a_close(
    hx: Any, loopback_server: LoopbackServer
) -> None:
    with hx.Client() as client:
        poolwatch.instrument(client, name="at-rest")
        client.get(f"{loopback_server.url}/ok")
        first = poolwatch.snapshot(client)
        assert poolwatch.snapshot(client) is first  # nothing moved: the same reading
        with pytest.raises(TypeError):  # shared by every reader: read-only all the way down
            first.errors["mine"] = 1  # type: ignore[index]
        with pytest.raises(TypeError):
            first.origins[0].errors["mine"] = 1  # type: ignore[index]
        assert first.idle_connections == 1 == loopback_server.stats.open_connections
        client.get(f"{loopback_server.url}/ok")
        second = poolwatch.snapshot(client)
        assert second is not first
        assert (first.requests_total, second.requests_total) == (1, 2)
        assert poolwatch.snapshot(client) is second
        client.get(f"{loopback_server.url}/ok")
        assert poolwatch.snapshot(client).idle_connections == 1  # read at rest, and kept
        (conn,) = client._transport._pool.connections
        conn._connection.close()  # behind poolwatch's back: its close hook is on `conn`
        third = poolwatch.snapshot(client)
        assert third.idle_connections == 0 == httpcore_view(client).open
        assert third.requests_total == 3
        wait_until(lambda: loopback_server.stats.open_connections == 0, what="the server's close")
        client.get(f"{loopback_server.url}/ok")  # a new connection
        assert poolwatch.snapshot(client).idle_connections == 1
        client._transport._pool.close()  # httpcore closes every connection, as on client.close()
        assert poolwatch.snapshot(client).idle_connections == 0 == httpcore_view(client).open


@pytest.mark.anyio
async def test_a_client_at_rest_is_read_again_once_the_server_closes_an_idle_connection(
    hx: Any, loopback_server_factory: Any
) -> None:
    server: LoopbackServer = loopback_server_factory(idle_timeout=1.0)
    async with hx.AsyncClient() as client:
        poolwatch.instrument(client, name="server-closes")
        await client.get(f"{server.url}/ok")
        before = poolwatch.snapshot(client)
        assert before.idle_connections == 1 == server.stats.open_connections
        assert poolwatch.snapshot(client) is before
        await await_until(lambda: server.stats.open_connections == 0, what="the server's close")
        after = poolwatch.snapshot(client)
        assert after.idle_connections == 0
        assert httpcore_view(client).idle == 1  # httpcore has not noticed yet
        assert poolwatch.snapshot(client) is after


@pytest.mark.anyio
async def test_a_reading_after_a_change_sees_the_server_close_idle_connections_it_polled_before(
    hx: Any, loopback_server_factory: Any
) -> None:
    # A full reading polls the same sockets as the last one did with the last one's poll
    # object: it must still see what the server did to them since.
    server: LoopbackServer = loopback_server_factory(idle_timeout=1.0)
    async with hx.AsyncClient() as client:
        poolwatch.instrument(client, name="polled-again")
        await two_idle_connections(client, server.url)
        assert poolwatch.snapshot(client).idle_connections == 2 == server.stats.open_connections
        [watch] = [w for w in _api.watches() if w.name == "polled-again"]
        polled = watch._sockets
        assert polled is not None
        with socket.socket() as unused:  # a port nobody listens on: refused, never pooled
            unused.bind(("127.0.0.1", 0))
            refused = f"http://127.0.0.1:{unused.getsockname()[1]}/"
        with pytest.raises(hx.ConnectError):
            await client.get(refused)  # a change: the next reading is a full one
        await await_until(lambda: server.stats.open_connections == 0, what="the server's close")
        after = poolwatch.snapshot(client)
        assert watch._sockets is not None
        assert watch._sockets._poller is polled._poller  # the same sockets, polled again
        assert after.idle_connections == 0
        assert httpcore_view(client).idle == 2  # httpcore has not noticed yet
        assert after.errors == {"ConnectError": 1}


def test_the_same_sockets_listed_in_another_order_are_not_taken_for_closed_ones(
    hx: Any, loopback_server: LoopbackServer
) -> None:
    # The last reading's poll object serves the same sockets in any order; what each socket's
    # fileno returned must follow the new order, or a pool at rest is read in full forever.
    with hx.Client() as client:
        threads = [
            threading.Thread(target=client.get, args=(f"{loopback_server.url}/delay?ms=50",))
            for _ in range(2)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        a, b = client._transport._pool.connections
        first = _httpcore.OpenSockets([a, b])
        again = _httpcore.OpenSockets([b, a], first)
        assert again._poller is first._poller
        assert not first.closed()
        assert not again.closed()
        assert again.dead() == set() == first.dead()


def test_the_sockets_looked_up_for_polling_are_forgotten_with_their_connections(
    hx: Any, loopback_server: LoopbackServer
) -> None:
    with hx.Client() as client:
        poolwatch.instrument(client, name="forgotten-sockets")
        client.get(f"{loopback_server.url}/ok")
        assert poolwatch.snapshot(client).idle_connections == 1
        (conn,) = client._transport._pool.connections
        key = id(conn._connection)
        assert key in _httpcore._FILENOS
        client._transport._pool.close()  # as on client.close()
        assert poolwatch.snapshot(client).idle_connections == 0  # the last reading holds none
        del conn
        gc.collect()
        assert key not in _httpcore._FILENOS  # gone with the connection
        client.get(f"{loopback_server.url}/ok")
        assert poolwatch.snapshot(client).idle_connections == 1
        (conn,) = client._transport._pool.connections
        key = id(conn._connection)
        assert key in _httpcore._FILENOS
        poolwatch.uninstrument(client)
        assert key not in _httpcore._FILENOS  # the connection lives on, uninstrumented


@pytest.mark.anyio
async def test_an_idle_tls_connection_the_server_closed_is_no_longer_counted_as_idle(
    hx: Any,
    loopback_server_factory: Any,
    server_ssl_context_factory: Any,
    client_ssl_context: ssl.SSLContext,
) -> None:
    # Under TLS the socket poolwatch polls sits two wrappers deep (httpcore's stream, anyio's
    # TLS stream): the server's close_notify and FIN must still show on it. The ground truth
    # is the kernel's: the socket httpcore reports turns readable. (The loopback server counts
    # a TLS connection it closed as open until the client answers its close_notify, which an
    # idle client never does, so its books cannot say when.)
    server: LoopbackServer = loopback_server_factory(
        tls=server_ssl_context_factory(("http/1.1",)), idle_timeout=1.0
    )
    async with hx.AsyncClient(verify=client_ssl_context) as client:
        poolwatch.instrument(client, name="tls-server-closes")
        await client.get(f"{server.url}/ok")
        before = poolwatch.snapshot(client)
        assert before.idle_connections == 1 == httpcore_view(client).idle
        (conn,) = client._transport._pool.connections
        stream = conn._connection._network_stream
        sock = stream.get_extra_info("socket")
        assert _httpcore._socket_of(stream) is sock  # the socket poolwatch polls

        def readable() -> bool:  # the socket's own word: the server sent close_notify
            return bool(select.select([sock], [], [], 0)[0])

        assert not readable()
        assert poolwatch.snapshot(client) is before
        await await_until(readable, what="the server's close")
        after = poolwatch.snapshot(client)
        assert after.idle_connections == 0
        assert httpcore_view(client).idle == 1  # httpcore has not noticed yet


def test_a_pool_read_between_its_requests_counts_each_one_on_the_connections_it_had(
    hx: Any, loopback_server: LoopbackServer
) -> None:
    # Requests came and went on the same connections since the last reading: the core is
    # read again, the connections' reading is kept (no connection joined, left or leaked).
    with hx.Client() as client:
        poolwatch.instrument(client, name="between-requests")
        [watch] = [w for w in _api.watches() if w.name == "between-requests"]
        two_idle_connections_sync(client, loopback_server.url)
        first = poolwatch.snapshot(client)
        reading = watch._reading
        assert reading is not None
        assert reading.table is not None  # every connection settled
        for n in range(3, 6):
            client.get(f"{loopback_server.url}/ok")
            snap = poolwatch.snapshot(client)
            assert watch._reading is reading  # the connections were not walked again
            assert snap is not first
            assert snap.requests_total == n == loopback_server.stats.requests
            assert snap.reused_requests_total == n - 2
            assert snap.idle_connections == 2 == loopback_server.stats.open_connections
            assert snap.idle_connections == httpcore_view(client).idle
            assert_at_rest(snap)
        client.get(f"{loopback_server.url}/close")  # then the server closes that connection
        wait_until(lambda: loopback_server.stats.open_connections == 1, what="the server's close")
        snap = poolwatch.snapshot(client)
        assert snap.requests_total == 6
        assert snap.idle_connections == 1


def test_a_reading_a_request_raced_into_is_not_kept_once_that_request_is_over(
    hx: Any, loopback_server: LoopbackServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A full reading begins at rest; another thread's request takes a connection before the
    # reading looks at the connections' load, so it rightly counts that connection active.
    # Once the request is over, that reading is not to be kept as the connections' state.
    with hx.Client() as client:
        poolwatch.instrument(client, name="raced")
        [watch] = [w for w in _api.watches() if w.name == "raced"]
        core = watch.core
        two_idle_connections_sync(client, loopback_server.url)
        real_load = core.connection_load
        racer = threading.Thread(target=client.get, args=(f"{loopback_server.url}/delay?ms=300",))

        def load_with_a_request_started_first() -> Any:
            # Where a thread switch may land: the other thread's request gets a connection.
            monkeypatch.setattr(core, "connection_load", real_load)
            racer.start()
            wait_until(
                lambda: any(r.conn is not None for r in list(core._inflight.values())),
                what="the other thread's request on a connection",
            )
            return real_load()

        monkeypatch.setattr(core, "connection_load", load_with_a_request_started_first)
        raced = poolwatch.snapshot(client)
        assert raced.active_connections == 1
        racer.join()
        for n in range(4, 6):
            snap = poolwatch.snapshot(client)
            assert snap.active_connections == 0 == httpcore_view(client).busy
            assert snap.idle_connections == 2 == httpcore_view(client).idle
            assert snap.requests_total == n - 1 == loopback_server.stats.requests
            client.get(f"{loopback_server.url}/ok")


@pytest.mark.anyio
async def test_a_pool_read_between_its_requests_sees_the_server_close_an_idle_connection(
    hx: Any, loopback_server_factory: Any
) -> None:
    server: LoopbackServer = loopback_server_factory(idle_timeout=1.0)
    async with hx.AsyncClient() as client:
        poolwatch.instrument(client, name="closed-between-requests")
        await two_idle_connections(client, server.url)
        assert poolwatch.snapshot(client).idle_connections == 2 == server.stats.open_connections
        await anyio.sleep(0.5)
        await client.get(f"{server.url}/ok")  # on one of them: the other one's timer runs on
        await await_until(lambda: server.stats.open_connections == 1, what="the server's close")
        snap = poolwatch.snapshot(client)
        assert snap.requests_total == 3
        assert snap.idle_connections == 1 == server.stats.open_connections
        assert httpcore_view(client).idle == 2  # httpcore has not noticed yet


@pytest.mark.anyio
async def test_a_pool_read_between_its_requests_sees_a_leaked_response_hold_its_connection(
    hx: Any, loopback_server: LoopbackServer
) -> None:
    async with hx.AsyncClient() as client:
        poolwatch.instrument(client, name="leaked-between-requests")
        await client.get(f"{loopback_server.url}/ok")
        assert poolwatch.snapshot(client).idle_connections == 1
        response = await client.send(
            client.build_request("GET", f"{loopback_server.url}/ok"), stream=True
        )
        del response
        gc.collect()
        snap = poolwatch.snapshot(client)
        assert snap.leaked_responses_total == 1
        assert snap.active_requests == 0
        assert snap.active_connections == 1 == httpcore_view(client).busy
        assert snap.idle_connections == 0


@pytest.mark.anyio
async def test_a_client_with_a_request_in_flight_is_read_afresh_every_time(
    hx: Any, loopback_server: LoopbackServer
) -> None:
    async with hx.AsyncClient() as client:
        poolwatch.instrument(client, name="in-flight")
        async with client.stream("GET", f"{loopback_server.url}/stream?chunks=2&size=10"):
            first = poolwatch.snapshot(client)
            await anyio.sleep(0.05)
            second = poolwatch.snapshot(client)
            assert second is not first
            assert second.active_max_age >= first.active_max_age + 0.05
            assert second.active_requests == 1 == second.active_connections
        assert_at_rest(poolwatch.snapshot(client))


def test_an_http2_connection_closed_behind_poolwatchs_back_leaves_the_reading_at_rest(
    hx: Any, h2_server: LoopbackServer, client_ssl_context: ssl.SSLContext
) -> None:
    # HTTP/2 sockets are never polled (a live idle one has bytes waiting too), and closing the
    # inner connection bypasses poolwatch's close hook: only the connection's own is_closed()
    # can tell the reading at rest is stale.
    with hx.Client(http2=True, verify=client_ssl_context) as client:
        poolwatch.instrument(client, name="h2-behind-the-back")
        assert client.get(f"{h2_server.url}/ok").http_version == "HTTP/2"
        at_rest = poolwatch.snapshot(client)
        assert at_rest.idle_connections == 1 == httpcore_view(client).open
        (conn,) = client._transport._pool.connections
        conn._connection.close()
        after = poolwatch.snapshot(client)
        assert after.idle_connections == 0 == httpcore_view(client).open


def test_an_idle_socket_closed_behind_poolwatchs_back_is_seen_even_when_its_number_is_reused(
    hx: Any, loopback_server: LoopbackServer
) -> None:
    # A poll asks about file descriptor numbers: once a socket is closed, its number goes to
    # the next socket opened, which a poll would then report on instead.
    with hx.Client() as client:
        poolwatch.instrument(client, name="fd-reused")
        client.get(f"{loopback_server.url}/ok")
        assert poolwatch.snapshot(client).idle_connections == 1  # read at rest, and kept
        (conn,) = client._transport._pool.connections
        fd = conn._connection._network_stream.get_extra_info("socket").fileno()
        conn._connection.close()  # behind poolwatch's back: its close hook is on `conn`
        taken = []
        while len(taken) < 64 and not any(a.fileno() == fd for a, _b in taken):
            taken.append(socket.socketpair())  # connected, idle: nothing to read
        try:
            assert any(a.fileno() == fd for a, _b in taken), "the closed socket's number"
            assert poolwatch.snapshot(client).idle_connections == 0 == httpcore_view(client).open
        finally:
            for a, b in taken:
                a.close()
                b.close()


def read_in_full(client: Any, watch: Any) -> poolwatch.PoolSnapshot:
    """What a reading that walks every connection makes of the pool now (and keeps)."""
    watch._reading = None
    return poolwatch.snapshot(client)


def test_a_busy_pool_read_again_shows_each_connection_as_the_server_and_httpcore_do(
    hx: Any, loopback_server: LoopbackServer
) -> None:
    # Its connections stay, requests take turns on them: each reading reads their states
    # again without walking them, and says what a full walk, httpcore and the server say.
    url = f"{loopback_server.url}/ok"
    with hx.Client(limits=hx.Limits(max_connections=4)) as client:
        poolwatch.instrument(client, name="busy-read-again")
        [watch] = [w for w in _api.watches() if w.name == "busy-read-again"]
        idle_connections_sync(client, loopback_server.url, 4)
        read_in_full(client, watch)
        held: list[Any] = []
        for busy in (1, 3, 0, 4, 2, 1, 0):
            while len(held) > busy:
                done = held.pop()
                done.read()  # unread, its connection would be closed, not given back
                done.close()
            while len(held) < busy:
                held.append(client.send(client.build_request("GET", url), stream=True))
            reading = watch._reading
            snap = poolwatch.snapshot(client)
            assert watch._reading is reading is not None  # not walked again
            assert snap.active_connections == busy == httpcore_view(client).busy
            assert snap.idle_connections == 4 - busy == httpcore_view(client).idle
            assert loopback_server.stats.open_connections == 4
            assert snap.requests_total == loopback_server.stats.requests
            full = read_in_full(client, watch)
            assert (full.active_connections, full.idle_connections, full.connections) == (
                snap.active_connections,
                snap.idle_connections,
                snap.connections,
            )
        assert loopback_server.stats.accepted_connections == 4


def test_a_busy_pool_read_again_sees_the_server_close_its_idle_connection(
    hx: Any, loopback_server_factory: Any
) -> None:
    server: LoopbackServer = loopback_server_factory(idle_timeout=1.0)
    with hx.Client() as client:
        poolwatch.instrument(client, name="busy-server-closes")
        [watch] = [w for w in _api.watches() if w.name == "busy-server-closes"]
        two_idle_connections_sync(client, server.url)
        poolwatch.snapshot(client)
        reading = watch._reading
        # One connection busy for 2 s (the server sends all along), the other idle: the
        # server closes that one after its idle second.
        held = client.send(
            client.build_request("GET", f"{server.url}/stream?chunks=2&delay=2"), stream=True
        )
        snap = poolwatch.snapshot(client)
        assert (snap.active_connections, snap.idle_connections) == (1, 1)
        wait_until(lambda: server.stats.open_connections == 1, what="the server's close")
        snap = poolwatch.snapshot(client)
        assert watch._reading is reading  # its states read again, not walked
        assert (snap.active_connections, snap.idle_connections) == (1, 0)
        assert httpcore_view(client).idle == 1  # httpcore has not noticed yet
        assert read_in_full(client, watch).connections == snap.connections
        held.read()
        held.close()
