"""Misbehaviour the default loopback routes do not cover, for the chaos and fault tests.

Routes, built only on the loopback ``Responder`` API:

- ``/stall_headers``: never sends a response head; waits until the client leaves.
  ``ReadTimeout`` before the headers, where ``/stall`` stalls after them.
- ``/goaway_refusing?streams=N``: HTTP/2 only. Waits until N requests run on the server,
  answers, waits for the answer to be read, then sends a GOAWAY whose last stream id is its
  own stream, at once (not gracefully). Every stream opened after it on that connection is
  refused: httpcore retries those on a new connection (``ConnectionNotAvailable`` inside
  the pool), so their callers see no error at all.

What the loopback server cannot do, and what stands in for it here:

- A TLS handshake that stalls: the server's TLS is asyncio's, which answers the ClientHello
  at once. ``SilentListener`` accepts TCP connections (and counts them) but never says a
  word, so the client's handshake runs into its connect timeout (``ConnectTimeout``).
- A refused connection: nothing to serve, so ``closed_port()`` returns a loopback port that
  was bound and released, where nothing listens (``ConnectError``).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from types import TracebackType
from typing import Self

from poolwatch._loopback import Handler, LoopbackRequest, Responder, default_routes

#: How long a stalled route waits for its client before giving up on it.
STALL_CAP_S = 30.0


async def stall_headers(request: LoopbackRequest, response: Responder) -> None:
    """No response head, ever; return when the client goes away."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(response.wait_disconnected(), STALL_CAP_S)


async def goaway_refusing(request: LoopbackRequest, response: Responder) -> None:
    """HTTP/2: refuse every later stream of this connection with an immediate GOAWAY."""
    wanted = int(request.query.get("streams", "1"))
    deadline = time.monotonic() + 5.0
    while request.stats.in_flight_requests < wanted and time.monotonic() < deadline:
        await asyncio.sleep(0.005)
    # The answer first, and time to read it: httpcore fails a stream whose response is still
    # unread when a GOAWAY arrives, even one the GOAWAY says was processed.
    await response.respond_json({"ok": True, "then": "goaway", "last_stream_id": request.stream_id})
    await asyncio.sleep(0.05)
    await response.goaway(last_stream_id=request.stream_id, graceful=False)


def chaos_routes() -> dict[str, Handler]:
    """The default routes plus the ones above."""
    routes = default_routes()
    routes["/stall_headers"] = stall_headers
    routes["/goaway_refusing"] = goaway_refusing
    return routes


def closed_port() -> int:
    """A loopback TCP port nothing listens on (bound, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


class SilentListener:
    """A TCP listener on 127.0.0.1 that accepts connections and never sends a byte.

    ``accepted`` counts the connections it accepted: ground truth for "connections the client
    opened". Connections are held until the client closes them or the listener stops.
    """

    def __init__(self) -> None:
        self._sock = socket.create_server(("127.0.0.1", 0), backlog=64)
        self._sock.settimeout(0.05)
        self.port: int = self._sock.getsockname()[1]
        self._lock = threading.Lock()
        self._accepted = 0
        self._held: list[socket.socket] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="silent-listener", daemon=True)

    @property
    def accepted(self) -> int:
        with self._lock:
            return self._accepted

    @property
    def url(self) -> str:
        return f"https://localhost:{self.port}"

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                self._accepted += 1
                self._held.append(conn)

    def start(self) -> Self:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5.0)
        self._sock.close()
        with self._lock:
            for conn in self._held:
                conn.close()
            self._held.clear()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
