"""A small HTTP/1.1 + HTTP/2 server on a raw asyncio event loop, in its own thread.

It exists so that tests, chaos experiments and ``poolwatch demo`` can drive real httpx / httpx2
clients against a server whose behaviour is exact and whose counters are ground truth: how many
TCP connections it accepted, how many are open, how many requests overlapped. Frameworks
"fix" misbehaviour (they add Content-Length, finish bodies, answer 500 politely); this server
writes what the handler asks for, byte for byte, including the failures: a TCP RST, a
truncated body, a RST_STREAM, a GOAWAY.

Only the standard library and ``h2`` are used, so the demo can ship it.
"""

from __future__ import annotations

import asyncio
import contextlib
import http
import json
import logging
import socket
import ssl
import struct
import threading
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Literal, Self, cast
from urllib.parse import parse_qsl, urlsplit

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
from hyperframe.frame import GoAwayFrame

__all__ = [
    "Handler",
    "Headers",
    "HeadersLike",
    "LoopbackRequest",
    "LoopbackServer",
    "LoopbackStats",
    "Responder",
]

logger = logging.getLogger("poolwatch.loopback")

H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
#: Request heads larger than this get a 431 and the connection is closed.
MAX_HEAD_BYTES = 64 * 1024
#: Request bodies larger than this get a 413 and the connection is closed.
MAX_BODY_BYTES = 64 * 1024 * 1024
#: After a GOAWAY, how long the server waits for the client to close before closing itself.
GOAWAY_CLOSE_GRACE_S = 1.0
#: On stop(), how long connections get to close cleanly before they are aborted.
STOP_GRACE_S = 0.5
_HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade", "te"}
)

HeadersLike = Iterable[tuple[str, str]] | Mapping[str, str]


class Headers(list[tuple[str, str]]):
    """Request headers: ``(name, value)`` pairs, names lower-cased, in wire order."""

    def get(self, name: str, default: str | None = None) -> str | None:
        """The first value of ``name`` (case-insensitive), or ``default``."""
        wanted = name.lower()
        for key, value in self:
            if key == wanted:
                return value
        return default

    def get_all(self, name: str) -> list[str]:
        """Every value of ``name`` (case-insensitive), in order."""
        wanted = name.lower()
        return [value for key, value in self if key == wanted]


# --------------------------------------------------------------------------------------------
# Ground-truth counters
# --------------------------------------------------------------------------------------------


class LoopbackStats:
    """What the server saw, readable from any thread.

    Every attribute is a consistent read under one lock; the ``Counter`` attributes return
    copies. ``wait_for`` blocks until a predicate over these attributes holds, because
    connections close asynchronously.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.RLock())
        self._accepted_connections = 0
        self._open_connections = 0
        self._tls_handshakes = 0
        self._tls_handshake_failures = 0
        self._h1_connections = 0
        self._h2_connections = 0
        self._requests = 0
        self._in_flight_requests = 0
        self._peak_concurrent_requests = 0
        self._client_disconnects = 0
        self._resets_sent = 0
        self._goaways_sent = 0
        self._requests_by_path: Counter[str] = Counter()
        self._responses_by_status: Counter[int] = Counter()
        self._labels: Counter[str] = Counter()

    # -- reads ------------------------------------------------------------------------------

    @property
    def accepted_connections(self) -> int:
        """TCP connections accepted since the server started."""
        with self._cond:
            return self._accepted_connections

    @property
    def open_connections(self) -> int:
        """TCP connections currently open (accepted and not yet closed)."""
        with self._cond:
            return self._open_connections

    @property
    def tls_handshakes(self) -> int:
        """Completed TLS handshakes."""
        with self._cond:
            return self._tls_handshakes

    @property
    def tls_handshake_failures(self) -> int:
        """TLS handshakes that failed or timed out."""
        with self._cond:
            return self._tls_handshake_failures

    @property
    def h1_connections(self) -> int:
        """Connections that spoke HTTP/1.1."""
        with self._cond:
            return self._h1_connections

    @property
    def h2_connections(self) -> int:
        """Connections that spoke HTTP/2 (ALPN "h2" or the h2c prior-knowledge preface)."""
        with self._cond:
            return self._h2_connections

    @property
    def requests(self) -> int:
        """Requests whose head and body were received and handed to a handler (or 404)."""
        with self._cond:
            return self._requests

    @property
    def in_flight_requests(self) -> int:
        """Requests whose handler is running now."""
        with self._cond:
            return self._in_flight_requests

    @property
    def peak_concurrent_requests(self) -> int:
        """The highest ``in_flight_requests`` seen."""
        with self._cond:
            return self._peak_concurrent_requests

    @property
    def client_disconnects(self) -> int:
        """Requests the client left (closed, reset, RST_STREAM) before the response ended."""
        with self._cond:
            return self._client_disconnects

    @property
    def resets_sent(self) -> int:
        """TCP RSTs (HTTP/1.1) and RST_STREAMs (HTTP/2) the server sent on purpose."""
        with self._cond:
            return self._resets_sent

    @property
    def goaways_sent(self) -> int:
        """HTTP/2 GOAWAY frames sent."""
        with self._cond:
            return self._goaways_sent

    @property
    def requests_by_path(self) -> Counter[str]:
        """Requests per path (no query string); a copy."""
        with self._cond:
            return Counter(self._requests_by_path)

    @property
    def responses_by_status(self) -> Counter[int]:
        """Response heads sent, per status code; a copy."""
        with self._cond:
            return Counter(self._responses_by_status)

    @property
    def labels(self) -> Counter[str]:
        """Free-form counters that handlers bump with :meth:`count`; a copy."""
        with self._cond:
            return Counter(self._labels)

    def snapshot(self) -> dict[str, Any]:
        """Every counter at one instant."""
        with self._cond:
            return {
                "accepted_connections": self._accepted_connections,
                "open_connections": self._open_connections,
                "tls_handshakes": self._tls_handshakes,
                "tls_handshake_failures": self._tls_handshake_failures,
                "h1_connections": self._h1_connections,
                "h2_connections": self._h2_connections,
                "requests": self._requests,
                "in_flight_requests": self._in_flight_requests,
                "peak_concurrent_requests": self._peak_concurrent_requests,
                "client_disconnects": self._client_disconnects,
                "resets_sent": self._resets_sent,
                "goaways_sent": self._goaways_sent,
                "requests_by_path": dict(self._requests_by_path),
                "responses_by_status": dict(self._responses_by_status),
                "labels": dict(self._labels),
            }

    def __repr__(self) -> str:
        return f"LoopbackStats({self.snapshot()!r})"

    def wait_for(self, predicate: Callable[[LoopbackStats], bool], timeout: float = 5.0) -> None:
        """Block until ``predicate(self)`` is true; raise ``TimeoutError`` (with the figures)."""
        with self._cond:
            if not self._cond.wait_for(lambda: predicate(self), timeout):
                raise TimeoutError(f"stats did not satisfy the predicate in {timeout} s: {self!r}")

    # -- writes -----------------------------------------------------------------------------

    def count(self, label: str, n: int = 1) -> None:
        """Bump a free-form counter (handlers use this, e.g. ``"openai.chat.stream"``)."""
        with self._cond:
            self._labels[label] += n
            self._cond.notify_all()

    def _bump(self, name: str, n: int = 1) -> None:
        with self._cond:
            setattr(self, name, getattr(self, name) + n)
            self._cond.notify_all()

    def _request_started(self, path: str) -> None:
        with self._cond:
            self._requests += 1
            self._requests_by_path[path] += 1
            self._in_flight_requests += 1
            self._peak_concurrent_requests = max(
                self._peak_concurrent_requests, self._in_flight_requests
            )
            self._cond.notify_all()

    def _request_finished(self) -> None:
        with self._cond:
            self._in_flight_requests -= 1
            self._cond.notify_all()

    def _response_started(self, status: int) -> None:
        with self._cond:
            self._responses_by_status[status] += 1
            self._cond.notify_all()


# --------------------------------------------------------------------------------------------
# Requests, responders, handlers
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class LoopbackRequest:
    """One request, fully received (head and body) before the handler runs."""

    method: str
    #: The path without the query string, as sent (not percent-decoded).
    path: str
    #: Query parameters; for repeated names the last one wins.
    query: dict[str, str]
    headers: Headers
    body: bytes
    #: "1.1", "1.0" or "2".
    http_version: str
    #: The raw request target (path and query).
    target: str = ""
    #: The HTTP/2 stream id, ``None`` on HTTP/1.x.
    stream_id: int | None = None
    #: A per-server serial number of the TCP connection the request came on.
    connection_id: int = 0
    stats: LoopbackStats = field(default_factory=LoopbackStats, repr=False)

    def json(self) -> Any:
        """The body parsed as JSON (``None`` for an empty body)."""
        if not self.body:
            return None
        return json.loads(self.body)


class Responder:
    """How a handler answers. HTTP/1.1 and HTTP/2 implement the same calls.

    ``start`` sends the status line / HEADERS; ``send`` writes and flushes one chunk (so
    server-sent events really stream); ``end`` finishes the response. The rest are
    misbehaviour on purpose. Once the client has gone, every call is a silent no-op; the
    handler task is cancelled soon after.
    """

    #: "1.1", "1.0" or "2".
    http_version: str = "1.1"

    def __init__(self) -> None:
        self._started = False
        self._done = False
        self._gone = asyncio.Event()

    @property
    def started(self) -> bool:
        """The response head has been sent."""
        return self._started

    @property
    def finished(self) -> bool:
        """``end``, ``abort`` or a connection-closing call has happened."""
        return self._done

    @property
    def disconnected(self) -> bool:
        """The client went away (or the stream was reset)."""
        return self._gone.is_set()

    async def wait_disconnected(self) -> None:
        """Return once the client has gone away."""
        await self._gone.wait()

    async def start(self, status: int, headers: HeadersLike = ()) -> None:
        """Send the response head. Without a content-length, HTTP/1.1 uses chunked."""
        raise NotImplementedError

    async def send(self, chunk: bytes) -> None:
        """Send one chunk of body and flush it (starting a 200 if needed)."""
        raise NotImplementedError

    async def end(self) -> None:
        """Finish the response (starting an empty 200 if nothing was sent)."""
        raise NotImplementedError

    async def abort(self, error_code: int = h2.errors.ErrorCodes.INTERNAL_ERROR) -> None:
        """HTTP/1.1: TCP RST of the connection. HTTP/2: RST_STREAM on this stream."""
        raise NotImplementedError

    async def abort_connection(self) -> None:
        """TCP RST of the whole connection, for both protocols."""
        raise NotImplementedError

    async def close_connection(self) -> None:
        """HTTP/1.1: close the socket after what was written (FIN). HTTP/2: GOAWAY, close."""
        raise NotImplementedError

    async def goaway(
        self, error_code: int = 0, *, last_stream_id: int | None = None, graceful: bool = True
    ) -> None:
        """Stop taking requests on this connection.

        HTTP/2: a GOAWAY frame (``last_stream_id`` defaults to the highest stream received,
        this one included). With ``graceful`` the frame goes out as soon as those streams have
        finished, right behind this response's end; without it, now. The connection closes when
        those streams are done (after the client closes, or after a short grace). HTTP/1.1:
        ``Connection: close`` on this response if it has not started, and the connection is
        closed after it.
        """
        raise NotImplementedError

    async def send_raw(self, data: bytes) -> None:
        """Write bytes straight to the socket, bypassing all framing (to break protocols)."""
        raise NotImplementedError

    # -- conveniences -----------------------------------------------------------------------

    async def respond(self, status: int, body: bytes = b"", headers: HeadersLike = ()) -> None:
        """A whole response with a Content-Length."""
        pairs = [(k.lower(), v) for k, v in _pairs(headers) if k.lower() != "content-length"]
        pairs.append(("content-length", str(len(body))))
        await self.start(status, pairs)
        if body:
            await self.send(body)
        await self.end()

    async def respond_json(self, obj: Any, status: int = 200, headers: HeadersLike = ()) -> None:
        """A whole ``application/json`` response."""
        pairs = [(k, v) for k, v in _pairs(headers) if k.lower() != "content-type"]
        pairs.append(("content-type", "application/json"))
        await self.respond(status, json.dumps(obj).encode(), pairs)

    async def _fail(self) -> None:
        """The handler raised: a 500 if nothing was sent, else break the response."""
        if self._done:
            return
        if not self._started:
            await self.respond(500, b"internal server error\n", [("content-type", "text/plain")])
        else:
            await self._break()

    async def _break(self) -> None:
        raise NotImplementedError


Handler = Callable[[LoopbackRequest, Responder], Awaitable[None]]


def _pairs(headers: HeadersLike) -> list[tuple[str, str]]:
    items = headers.items() if isinstance(headers, Mapping) else headers
    return [(str(k), str(v)) for k, v in items]


def _reason(status: int) -> str:
    try:
        return http.HTTPStatus(status).phrase
    except ValueError:
        return ""


# --------------------------------------------------------------------------------------------
# The connection (one asyncio.Protocol per TCP connection)
# --------------------------------------------------------------------------------------------


class _Connection(asyncio.Protocol):
    """Transport plumbing shared by both protocols: buffering, flow control, closing."""

    def __init__(self, engine: _Engine, sock: socket.socket, connection_id: int) -> None:
        self.engine = engine
        self.sock = sock
        self.connection_id = connection_id
        self.transport: asyncio.Transport | None = None
        self.session: _H1Session | _H2Session | None = None
        self.tasks: set[asyncio.Task[None]] = set()
        self.closed = False
        self.gone = asyncio.Event()
        self._sniff = bytearray()
        self._paused = False
        self._drain_waiters: list[asyncio.Future[None]] = []
        self._released = False

    # -- asyncio.Protocol -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.engine.connections.add(self)
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is not None:
            self.engine.stats._bump("_tls_handshakes")
            if ssl_object.selected_alpn_protocol() == "h2":
                if not self.engine.http2:
                    logger.error(
                        "ALPN selected h2 but this LoopbackServer has http2=False; give it an "
                        "SSLContext whose ALPN list leaves out 'h2'. Closing the connection."
                    )
                    self.abort()
                    return
                self._become_h2(b"")
                return
            self._become_h1(b"")
        elif not self.engine.http2:
            self._become_h1(b"")
        # else: wait for the first bytes to tell h2c prior knowledge from HTTP/1.1

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        if self.session is not None:
            self.session.data_received(data)
            return
        self._sniff += data
        head = bytes(self._sniff[: len(H2_PREFACE)])
        if H2_PREFACE.startswith(head) and len(head) < len(H2_PREFACE):
            return  # could still be the preface
        initial = bytes(self._sniff)
        self._sniff.clear()
        if head == H2_PREFACE:
            self._become_h2(initial)
        else:
            self._become_h1(initial)

    def eof_received(self) -> bool | None:
        # The client closed its side: treat it as gone (half-closing HTTP clients are rare),
        # and let the transport close.
        self.gone.set()
        if self.session is not None:
            self.session.client_gone()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.gone.set()
        if self.session is not None:
            self.session.client_gone()
        for waiter in self._drain_waiters:
            if not waiter.done():
                waiter.set_result(None)
        self._drain_waiters.clear()
        for task in list(self.tasks):
            if task is not asyncio.current_task():
                task.cancel()
        self.engine.connections.discard(self)
        self.release()

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        for waiter in self._drain_waiters:
            if not waiter.done():
                waiter.set_result(None)
        self._drain_waiters.clear()

    # -- helpers ----------------------------------------------------------------------------

    def release(self) -> None:
        """Count the connection as closed, exactly once."""
        if not self._released:
            self._released = True
            self.engine.stats._bump("_open_connections", -1)

    def _become_h1(self, initial: bytes) -> None:
        self.engine.stats._bump("_h1_connections")
        self.session = _H1Session(self)
        if initial:
            self.session.data_received(initial)

    def _become_h2(self, initial: bytes) -> None:
        self.engine.stats._bump("_h2_connections")
        self.session = _H2Session(self)
        if initial:
            self.session.data_received(initial)

    def spawn(self, coro: Awaitable[None]) -> asyncio.Task[None]:
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        self.engine.tasks.add(task)

        def forget(t: asyncio.Task[None]) -> None:
            self.tasks.discard(t)
            self.engine.tasks.discard(t)

        task.add_done_callback(forget)
        return task

    @property
    def writable(self) -> bool:
        return not self.closed and self.transport is not None and not self.transport.is_closing()

    def write(self, data: bytes) -> bool:
        """Queue bytes; a silent no-op once the connection is closing."""
        if not data or not self.writable:
            return False
        assert self.transport is not None
        self.transport.write(data)
        return True

    async def drain(self) -> None:
        """Wait until the transport's buffer is below its high-water mark."""
        if self._paused and not self.closed:
            waiter = asyncio.get_running_loop().create_future()
            self._drain_waiters.append(waiter)
            await waiter

    def close(self) -> None:
        """Close after the queued bytes are written (FIN)."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if (
            transport.get_write_buffer_size() == 0
            and transport.get_extra_info("sslcontext") is None
        ):
            # Send the FIN now rather than on the loop's next turn: the client runs in this
            # process and may otherwise reuse the connection before it sees the close.
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_WR)
        transport.close()

    def abort(self) -> None:
        """Close with a TCP RST: SO_LINGER(1, 0), then abort the transport."""
        with contextlib.suppress(OSError):
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        if self.transport is not None:
            self.transport.abort()


# --------------------------------------------------------------------------------------------
# HTTP/1.1
# --------------------------------------------------------------------------------------------


class _BadRequest(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class _ClientGone(Exception):
    pass


class _H1Session:
    def __init__(self, conn: _Connection) -> None:
        self.conn = conn
        self.buf = bytearray()
        self.data = asyncio.Event()
        self.responses = 0
        conn.spawn(self._run())

    def data_received(self, data: bytes) -> None:
        self.buf += data
        self.data.set()

    def client_gone(self) -> None:
        self.data.set()

    async def _wait(self, timeout: float | None = None) -> None:
        if self.conn.gone.is_set():
            raise _ClientGone
        self.data.clear()
        if timeout is None:
            await self.data.wait()
        else:
            await asyncio.wait_for(self.data.wait(), timeout)
        if self.conn.gone.is_set() and not self.buf:
            raise _ClientGone

    async def _read_head(self) -> bytes:
        while True:
            while self.buf[:2] == b"\r\n":  # stray CRLFs between requests are allowed
                del self.buf[:2]
            end = self.buf.find(b"\r\n\r\n")
            if end >= 0:
                head = bytes(self.buf[:end])
                del self.buf[: end + 4]
                return head
            if len(self.buf) > MAX_HEAD_BYTES:
                raise _BadRequest(431, "request head too large")
            idle = self.conn.engine.idle_timeout if not self.buf else None
            if self.conn.gone.is_set():
                raise _ClientGone
            await self._wait(idle)

    async def _read_exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            if self.conn.gone.is_set():
                raise _ClientGone
            await self._wait()
        data = bytes(self.buf[:n])
        del self.buf[:n]
        return data

    async def _read_line(self) -> bytes:
        while True:
            end = self.buf.find(b"\r\n")
            if end >= 0:
                line = bytes(self.buf[:end])
                del self.buf[: end + 2]
                return line
            if len(self.buf) > MAX_HEAD_BYTES:
                raise _BadRequest(400, "line too long")
            if self.conn.gone.is_set():
                raise _ClientGone
            await self._wait()

    async def _read_chunked(self) -> bytes:
        body = bytearray()
        while True:
            line = await self._read_line()
            size_text = line.split(b";", 1)[0].strip()
            try:
                size = int(size_text, 16)
            except ValueError:
                raise _BadRequest(400, "bad chunk size") from None
            if size == 0:
                while await self._read_line():  # trailers, up to the empty line
                    pass
                return bytes(body)
            if len(body) + size > MAX_BODY_BYTES:
                raise _BadRequest(413, "body too large")
            body += await self._read_exact(size)
            if await self._read_exact(2) != b"\r\n":
                raise _BadRequest(400, "bad chunk terminator")

    async def _run(self) -> None:
        try:
            while not self.conn.gone.is_set():
                try:
                    head = await self._read_head()
                except TimeoutError:  # idle_timeout between requests
                    self.conn.close()
                    return
                keep_going = await self._serve_one(head)
                if not keep_going:
                    return
        except _ClientGone:
            pass
        except _BadRequest as exc:
            await self._reject(exc.status, str(exc))
        except asyncio.CancelledError:
            pass
        except Exception:
            logger.exception("loopback HTTP/1.1 connection failed")
            self.conn.abort()
        finally:
            self.conn.close()

    async def _reject(self, status: int, message: str) -> None:
        body = (message + "\n").encode()
        self.conn.write(
            f"HTTP/1.1 {status} {_reason(status)}\r\ncontent-type: text/plain\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n".encode()
            + body
        )
        self.conn.engine.stats._response_started(status)
        self.conn.close()

    async def _serve_one(self, head: bytes) -> bool:
        """Serve one request; False when the connection must not be reused."""
        lines = head.split(b"\r\n")
        try:
            method, target, version = lines[0].decode("latin-1").split(" ")
        except ValueError:
            raise _BadRequest(400, "bad request line") from None
        if version not in ("HTTP/1.1", "HTTP/1.0"):
            raise _BadRequest(505, "HTTP version not supported")
        headers = Headers()
        for raw in lines[1:]:
            name, sep, value = raw.decode("latin-1").partition(":")
            if not sep or not name or name != name.strip() or raw[:1] in (b" ", b"\t"):
                raise _BadRequest(400, "bad header line")
            headers.append((name.lower(), value.strip()))
        http_version = version[5:]

        transfer_encoding = ",".join(headers.get_all("transfer-encoding")).lower()
        lengths = {v.strip() for v in headers.get_all("content-length")}
        if "chunked" in transfer_encoding:
            body_kind: Literal["chunked", "length", "none"] = "chunked"
            length = 0
        elif lengths:
            if len(lengths) > 1 or not next(iter(lengths)).isdigit():
                raise _BadRequest(400, "bad content-length")
            length = int(next(iter(lengths)))
            if length > MAX_BODY_BYTES:
                raise _BadRequest(413, "body too large")
            body_kind = "length" if length else "none"
        else:
            body_kind, length = "none", 0
        expect = (headers.get("expect") or "").lower()
        if body_kind != "none" and expect == "100-continue" and http_version == "1.1":
            self.conn.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        if body_kind == "chunked":
            body = await self._read_chunked()
        elif body_kind == "length":
            body = await self._read_exact(length)
        else:
            body = b""

        connection_tokens = {
            t.strip().lower() for v in headers.get_all("connection") for t in v.split(",")
        }
        if http_version == "1.1":
            keep_alive = "close" not in connection_tokens
        else:
            keep_alive = "keep-alive" in connection_tokens

        path, query = _split_target(target)
        request = LoopbackRequest(
            method=method,
            path=path,
            query=query,
            headers=headers,
            body=body,
            http_version=http_version,
            target=target,
            connection_id=self.conn.connection_id,
            stats=self.conn.engine.stats,
        )
        responder = _H1Responder(self, request, keep_alive=keep_alive)
        await self.conn.engine.dispatch(request, responder)
        self.responses += 1
        if not self.conn.writable or responder.close_after:
            self.conn.close()
            return False
        close_after = self.conn.engine.close_after
        if close_after is not None and self.responses >= close_after:
            self.conn.close()  # keep-alive was advertised; close anyway
            return False
        return True


class _H1Responder(Responder):
    def __init__(self, session: _H1Session, request: LoopbackRequest, *, keep_alive: bool) -> None:
        super().__init__()
        self.session = session
        self.conn = session.conn
        self.request = request
        self.http_version = request.http_version
        #: The connection is closed after this response.
        self.close_after = not keep_alive
        self._advertise_close = not keep_alive
        self._framing: Literal["chunked", "length", "none", "eof"] = "none"
        self._declared = 0
        self._sent = 0
        self._gone = self.conn.gone  # on HTTP/1.1 the response lives as long as the connection

    def _write(self, data: bytes) -> None:
        self.conn.write(data)

    async def _flush(self) -> None:
        await self.conn.drain()

    async def start(self, status: int, headers: HeadersLike = ()) -> None:
        if self._started:
            raise RuntimeError("the response has already started")
        if self._done:
            return
        self._started = True
        pairs = [(k.lower(), v) for k, v in _pairs(headers)]
        names = {k for k, _ in pairs}
        no_body = self.request.method == "HEAD" or status < 200 or status in (204, 304)
        if "content-length" in names:
            value = next(v for k, v in pairs if k == "content-length")
            self._declared = int(value) if value.strip().isdigit() else 0
            self._framing = "none" if no_body else "length"
        elif "transfer-encoding" in names:
            self._framing = "none" if no_body else "chunked"
        elif no_body:
            self._framing = "none"
        elif self.request.http_version == "1.1":
            pairs.append(("transfer-encoding", "chunked"))
            self._framing = "chunked"
        else:
            self._framing = "eof"  # HTTP/1.0 without a length: the body ends at close
            self.close_after = self._advertise_close = True
        if "connection" not in names:
            if self._advertise_close:
                pairs.append(("connection", "close"))
            elif self.request.http_version == "1.0":
                pairs.append(("connection", "keep-alive"))
        if "server" not in names:
            pairs.append(("server", "poolwatch-loopback"))
        lines = [f"HTTP/1.1 {status} {_reason(status)}"]
        lines += [f"{k}: {v}" for k, v in pairs]
        self.conn.engine.stats._response_started(status)
        self._write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        await self._flush()

    async def send(self, chunk: bytes) -> None:
        if self._done:
            return
        if not self._started:
            await self.start(200)
        if not chunk:
            return
        if self._framing == "chunked":
            self._write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        elif self._framing in ("length", "eof"):
            self._write(chunk)
        self._sent += len(chunk)
        await self._flush()

    async def end(self) -> None:
        if self._done:
            return
        if not self._started:
            await self.start(200, [("content-length", "0")])
        self._done = True
        if self._framing == "chunked":
            self._write(b"0\r\n\r\n")
        elif self._framing == "length" and self._sent != self._declared:
            self.close_after = True  # the framing is broken; the connection cannot be reused
        elif self._framing == "eof":
            self.close_after = True
        await self._flush()

    async def abort(self, error_code: int = h2.errors.ErrorCodes.INTERNAL_ERROR) -> None:
        await self.abort_connection()

    async def abort_connection(self) -> None:
        if self._done and not self.conn.writable:
            return
        self._done = True
        self.close_after = True
        if self.conn.writable:
            self.conn.engine.stats._bump("_resets_sent")
        self.conn.abort()

    async def close_connection(self) -> None:
        self._done = True
        self.close_after = True
        self.conn.close()

    async def goaway(
        self, error_code: int = 0, *, last_stream_id: int | None = None, graceful: bool = True
    ) -> None:
        self.close_after = True
        if not self._started:
            self._advertise_close = True

    async def send_raw(self, data: bytes) -> None:
        self._write(data)
        await self._flush()

    async def _break(self) -> None:
        await self.close_connection()


# --------------------------------------------------------------------------------------------
# HTTP/2
# --------------------------------------------------------------------------------------------


class _H2Stream:
    def __init__(self, stream_id: int, headers: list[tuple[bytes, bytes]]) -> None:
        self.stream_id = stream_id
        self.headers = headers
        self.body = bytearray()
        self.task: asyncio.Task[None] | None = None
        self.gone = asyncio.Event()
        self.finished = False


class _H2Session:
    def __init__(self, conn: _Connection) -> None:
        self.conn = conn
        engine = conn.engine
        self.h2 = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=False, header_encoding=None)
        )
        self.h2.local_settings = h2.settings.Settings(
            client=False,
            initial_values={
                h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: engine.h2_max_concurrent_streams,
                h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: MAX_HEAD_BYTES,
            },
        )
        self.h2.initiate_connection()
        self.streams: dict[int, _H2Stream] = {}
        self.streams_received = 0
        #: Set once the server decided to stop taking streams: the GOAWAY's last_stream_id.
        self.last_stream_id: int | None = None
        self.goaway_error_code = 0
        self.goaway_sent = False
        self.remote_goaway = False
        self._window = asyncio.Event()
        self._idle_timer: asyncio.TimerHandle | None = None
        self._close_timer: asyncio.TimerHandle | None = None
        self.flush()
        self._arm_idle()

    # -- plumbing ---------------------------------------------------------------------------

    def flush(self) -> None:
        data = self.h2.data_to_send()
        if data:
            self.conn.write(data)

    def wake_senders(self) -> None:
        self._window.set()
        self._window = asyncio.Event()

    async def wait_window(self) -> None:
        await self._window.wait()

    def client_gone(self) -> None:
        for stream in self.streams.values():
            stream.gone.set()
        self.wake_senders()
        self._cancel_timers()

    def _cancel_timers(self) -> None:
        for timer in (self._idle_timer, self._close_timer):
            if timer is not None:
                timer.cancel()
        self._idle_timer = self._close_timer = None

    def _arm_idle(self) -> None:
        timeout = self.conn.engine.idle_timeout
        if timeout is None or self.conn.closed:
            return
        if self._idle_timer is not None:
            self._idle_timer.cancel()
        self._idle_timer = asyncio.get_running_loop().call_later(timeout, self._idle_expired)

    def _idle_expired(self) -> None:
        self._idle_timer = None
        if not self.streams:
            self.close_now()

    def close_now(self, error_code: int = 0) -> None:
        """GOAWAY (if none was sent) and close."""
        if not self.goaway_sent:
            with contextlib.suppress(h2.exceptions.ProtocolError):
                self.h2.close_connection(error_code=error_code)
                self.goaway_sent = True
                self.conn.engine.stats._bump("_goaways_sent")
        self.flush()
        self.conn.close()

    # -- inbound ----------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        try:
            events = self.h2.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            logger.debug("HTTP/2 protocol error from the client: %s", exc)
            self.flush()  # h2 queued a GOAWAY
            self.conn.close()
            return
        for event in events:
            self._handle(event)
        self.flush()

    def _handle(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.RequestReceived):
            assert event.stream_id is not None
            if self.last_stream_id is not None and event.stream_id > self.last_stream_id:
                return  # after our GOAWAY: the client knows this stream was not processed
            if self.remote_goaway:
                return
            stream = _H2Stream(event.stream_id, list(event.headers or []))
            self.streams[event.stream_id] = stream
            if self._idle_timer is not None:
                self._idle_timer.cancel()
                self._idle_timer = None
            self.streams_received += 1
            close_after = self.conn.engine.close_after
            if (
                close_after is not None
                and self.streams_received >= close_after
                and self.last_stream_id is None
            ):
                self.last_stream_id = event.stream_id  # GOAWAY once streams up to here finish
        elif isinstance(event, h2.events.DataReceived):
            assert event.stream_id is not None
            stream_or_none = self.streams.get(event.stream_id)
            if stream_or_none is not None and event.data:
                stream_or_none.body += event.data
            if event.flow_controlled_length:
                self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        elif isinstance(event, h2.events.StreamEnded):
            assert event.stream_id is not None
            stream_or_none = self.streams.get(event.stream_id)
            if stream_or_none is not None and stream_or_none.task is None:
                stream_or_none.task = self.conn.spawn(self._serve(stream_or_none))
        elif isinstance(event, h2.events.StreamReset):
            assert event.stream_id is not None
            stream_or_none = self.streams.get(event.stream_id)
            if stream_or_none is not None:
                stream_or_none.gone.set()
                if stream_or_none.task is not None:
                    stream_or_none.task.cancel()
                else:
                    self._stream_done(stream_or_none)
            self.wake_senders()
        elif isinstance(event, h2.events.WindowUpdated | h2.events.RemoteSettingsChanged):
            self.wake_senders()
        elif isinstance(event, h2.events.ConnectionTerminated):
            self.remote_goaway = True
            if not self.streams:
                self.conn.close()

    # -- streams ----------------------------------------------------------------------------

    async def _serve(self, stream: _H2Stream) -> None:
        try:
            request = self._request(stream)
            responder = _H2Responder(self, stream)
            await self.conn.engine.dispatch(request, responder)
        except asyncio.CancelledError:
            pass
        except Exception:
            logger.exception("loopback HTTP/2 stream %d failed", stream.stream_id)
        finally:
            self._stream_done(stream)

    def _request(self, stream: _H2Stream) -> LoopbackRequest:
        pseudo: dict[str, str] = {}
        headers = Headers()
        for raw_name, raw_value in stream.headers:
            name = raw_name.decode("latin-1").lower()
            value = raw_value.decode("latin-1")
            if name.startswith(":"):
                pseudo[name] = value
            else:
                headers.append((name, value))
        if ":authority" in pseudo and headers.get("host") is None:
            headers.insert(0, ("host", pseudo[":authority"]))
        target = pseudo.get(":path", "/")
        path, query = _split_target(target)
        return LoopbackRequest(
            method=pseudo.get(":method", "GET"),
            path=path,
            query=query,
            headers=headers,
            body=bytes(stream.body),
            http_version="2",
            target=target,
            stream_id=stream.stream_id,
            connection_id=self.conn.connection_id,
            stats=self.conn.engine.stats,
        )

    def _stream_done(self, stream: _H2Stream) -> None:
        if stream.finished:
            return
        stream.finished = True
        self.streams.pop(stream.stream_id, None)
        if self.conn.closed:
            return
        self.maybe_send_goaway()
        if (self.goaway_sent or self.remote_goaway) and not self.streams:
            self._schedule_close()
        elif not self.streams:
            self._arm_idle()

    def maybe_send_goaway(self) -> None:
        """Send the pending graceful GOAWAY once every stream up to its last id is done."""
        last = self.last_stream_id
        if last is None or self.goaway_sent:
            return
        if any(sid <= last for sid in self.streams):
            return
        self.send_goaway_frame(last, self.goaway_error_code)
        if not self.streams:
            self._schedule_close()

    def send_goaway_frame(self, last_stream_id: int, error_code: int) -> None:
        # Written by hand: h2's close_connection() would put its state machine in CLOSED and
        # forbid finishing the streams at or below last_stream_id.
        self.flush()
        frame = GoAwayFrame(0, last_stream_id=last_stream_id, error_code=error_code)
        if self.conn.write(frame.serialize()):
            self.conn.engine.stats._bump("_goaways_sent")
        self.goaway_sent = True

    def _schedule_close(self) -> None:
        if self._close_timer is None and not self.conn.closed:
            loop = asyncio.get_running_loop()
            self._close_timer = loop.call_later(GOAWAY_CLOSE_GRACE_S, self.conn.close)


class _H2Responder(Responder):
    http_version = "2"

    def __init__(self, session: _H2Session, stream: _H2Stream) -> None:
        super().__init__()
        self.session = session
        self.conn = session.conn
        self.h2 = session.h2
        self.stream = stream
        self.stream_id = stream.stream_id
        self._gone = stream.gone

    def _usable(self) -> bool:
        return not self._done and not self.stream.gone.is_set() and self.conn.writable

    async def _flush(self) -> None:
        self.session.flush()
        await self.conn.drain()

    async def start(self, status: int, headers: HeadersLike = ()) -> None:
        if self._started:
            raise RuntimeError("the response has already started")
        self._started = True
        if not self._usable():
            return
        pairs: list[tuple[bytes, bytes]] = [(b":status", str(status).encode())]
        for name, value in _pairs(headers):
            lower = name.lower()
            if lower not in _HOP_BY_HOP:
                pairs.append((lower.encode("latin-1"), value.encode("latin-1")))
        if not any(k == b"server" for k, _ in pairs):
            pairs.append((b"server", b"poolwatch-loopback"))
        try:
            self.h2.send_headers(self.stream_id, pairs)
        except h2.exceptions.ProtocolError:
            self.stream.gone.set()
            return
        self.conn.engine.stats._response_started(status)
        await self._flush()

    async def send(self, chunk: bytes) -> None:
        if not self._started:
            await self.start(200)
        view = memoryview(chunk)
        while view and self._usable():
            try:
                window = self.h2.local_flow_control_window(self.stream_id)
            except h2.exceptions.ProtocolError:
                self.stream.gone.set()
                return
            size = min(window, self.h2.max_outbound_frame_size, len(view))
            if size <= 0:
                await self.session.wait_window()
                continue
            try:
                self.h2.send_data(self.stream_id, bytes(view[:size]))
            except h2.exceptions.ProtocolError:
                self.stream.gone.set()
                return
            view = view[size:]
            await self._flush()

    async def end(self) -> None:
        if self._done:
            return
        if not self._started:
            await self.start(200, [("content-length", "0")])
        if not self._usable():
            self._done = True
            return
        self._done = True
        try:
            self.h2.end_stream(self.stream_id)
        except h2.exceptions.ProtocolError:
            self.stream.gone.set()
        await self._flush()

    async def abort(self, error_code: int = h2.errors.ErrorCodes.INTERNAL_ERROR) -> None:
        if not self._usable():
            self._done = True
            return
        self._done = True
        try:
            self.h2.reset_stream(self.stream_id, error_code=error_code)
        except h2.exceptions.ProtocolError:
            return
        self.conn.engine.stats._bump("_resets_sent")
        await self._flush()

    async def abort_connection(self) -> None:
        self._done = True
        if self.conn.writable:
            self.conn.engine.stats._bump("_resets_sent")
        self.conn.abort()

    async def close_connection(self) -> None:
        self._done = True
        self.session.close_now()

    async def goaway(
        self, error_code: int = 0, *, last_stream_id: int | None = None, graceful: bool = True
    ) -> None:
        session = self.session
        if session.goaway_sent:
            return
        last = self.h2.highest_inbound_stream_id if last_stream_id is None else last_stream_id
        session.last_stream_id = last
        session.goaway_error_code = error_code
        if graceful:
            session.maybe_send_goaway()
        else:
            session.send_goaway_frame(last, error_code)
        await self.conn.drain()

    async def send_raw(self, data: bytes) -> None:
        self.session.flush()
        self.conn.write(data)
        await self.conn.drain()

    async def _break(self) -> None:
        await self.abort(h2.errors.ErrorCodes.INTERNAL_ERROR)


def _split_target(target: str) -> tuple[str, dict[str, str]]:
    parts = urlsplit(target)
    path = parts.path or "/"
    return path, dict(parse_qsl(parts.query, keep_blank_values=True))


# --------------------------------------------------------------------------------------------
# The engine (lives on the server thread's loop) and the public server object
# --------------------------------------------------------------------------------------------


class _Engine:
    def __init__(
        self,
        routes: dict[str, Handler],
        stats: LoopbackStats,
        *,
        tls: ssl.SSLContext | None,
        http2: bool,
        h2_max_concurrent_streams: int,
        close_after: int | None,
        idle_timeout: float | None,
    ) -> None:
        self.routes = routes
        self.stats = stats
        self.tls = tls
        self.http2 = http2
        self.h2_max_concurrent_streams = h2_max_concurrent_streams
        self.close_after = close_after
        self.idle_timeout = idle_timeout
        self.connections: set[_Connection] = set()
        self.tasks: set[asyncio.Task[None]] = set()
        self.stopping = False
        self._next_id = 0

    async def serve(self, sock: socket.socket, stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        accept = asyncio.ensure_future(self._accept_loop(sock))
        try:
            await stop.wait()
        finally:
            self.stopping = True
            accept.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await accept
            sock.close()
            for conn in list(self.connections):
                conn.close()
            deadline = loop.time() + STOP_GRACE_S
            while self.connections and loop.time() < deadline:
                await asyncio.sleep(0.01)
            for conn in list(self.connections):
                conn.abort()
            for task in list(self.tasks):
                task.cancel()
            if self.tasks:
                await asyncio.gather(*self.tasks, return_exceptions=True)

    async def _accept_loop(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                client, _ = await loop.sock_accept(sock)
            except OSError as exc:  # e.g. EMFILE: back off instead of spinning
                logger.warning("loopback accept failed: %s", exc)
                await asyncio.sleep(0.05)
                continue
            # asyncio sets TCP_NODELAY only when sock.proto says TCP, and accepted sockets
            # report 0: without it every keep-alive response waits ~40 ms for a delayed ACK.
            with contextlib.suppress(OSError):
                client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.stats._bump("_accepted_connections")
            self.stats._bump("_open_connections")
            self._next_id += 1
            conn = _Connection(self, client, self._next_id)
            task = asyncio.ensure_future(self._attach(conn, client))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def _attach(self, conn: _Connection, client: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        try:
            if self.tls is not None:
                await loop.connect_accepted_socket(
                    lambda: conn, client, ssl=self.tls, ssl_handshake_timeout=10.0
                )
            else:
                await loop.connect_accepted_socket(lambda: conn, client)
        except asyncio.CancelledError:
            client.close()
            conn.release()
            raise
        except Exception as exc:
            logger.debug("loopback connection setup failed: %r", exc)
            if self.tls is not None:
                self.stats._bump("_tls_handshake_failures")
            client.close()
            conn.release()

    async def dispatch(self, request: LoopbackRequest, responder: Responder) -> None:
        handler = self.routes.get(request.path)
        self.stats._request_started(request.path)
        try:
            if handler is None:
                await responder.respond(
                    404, f"no route for {request.path}\n".encode(), [("content-type", "text/plain")]
                )
                return
            try:
                await handler(request, responder)
            except asyncio.CancelledError:
                if not self.stopping:
                    self.stats._bump("_client_disconnects")
                raise
            except Exception:
                if responder.disconnected and not responder.finished:
                    # the client left; whatever the handler tripped on does not matter
                    self.stats._bump("_client_disconnects")
                    return
                logger.exception("loopback handler for %s raised", request.path)
                await responder._fail()
                return
            if responder.finished:
                return
            if responder.disconnected:  # the handler noticed the client leave, and returned
                self.stats._bump("_client_disconnects")
                return
            await responder.end()
        finally:
            self.stats._request_finished()


class LoopbackServer:
    """An HTTP/1.1 + HTTP/2 server on 127.0.0.1 in a daemon thread, with exact counters.

    ``routes`` maps a path (no query string) to ``async def handler(request, response)``.
    With ``tls`` the server speaks TLS and ALPN decides the protocol ("h2" -> HTTP/2); without
    it, a client that opens with the HTTP/2 preface gets HTTP/2 (h2c prior knowledge) unless
    ``http2=False``. ``close_after=N`` closes each HTTP/1.1 connection after N responses (while
    advertising keep-alive) and sends GOAWAY on an HTTP/2 connection after N streams.
    ``idle_timeout`` closes connections idle that long (HTTP/2: GOAWAY first).
    """

    def __init__(
        self,
        routes: Mapping[str, Handler],
        *,
        tls: ssl.SSLContext | None = None,
        http2: bool = True,
        h2_max_concurrent_streams: int = 100,
        host: str = "127.0.0.1",
        port: int = 0,
        close_after: int | None = None,
        idle_timeout: float | None = None,
    ) -> None:
        if close_after is not None and close_after < 1:
            raise ValueError("close_after must be at least 1")
        if h2_max_concurrent_streams < 1:
            raise ValueError("h2_max_concurrent_streams must be at least 1")
        self.routes: dict[str, Handler] = dict(routes)
        self.stats = LoopbackStats()
        self.tls = tls
        self.http2 = http2
        self.host = host
        self._requested_port = port
        self._engine = _Engine(
            self.routes,
            self.stats,
            tls=tls,
            http2=http2,
            h2_max_concurrent_streams=h2_max_concurrent_streams,
            close_after=close_after,
            idle_timeout=idle_timeout,
        )
        self._sock: socket.socket | None = None
        self._port: int | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_event: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._stopped = False

    # -- lifecycle --------------------------------------------------------------------------

    def start(self) -> Self:
        """Bind, listen and start serving; returns once connections are being accepted."""
        if self._thread is not None:
            raise RuntimeError("LoopbackServer.start() was already called")
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.create_server((self.host, self._requested_port), family=family, backlog=512)
        sock.setblocking(False)
        self._sock = sock
        self._port = sock.getsockname()[1]
        self._thread = threading.Thread(
            target=self._thread_main, name=f"poolwatch-loopback:{self._port}", daemon=True
        )
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            self._thread.join()
            raise RuntimeError("the loopback server failed to start") from self._error
        return self

    def _thread_main(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._main())
        except BaseException as exc:
            self._error = exc
            logger.exception("the loopback server loop crashed")
        finally:
            self._ready.set()
            with contextlib.suppress(Exception):
                loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    async def _main(self) -> None:
        assert self._sock is not None
        self._stop_event = asyncio.Event()
        serving = asyncio.ensure_future(self._engine.serve(self._sock, self._stop_event))
        await asyncio.sleep(0)  # the accept loop is now waiting on the socket
        self._ready.set()
        await serving

    def stop(self, timeout: float = 10.0) -> None:
        """Close every connection and the listener, and join the thread. Idempotent."""
        if self._stopped or self._thread is None:
            self._stopped = True
            return
        self._stopped = True
        loop, stop_event = self._loop, self._stop_event
        if loop is not None and stop_event is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop already finished
                loop.call_soon_threadsafe(stop_event.set)
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise RuntimeError(f"the loopback server thread did not stop within {timeout} s")

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- addresses and helpers --------------------------------------------------------------

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("the server has not been started")
        return self._port

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT``, or ``https://localhost:PORT`` with TLS."""
        host = self.host
        if self.tls is not None and host in ("127.0.0.1", "::1"):
            host = "localhost"  # certificates name localhost; IP SANs are rarer
        elif ":" in host:
            host = f"[{host}]"
        scheme = "https" if self.tls is not None else "http"
        return f"{scheme}://{host}:{self.port}"

    def add_route(self, path: str, handler: Handler) -> None:
        """Add or replace a route; safe while serving."""
        self.routes[path] = handler

    def wait_for(self, predicate: Callable[[LoopbackStats], bool], timeout: float = 5.0) -> None:
        """Block until ``predicate(self.stats)`` holds; ``TimeoutError`` otherwise."""
        self.stats.wait_for(predicate, timeout)

    def __repr__(self) -> str:
        where = self.url if self._port is not None else "not started"
        return f"<LoopbackServer {where}>"
