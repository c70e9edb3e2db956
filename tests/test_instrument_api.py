"""instrument(), snapshot() and uninstrument() as a user meets them: names, bad input,
idempotence, restoring the client, and the user's own hooks and trace callbacks."""

from __future__ import annotations

import gc
import logging
from typing import Any

import pytest

import poolwatch
from poolwatch import _api
from poolwatch._loopback import LoopbackServer


def test_instrument_returns_the_same_client_and_a_second_call_changes_nothing(
    hx: Any, loopback_server: LoopbackServer
) -> None:
    with hx.Client() as client:
        assert poolwatch.instrument(client, name="once") is client
        pool = client._transport._pool
        entry = pool.__dict__["handle_request"]
        assert poolwatch.instrument(client, name="twice") is client
        assert pool.__dict__["handle_request"] is entry
        client.get(f"{loopback_server.url}/ok")
        snap = poolwatch.snapshot(client)
        assert snap.name == "once"
        assert snap.requests_total == 1


def test_the_default_name_is_the_base_url_host_and_names_stay_unique(hx: Any) -> None:
    with (
        hx.Client(base_url="https://api.example.test/v1") as a,
        hx.Client(base_url="https://api.example.test/v2") as b,
        hx.Client() as c,
    ):
        poolwatch.instrument(a)
        poolwatch.instrument(b)
        poolwatch.instrument(c)
        assert poolwatch.snapshot(a).name == "api.example.test"
        assert poolwatch.snapshot(b).name == "api.example.test-2"
        assert poolwatch.snapshot(c).name == "default"


def test_a_fresh_snapshot_of_an_idle_client_is_all_zeros(hx: Any) -> None:
    with hx.Client(limits=hx.Limits(max_connections=7)) as client:
        snap = poolwatch.snapshot(poolwatch.instrument(client, name="zeros"))
    phases = {
        name: getattr(snap, name)
        for name in ("connect_time", "tls_time", "time_to_first_byte", "request_duration")
    }
    for histogram in phases.values():
        assert (histogram.count, histogram.sum, sum(histogram.counts)) == (0, 0.0, 0)
    assert snap == poolwatch.PoolSnapshot(
        name="zeros",
        max_connections=7,
        active_connections=0,
        idle_connections=0,
        pending_requests=0,
        active_requests=0,
        utilization=0.0,
        requests_total=0,
        reused_requests_total=0,
        connections_created_total=0,
        pool_timeouts_total=0,
        leaked_responses_total=0,
        reuse_ratio=None,
        errors={},
        **phases,
    )


def test_an_unlimited_pool_has_no_limit_and_zero_utilization(
    hx: Any, loopback_server: LoopbackServer
) -> None:
    with hx.Client(limits=hx.Limits(max_connections=None)) as client:
        poolwatch.instrument(client)
        client.get(f"{loopback_server.url}/ok")
        snap = poolwatch.snapshot(client)
    assert snap.max_connections is None
    assert snap.utilization == 0.0


@pytest.mark.parametrize("thing", [42, "httpx", object(), None])
def test_instrumenting_something_that_is_not_a_client_is_a_type_error(thing: object) -> None:
    with pytest.raises(TypeError, match="expects an httpx or httpx2 Client / AsyncClient"):
        poolwatch.instrument(thing)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"name": ""}, "name must be a non-empty string"),
        ({"max_origins": 0}, "max_origins must be a positive int"),
        ({"saturation_threshold": 1.5}, "saturation_threshold must be in"),
        ({"warning_interval": 0}, "warning_interval must be positive"),
        ({"saturation_hysteresis": 0.9}, "hysteresis must be in"),
    ],
)
def test_a_bad_option_is_a_value_error_at_the_call(
    hx: Any, options: dict[str, Any], message: str
) -> None:
    with hx.Client() as client, pytest.raises(ValueError, match=message):
        poolwatch.instrument(client, **options)


def test_a_closed_client_cannot_be_instrumented(hx: Any) -> None:
    client = hx.Client()
    client.close()
    with pytest.raises(ValueError, match="closed client"):
        poolwatch.instrument(client)


def test_snapshot_of_a_client_never_instrumented_says_what_to_do(hx: Any) -> None:
    with hx.Client() as client, pytest.raises(ValueError, match=r"call poolwatch\.instrument"):
        poolwatch.snapshot(client)


def test_uninstrument_restores_the_client_as_it_was(
    hx: Any, loopback_server: LoopbackServer
) -> None:
    with hx.Client() as bare:
        bare.get(f"{loopback_server.url}/ok")
        (bare_conn,) = bare._transport._pool.connections
        httpcore_own = dict(bare_conn._connection.__dict__).keys()
    with hx.Client() as client:
        pool = client._transport._pool
        before = dict(pool.__dict__)
        poolwatch.instrument(client)
        client.get(f"{loopback_server.url}/ok")
        (conn,) = pool.connections
        poolwatch.snapshot(client)  # which polls the idle socket
        assert "handle_request" in conn.__dict__
        assert conn._connection.__dict__.keys() > httpcore_own  # the release hook
        poolwatch.uninstrument(client)
        assert pool.__dict__.keys() == before.keys()
        assert "handle_request" not in conn.__dict__
        assert conn._connection.__dict__.keys() == httpcore_own
        assert client.get(f"{loopback_server.url}/ok").status_code == 200
        with pytest.raises(ValueError, match="not instrumented"):
            poolwatch.snapshot(client)
        poolwatch.uninstrument(client)  # twice is fine


def test_another_librarys_close_patch_on_a_connection_outlives_instrument_and_uninstrument(
    hx: Any, loopback_server: LoopbackServer
) -> None:
    closed: list[object] = []
    with hx.Client() as client:
        client.get(f"{loopback_server.url}/ok")
        (conn,) = client._transport._pool.connections
        own_close = conn.close

        def their_close() -> None:
            closed.append(conn)
            own_close()

        conn.close = their_close  # e.g. a test double, or another instrumentation
        poolwatch.instrument(client)
        client.get(f"{loopback_server.url}/ok")
        poolwatch.uninstrument(client)
        assert conn.close is their_close
    assert closed == [conn]  # the client's close went through it


def test_uninstrument_leaves_nothing_on_a_pool_whose_class_another_library_wrapped(
    hx: Any, loopback_server: LoopbackServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    import wrapt  # what opentelemetry-instrumentation wraps classes with

    url = f"{loopback_server.url}/ok"
    calls: list[object] = []

    def wrapper(wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
        calls.append(instance)
        return wrapped(*args, **kwargs)

    with hx.Client() as client:
        pool = client._transport._pool
        cls = type(pool)
        monkeypatch.setattr(cls, "handle_request", cls.handle_request)  # restored afterwards
        wrapt.wrap_function_wrapper(cls, "handle_request", wrapper)
        poolwatch.instrument(client)
        client.get(url).raise_for_status()
        poolwatch.uninstrument(client)
        assert "handle_request" not in pool.__dict__  # the class's wrapper, not pinned on it
        client.get(url).raise_for_status()
    assert calls == [pool, pool]  # under poolwatch and after it


def test_a_response_open_at_uninstrument_still_ends_its_request_when_closed(
    hx: Any, loopback_server: LoopbackServer
) -> None:
    with hx.Client() as client:
        poolwatch.instrument(client)
        core = _api._lookup(client).core  # type: ignore[union-attr]
        with client.stream("GET", f"{loopback_server.url}/ok") as response:
            poolwatch.uninstrument(client)
            response.read()
        (conn,) = client._transport._pool.connections
        assert core.active == 0  # ended at its close, not left for the leak detector
        assert core.leaked_count == 0
        assert core.snapshot().request_duration.count == 1
        assert "_response_closed" not in conn._connection.__dict__  # the hook went with it
        assert client.get(f"{loopback_server.url}/ok").status_code == 200
    gc.collect()
    assert core.leaked_count == 0


def test_uninstrument_restores_a_forward_proxy_s_connections(
    hx: Any, loopback_server: LoopbackServer
) -> None:
    # http:// through a proxy: the pool's connection holds an HTTPConnection, which holds
    # the HTTP/1.1 connection whose release poolwatch hooks.
    with hx.Client(proxy=loopback_server.url) as client:
        poolwatch.instrument(client)
        assert client.get("http://example.invalid/ok").status_code == 200
        (transport,) = [t for t in client._mounts.values() if t is not None]
        (conn,) = transport._pool.connections
        http11 = conn._connection._connection
        assert "_response_closed" in http11.__dict__
        poolwatch.uninstrument(client)
        assert "_response_closed" not in http11.__dict__
        poolwatch.instrument(client)  # and again: the release is hooked anew
        assert client.get("http://example.invalid/ok").status_code == 200
        assert poolwatch.snapshot(client).requests_total == 1
        assert "_response_closed" in http11.__dict__


def test_a_custom_transport_without_a_pool_still_gets_request_level_figures(hx: Any) -> None:
    def handler(request: Any) -> Any:
        if request.url.path == "/boom":
            raise hx.ConnectError("refused", request=request)
        return hx.Response(200, json={"ok": True})

    with hx.Client(transport=hx.MockTransport(handler)) as client:
        poolwatch.instrument(client)
        assert client.get("http://mock.test/ok").json() == {"ok": True}
        with pytest.raises(hx.ConnectError):
            client.get("http://mock.test/boom")
        snap = poolwatch.snapshot(client)
    assert snap.max_connections is None
    assert snap.active_requests == 0
    assert snap.errors == {"ConnectError": 1}
    (origin,) = snap.origins
    assert (origin.address, origin.port, origin.scheme) == ("mock.test", 80, "http")
    assert snap.request_duration.count == 2


def test_a_response_dropped_unclosed_from_a_transport_without_a_pool_counts_as_leaked(
    hx: Any,
) -> None:
    def handler(request: Any) -> Any:
        return hx.Response(200, content=iter([b"never ", b"read"]))

    with hx.Client(transport=hx.MockTransport(handler)) as client:
        poolwatch.instrument(client)
        response = client.send(client.build_request("GET", "http://mock.test/"), stream=True)
        assert poolwatch.snapshot(client).active_requests == 1
        del response
        gc.collect()
        snap = poolwatch.snapshot(client)
    assert (snap.leaked_responses_total, snap.active_requests) == (1, 0)


@pytest.mark.anyio
async def test_an_async_response_dropped_unclosed_from_a_transport_without_a_pool_is_leaked(
    hx: Any,
) -> None:
    async def body() -> Any:
        yield b"never read"

    def handler(request: Any) -> Any:
        return hx.Response(200, content=body())

    async with hx.AsyncClient(transport=hx.MockTransport(handler)) as client:
        poolwatch.instrument(client)
        request = client.build_request("GET", "http://mock.test/")
        response = await client.send(request, stream=True)
        assert poolwatch.snapshot(client).active_requests == 1
        del response
        gc.collect()
        snap = poolwatch.snapshot(client)
    assert (snap.leaked_responses_total, snap.active_requests) == (1, 0)


@pytest.mark.anyio
async def test_the_users_own_trace_callback_and_event_hooks_keep_working(
    hx: Any, loopback_server: LoopbackServer
) -> None:
    seen: list[str] = []
    hooked: list[str] = []

    async def user_trace(name: str, info: dict[str, Any]) -> None:
        seen.append(name)

    async def on_request(request: Any) -> None:
        hooked.append("request")

    async def on_response(response: Any) -> None:
        hooked.append("response")

    hooks = {"request": [on_request], "response": [on_response]}
    async with hx.AsyncClient(event_hooks=hooks) as client:
        poolwatch.instrument(client)
        for _ in range(2):
            r = await client.get(f"{loopback_server.url}/ok", extensions={"trace": user_trace})
            assert r.request.extensions["trace"] is user_trace
    assert hooked == ["request", "response"] * 2
    # Both requests' events reached the user: the first opened the connection.
    assert seen.count("connection.connect_tcp.complete") == 1
    assert seen.count("http11.receive_response_headers.complete") == 2
    assert seen.count("http11.response_closed.complete") == 2


def test_a_redirect_neither_chains_poolwatch_twice_nor_leaks_it_into_the_users_extensions(
    hx: Any, loopback_server: LoopbackServer
) -> None:
    async def redirect(request: Any, response: Any) -> None:
        await response.respond(302, headers=[("location", "/ok")])

    loopback_server.routes["/redirect"] = redirect
    seen: list[str] = []

    def user_trace(name: str, info: dict[str, Any]) -> None:
        seen.append(name)

    extensions = {"trace": user_trace}
    with hx.Client(follow_redirects=True) as client:
        poolwatch.instrument(client)
        r = client.get(f"{loopback_server.url}/redirect", extensions=extensions)
        assert r.status_code == 200
        assert [h.status_code for h in r.history] == [302]
        assert r.request.extensions["trace"] is user_trace
        assert extensions == {"trace": user_trace}
        snap = poolwatch.snapshot(client)
    assert seen.count("http11.send_request_headers.started") == 2
    assert snap.requests_total == 2 == loopback_server.stats.requests


def test_a_sync_trace_callback_on_an_async_client_fails_as_httpx_says(
    hx: Any, loopback_server: LoopbackServer
) -> None:
    import anyio

    def wrong(name: str, info: dict[str, Any]) -> None: ...

    async def main() -> None:
        async with hx.AsyncClient() as client:
            poolwatch.instrument(client)
            with pytest.raises(TypeError, match="asynchronous function"):
                await client.get(f"{loopback_server.url}/ok", extensions={"trace": wrong})

    anyio.run(main)


def test_a_failure_inside_poolwatch_never_reaches_the_request_and_is_logged_once(
    hx: Any,
    loopback_server: LoopbackServer,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    from poolwatch._core import PoolCore

    def broken(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("bug in poolwatch")

    monkeypatch.setattr(PoolCore, "acquire", broken)
    caplog.set_level(logging.ERROR, logger="poolwatch")
    with hx.Client() as client:
        poolwatch.instrument(client)
        for _ in range(3):
            assert client.get(f"{loopback_server.url}/ok").status_code == 200
    records = [r for r in caplog.records if r.name == "poolwatch"]
    assert len(records) == 1
    assert "connection acquire" in records[0].getMessage()
    assert "bug in poolwatch" in records[0].getMessage()


def test_the_hosts_own_exception_passes_through_unchanged(hx: Any) -> None:
    with hx.Client() as client:
        poolwatch.instrument(client)
        with pytest.raises(hx.ConnectError) as caught:
            client.get("http://127.0.0.1:1/")  # nothing listens on port 1
        snap = poolwatch.snapshot(client)
    assert type(caught.value) is hx.ConnectError
    assert snap.errors == {"ConnectError": 1}
    assert snap.connections_created_total == 0
    assert snap.requests_total == 0
    assert snap.active_requests == 0 == snap.pending_requests
