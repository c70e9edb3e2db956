"""Ground truth poolwatch did not produce: httpcore's own pool state, read directly.

Tests compare poolwatch's figures against these and against the loopback server's counters.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class HttpcoreView:
    """What httpcore's own objects say about a client's default pool."""

    open: int  # connections not closed
    idle: int  # httpcore's is_idle()
    busy: int  # open, connected and not idle (HTTP/1.1 ACTIVE, HTTP/2 with streams)
    requests: int  # len(pool._requests): queued and in flight, by httpcore's books


def httpcore_view(client: Any) -> HttpcoreView:
    pool = client._transport._pool
    conns = [c for c in pool.connections if not c.is_closed()]
    idle = sum(1 for c in conns if c.is_idle())
    busy = sum(1 for c in conns if not c.is_idle() and c.info() != "CONNECTING")
    return HttpcoreView(open=len(conns), idle=idle, busy=busy, requests=len(pool._requests))


def wait_until(predicate: Callable[[], bool], timeout: float = 5.0, what: str = "") -> None:
    """Poll (blocking) until ``predicate()``; fail with ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or predicate}")
        time.sleep(0.005)


async def await_until(predicate: Callable[[], bool], timeout: float = 5.0, what: str = "") -> None:
    """Poll inside an event loop (asyncio or trio) until ``predicate()``."""
    import anyio

    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or predicate}")
        await anyio.sleep(0.005)
