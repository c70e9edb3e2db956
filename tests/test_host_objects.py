"""poolwatch leaves httpcore's objects laid out as CPython made them.

On CPython 3.11 and 3.12 an object's attributes live in inline values until someone reads its
``__dict__``; from then on they live in a dictionary for good, and the interpreter stops
specialising the host's own attribute reads on that object (``self._state``, ``pool._requests``,
dozens per request). Reading ``pool.__dict__`` once at ``instrument()``, and each response
stream's per request, cost more CPU than all of poolwatch's bookkeeping (``bench/adaptive.py``
shows the sites). Patches are set, read and removed with ``setattr`` / ``getattr`` /
``delattr`` only; these tests hold every object a request passes through to that, across
requests, a leaked response, a scrape and ``uninstrument()``.
"""

from __future__ import annotations

import gc
import ssl
import sys
from collections.abc import Iterator
from typing import Any

import pytest

import poolwatch
from poolwatch._loopback import LoopbackServer

pytestmark = pytest.mark.skipif(
    sys.implementation.name != "cpython" or not (3, 11) <= sys.version_info < (3, 13),
    reason="inline attribute values that a __dict__ read turns into a dictionary: CPython "
    "3.11 and 3.12 (3.13 keeps them inline)",
)

#: An attribute every instance of these httpcore classes has from its __init__ on.
_KNOWN_ATTRIBUTE = {
    "AsyncConnectionPool": "_requests",
    "ConnectionPool": "_requests",
    "AsyncHTTPConnection": "_origin",
    "HTTPConnection": "_origin",
    "AsyncHTTP11Connection": "_h11_state",
    "HTTP11Connection": "_h11_state",
    "AsyncHTTP2Connection": "_h2_state",
    "HTTP2Connection": "_h2_state",
    "HTTP11ConnectionByteStream": "_request",
    "HTTP2ConnectionByteStream": "_request",
    "PoolByteStream": "_stream",
}


def attributes_in_a_dictionary(obj: Any) -> bool:
    """Whether ``obj``'s attributes were moved into a dictionary, found without reading
    ``obj.__dict__`` (which would move them): its referents then include that dictionary."""
    name = _KNOWN_ATTRIBUTE[type(obj).__name__]
    return any(type(r) is dict and name in r for r in gc.get_referents(obj))


def httpcore_objects(client: Any, responses: list[Any]) -> Iterator[Any]:
    """The pool, its connections and their HTTP/1.1 or HTTP/2 connections, and every httpcore
    stream behind the responses."""
    pool = client._transport._pool
    yield pool
    for conn in pool.connections:
        yield conn
        inner = getattr(conn, "_connection", None)
        if inner is not None:
            yield inner
    for response in responses:
        stream, seen = response.stream, set()
        while stream is not None and id(stream) not in seen:
            seen.add(id(stream))
            if type(stream).__name__ in _KNOWN_ATTRIBUTE:
                yield stream
            stream = next(
                (
                    getattr(stream, attr)
                    for attr in ("_stream", "_httpcore_stream")
                    if getattr(stream, attr, None) is not None
                ),
                None,
            )


def assert_laid_out_as_cpython_made_them(client: Any, responses: list[Any]) -> int:
    objects = list(httpcore_objects(client, responses))
    moved = [type(o).__qualname__ for o in objects if attributes_in_a_dictionary(o)]
    assert moved == []
    return len(objects)


def test_the_detector_sees_a_dictionary_read(hx: Any, loopback_server: LoopbackServer) -> None:
    with hx.Client() as client:
        client.get(f"{loopback_server.url}/ok")
        (conn,) = client._transport._pool.connections
        assert not attributes_in_a_dictionary(conn._connection)
        assert conn._connection.__dict__  # what poolwatch must never do
        assert attributes_in_a_dictionary(conn._connection)


@pytest.mark.anyio
async def test_an_async_http1_client_keeps_its_objects_laid_out_through_instrument_and_scrape(
    hx: Any, loopback_server: LoopbackServer, anyio_backend: str
) -> None:
    del anyio_backend
    async with hx.AsyncClient() as client:
        poolwatch.instrument(client)
        read = await client.get(f"{loopback_server.url}/ok")
        open_response = await client.send(
            client.build_request("GET", f"{loopback_server.url}/ok"), stream=True
        )
        leaked = await client.send(
            client.build_request("GET", f"{loopback_server.url}/ok"), stream=True
        )
        del leaked
        gc.collect()
        poolwatch.snapshot(client)  # the scrape polls the idle connections' sockets
        checked = assert_laid_out_as_cpython_made_them(client, [read, open_response])
        assert checked >= 9  # pool, 3 connections and their HTTP/1.1 ones, 2 x 2 streams
        await open_response.aclose()
        poolwatch.uninstrument(client)
        assert_laid_out_as_cpython_made_them(client, [read, open_response])


def test_a_sync_http1_client_keeps_its_objects_laid_out(
    hx: Any, loopback_server: LoopbackServer
) -> None:
    with hx.Client() as client:
        poolwatch.instrument(client)
        responses = [client.get(f"{loopback_server.url}/ok") for _ in range(3)]
        poolwatch.snapshot(client)
        assert assert_laid_out_as_cpython_made_them(client, responses) >= 3 + 3 * 2
        poolwatch.uninstrument(client)
        assert_laid_out_as_cpython_made_them(client, responses)


@pytest.mark.anyio
async def test_an_http2_client_keeps_its_objects_laid_out(
    hx: Any,
    loopback_server_factory: Any,
    server_ssl_context: ssl.SSLContext,
    client_ssl_context: ssl.SSLContext,
    anyio_backend: str,
) -> None:
    del anyio_backend
    server: LoopbackServer = loopback_server_factory(tls=server_ssl_context)
    async with hx.AsyncClient(http2=True, verify=client_ssl_context) as client:
        poolwatch.instrument(client)
        responses = [await client.get(f"{server.url}/ok") for _ in range(3)]
        assert responses[0].http_version == "HTTP/2"
        poolwatch.snapshot(client)
        assert assert_laid_out_as_cpython_made_them(client, responses) >= 3 + 3 * 2
        poolwatch.uninstrument(client)
        assert_laid_out_as_cpython_made_them(client, responses)


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)
