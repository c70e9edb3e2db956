"""The scenarios of ``test_host_objects.py``, each in an interpreter of its own.

``python host_objects_worker.py SCENARIO FAMILY URL [CA_PEM]`` runs one scenario through an
instrumented client and prints, as JSON, how many of httpcore's objects it checked and the
classes of those whose attributes were moved into a dictionary, before and after
``uninstrument()``. Its own process, so that each scenario starts from classes as a fresh
interpreter has them: once a class has ~28 instances CPython 3.11 lets only one more attribute
name into the layout its instances share, and a test session makes thousands of connections
before a scenario would run. The late scenarios make 40 first, on purpose: poolwatch's one
name on the pooled connection class (its request call; the pool's close call tells when one
closes) must fit then too.
"""

from __future__ import annotations

import asyncio
import gc
import importlib
import json
import ssl
import sys
from collections.abc import Iterator
from typing import Any

import poolwatch

#: An attribute every instance of these httpcore classes has from its __init__ on.
KNOWN_ATTRIBUTE = {
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
    "Request": "method",
}


def attributes_in_a_dictionary(obj: Any) -> bool:
    """Whether ``obj``'s attributes were moved into a dictionary, found without reading
    ``obj.__dict__`` (which would move them): its referents then include that dictionary."""
    name = KNOWN_ATTRIBUTE[type(obj).__name__]
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
            if type(stream).__name__ in KNOWN_ATTRIBUTE:
                yield stream
                request = getattr(stream, "_request", None)  # carried poolwatch's record
                if request is not None:
                    yield request
            stream = next(
                (
                    getattr(stream, attr)
                    for attr in ("_stream", "_httpcore_stream")
                    if getattr(stream, attr, None) is not None
                ),
                None,
            )


def moved(client: Any, responses: list[Any], with_pool: bool = True) -> tuple[int, list[str]]:
    objects = list(httpcore_objects(client, responses))[0 if with_pool else 1 :]
    return len(objects), [type(o).__qualname__ for o in objects if attributes_in_a_dictionary(o)]


async def async_http1(hx: Any, url: str) -> dict[str, Any]:
    async with hx.AsyncClient() as client:
        poolwatch.instrument(client)
        read = await client.get(f"{url}/ok")
        held = await client.send(client.build_request("GET", f"{url}/ok"), stream=True)
        leaked = await client.send(client.build_request("GET", f"{url}/ok"), stream=True)
        del leaked
        gc.collect()
        poolwatch.snapshot(client)  # the scrape polls the idle connections' sockets
        checked, during = moved(client, [read, held])
        await held.aclose()
        poolwatch.uninstrument(client)
        return {"checked": checked, "during": during, "after": moved(client, [read, held])[1]}


def sync_http1(hx: Any, url: str) -> dict[str, Any]:
    with hx.Client() as client:
        poolwatch.instrument(client)
        responses = [client.get(f"{url}/ok") for _ in range(3)]
        poolwatch.snapshot(client)
        checked, during = moved(client, responses)
        poolwatch.uninstrument(client)
        return {"checked": checked, "during": during, "after": moved(client, responses)[1]}


async def async_http2(hx: Any, url: str, ca_pem: str, late: bool = False) -> dict[str, Any]:
    """``late``: 40 clients of the process made an HTTP/2 connection and a stream each first,
    past the ~28 instances of each class after which one more attribute name fits."""
    verify = ssl.create_default_context(cafile=ca_pem)
    for _ in range(40 if late else 0):
        async with hx.AsyncClient(http2=True, verify=verify) as before:
            assert (await before.get(f"{url}/ok")).http_version == "HTTP/2"
    async with hx.AsyncClient(http2=True, verify=verify) as client:
        poolwatch.instrument(client)
        responses = [await client.get(f"{url}/ok") for _ in range(3)]
        assert all(r.http_version == "HTTP/2" for r in responses)
        poolwatch.snapshot(client)
        # Late, the pool itself is left out: its three names are the limit the README states.
        checked, during = moved(client, responses, with_pool=not late)
        poolwatch.uninstrument(client)
        after = moved(client, responses, with_pool=not late)[1]
        return {"checked": checked, "during": during, "after": after}


def late_http1(hx: Any, url: str) -> dict[str, Any]:
    """poolwatch arrives after the process made 40 connections of its own (past the ~28
    instances after which CPython lets one more attribute name into a class's inline layout):
    the pooled connections and their HTTP/1.1 ones still keep theirs through requests,
    a connection the pool closes, and scrapes."""
    with hx.Client(limits=hx.Limits(max_connections=40)) as before:
        for _ in range(40):
            before.get(f"{url}/ok", headers={"Connection": "close"})
    with hx.Client(limits=hx.Limits(max_keepalive_connections=1)) as client:
        poolwatch.instrument(client)
        responses = [client.get(f"{url}/ok") for _ in range(3)]
        held = [client.send(client.build_request("GET", f"{url}/ok"), stream=True) for _ in (0, 1)]
        for response in held:  # read to the end, two idle: the pool keeps one, closes one
            response.read()
            response.close()
        poolwatch.snapshot(client)
        responses.append(client.get(f"{url}/ok"))
        poolwatch.snapshot(client)
        return _late_result(client, responses)


async def late_async_http1(hx: Any, url: str) -> dict[str, Any]:
    """``late_http1`` for the async classes: the pool at C=32 calls ``is_idle()`` and more
    on each of its connections for every request."""
    async with hx.AsyncClient(limits=hx.Limits(max_connections=40)) as before:
        for _ in range(40):
            await before.get(f"{url}/ok", headers={"Connection": "close"})
    async with hx.AsyncClient(limits=hx.Limits(max_keepalive_connections=1)) as client:
        poolwatch.instrument(client)
        responses = [await client.get(f"{url}/ok") for _ in range(3)]
        held = [
            await client.send(client.build_request("GET", f"{url}/ok"), stream=True) for _ in (0, 1)
        ]
        for response in held:
            await response.aread()
            await response.aclose()
        poolwatch.snapshot(client)
        responses.append(await client.get(f"{url}/ok"))
        poolwatch.snapshot(client)
        return _late_result(client, responses)


def _late_result(client: Any, responses: list[Any]) -> dict[str, Any]:
    pooled = client._transport._pool.connections
    # The pooled connections too: the pool walks all of them for every request
    # (``is_idle()``, ``has_expired()``...), a dictionary lookup for each on a moved one.
    checked = [*pooled, *(c._connection for c in pooled)]
    # The 40 requests before made ~28 instances of httpcore's request class too: the
    # record a request carries to the connection's call fits the layout all the same.
    checked += [o for o in httpcore_objects(client, responses) if type(o).__name__ == "Request"]
    during = [type(o).__qualname__ for o in checked if attributes_in_a_dictionary(o)]
    snap = poolwatch.snapshot(client)
    poolwatch.uninstrument(client)  # deletes only the names it set: a missing one would move
    after = [type(o).__qualname__ for o in checked if attributes_in_a_dictionary(o)]
    return {
        "checked": len(checked),
        "during": during,
        "after": after,
        "dropped": snap.connections_created_total - len(pooled),  # the pool's own books
        "closed": snap.origins[0].connection_duration.count,  # poolwatch's
    }


def main() -> None:
    scenario, family, url, *rest = sys.argv[1:]
    hx = importlib.import_module(family)
    if scenario == "async-http1":
        result = asyncio.run(async_http1(hx, url))
    elif scenario == "sync-http1":
        result = sync_http1(hx, url)
    elif scenario == "late-http1":
        result = late_http1(hx, url)
    elif scenario == "late-async-http1":
        result = asyncio.run(late_async_http1(hx, url))
    elif scenario == "late-async-http2":
        result = asyncio.run(async_http2(hx, url, rest[0], late=True))
    else:
        result = asyncio.run(async_http2(hx, url, rest[0]))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
