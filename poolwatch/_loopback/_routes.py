"""The standard routes: one healthy endpoint, a few slow ones and every way a server can fail.

Each misbehaving route fails the same way every time, so a test can name the exception the
client must raise (HTTP/1.1, as httpx sees it):

- ``/close``: 200 with keep-alive advertised, then the server closes. No error; the next
  request opens a new connection.
- ``/goaway``: 200, then GOAWAY (HTTP/1.1: ``Connection: close``). No error; the next request
  opens a new connection.
- ``/drop``: closes without any response. ``RemoteProtocolError``.
- ``/reset``: headers and half the body, then a TCP RST. ``ReadError``. (HTTP/2: RST_STREAM,
  ``RemoteProtocolError``.)
- ``/short``: Content-Length 100, 10 bytes, close. ``RemoteProtocolError``.
- ``/stall``: headers, then nothing until the client leaves. ``ReadTimeout``.
"""

from __future__ import annotations

import asyncio
import json
import time

from ._server import Handler, LoopbackRequest, Responder

__all__ = ["default_routes"]

#: The longest any route sleeps or stalls for, so a forgotten client cannot pin a handler.
MAX_WAIT_S = 300.0


def _float(request: LoopbackRequest, name: str, default: float) -> float:
    try:
        value = float(request.query.get(name, default))
    except ValueError:
        return default
    return min(max(value, 0.0), MAX_WAIT_S)


def _int(request: LoopbackRequest, name: str, default: int, maximum: int = 1 << 30) -> int:
    try:
        value = int(request.query.get(name, default))
    except ValueError:
        return default
    return min(max(value, 0), maximum)


async def ok(request: LoopbackRequest, response: Responder) -> None:
    """200 with a small JSON body."""
    await response.respond_json({"ok": True, "path": request.path})


async def delay(request: LoopbackRequest, response: Responder) -> None:
    """``?s=0.2``: sleep, then 200 (the body says how long it slept)."""
    seconds = _float(request, "s", 0.1)
    started = time.monotonic()
    await asyncio.sleep(seconds)
    await response.respond_json({"ok": True, "slept": round(time.monotonic() - started, 4)})


async def stream(request: LoopbackRequest, response: Responder) -> None:
    """``?chunks=N&delay=S&size=B``: N chunks of B bytes, S seconds apart, each flushed."""
    chunks = _int(request, "chunks", 5, maximum=1_000_000)
    pause = _float(request, "delay", 0.0)
    size = _int(request, "size", 16, maximum=64 * 1024 * 1024)
    await response.start(
        200,
        [("content-type", "application/octet-stream"), ("content-length", str(chunks * size))],
    )
    for i in range(chunks):
        if i and pause:
            await asyncio.sleep(pause)
        await response.send(bytes([0x61 + i % 26]) * size)
    await response.end()


async def status(request: LoopbackRequest, response: Responder) -> None:
    """``?code=503``: that status, with a small JSON body."""
    code = _int(request, "code", 200, maximum=999)
    if code < 100:
        code = 200
    await response.respond_json({"status": code}, status=code)


async def close(request: LoopbackRequest, response: Responder) -> None:
    """200 with keep-alive advertised, then the server closes the connection."""
    body = json.dumps({"ok": True, "then": "close"}).encode()
    await response.start(
        200,
        [
            ("content-type", "application/json"),
            ("content-length", str(len(body))),
            ("connection", "keep-alive"),
        ],
    )
    await response.send(body)
    await response.end()
    await response.close_connection()


async def drop(request: LoopbackRequest, response: Responder) -> None:
    """Close the connection without sending any response."""
    await response.close_connection()


async def reset(request: LoopbackRequest, response: Responder) -> None:
    """Headers and half the body, then a TCP RST (HTTP/2: RST_STREAM)."""
    body = b"x" * 1000
    await response.start(
        200, [("content-type", "application/octet-stream"), ("content-length", str(len(body)))]
    )
    await response.send(body[: len(body) // 2])
    await asyncio.sleep(0.01)  # let the headers and half the body reach the client first
    await response.abort()


async def short(request: LoopbackRequest, response: Responder) -> None:
    """Content-Length 100, then 10 bytes, then close."""
    await response.start(
        200, [("content-type", "application/octet-stream"), ("content-length", "100")]
    )
    await response.send(b"0123456789")
    await response.close_connection()


async def stall(request: LoopbackRequest, response: Responder) -> None:
    """Headers, then never the body, until the client goes away."""
    await response.start(
        200, [("content-type", "application/octet-stream"), ("content-length", "100")]
    )
    try:
        await asyncio.wait_for(response.wait_disconnected(), MAX_WAIT_S)
    except TimeoutError:
        await response.abort()


async def goaway(request: LoopbackRequest, response: Responder) -> None:
    """200, and the server takes no more requests on this connection.

    HTTP/2: a GOAWAY right behind the response, then the connection closes. HTTP/1.1: the
    response carries ``Connection: close`` and the connection closes after it.
    """
    await response.goaway()
    await response.respond_json({"ok": True, "then": "goaway"})


async def echo(request: LoopbackRequest, response: Responder) -> None:
    """The request as JSON: method, path, query, headers, body, HTTP version."""
    try:
        body_text: str | None = request.body.decode()
    except UnicodeDecodeError:
        body_text = None
    await response.respond_json(
        {
            "method": request.method,
            "path": request.path,
            "target": request.target,
            "query": request.query,
            "headers": [list(pair) for pair in request.headers],
            "body": body_text,
            "body_hex": None if body_text is not None else request.body.hex(),
            "body_length": len(request.body),
            "http_version": request.http_version,
            "stream_id": request.stream_id,
            "connection_id": request.connection_id,
        }
    )


def default_routes() -> dict[str, Handler]:
    """A fresh dict of the standard routes (add your own to it)."""
    return {
        "/ok": ok,
        "/delay": delay,
        "/stream": stream,
        "/status": status,
        "/close": close,
        "/drop": drop,
        "/reset": reset,
        "/short": short,
        "/stall": stall,
        "/goaway": goaway,
        "/echo": echo,
    }
