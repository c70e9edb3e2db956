"""Soak: a million requests (configurable) with chaos mixed in, through one instrumented client,
against the loopback server in a separate process. Watches memory as it goes and ends with
poolwatch's books against the server's and against what the callers caught.

    python bench/soak.py                                   # 1,000,000 requests
    python bench/soak.py --requests 20000 --report-every 5000 --tracemalloc
    python bench/soak.py --client httpx2 --http2 --backend trio

Every ``--report-every`` requests it prints one line: throughput, the process's RSS,
tracemalloc's current and peak (with ``--tracemalloc``: it makes the run about three times
slower), and poolwatch's own bookkeeping sizes (connection records, requests in flight,
origins), which must stay flat however long it runs. 8 workers share a pool of 10
connections, 4 of which the leaks take, so requests also queue.

Chaos (``--chaos``, the share of requests that misbehave, default 5 %) is spread over: a TCP
reset mid-body, a connection dropped before the response, a truncated body, a stalled body
(read timeout), a server close after the response, a stream closed early, and a request
cancelled a few hundred microseconds in. ``--leaks`` responses are dropped unclosed along the
way (each keeps its connection forever, so keep it below ``--max-connections``).

The final table compares, at rest: poolwatch's connections created with the server's accepted
ones, its idle + active connections with the server's open ones, its errors by type with the
exceptions the callers caught, its PoolTimeouts and leaks with the callers', and that nothing
is left active or pending. Exit status 1 when a figure that must be exact is not.
A cancel that lands while the kernel completes a TCP connect can reach the server's accept()
without ever reaching the pool; those connects are counted from the callers' own ``trace``
extension and shown as the tolerance of the connection check.

The server runs in a child process (``--serve``), so its CPU and memory are not the client's.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import os
import random
import subprocess
import sys
import time
import tracemalloc
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import anyio

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import poolwatch

#: Chaos kinds and their relative weights within the chaos share.
CHAOS = {
    "reset": 3,
    "drop": 3,
    "short": 3,
    "stall": 1,
    "close": 3,
    "stream_early": 3,
    "cancel": 4,
}


# -- the server process --------------------------------------------------------------------


def serve() -> None:
    """Child process: a loopback server; prints its port, answers ``stats`` lines on stdin."""
    import socket  # noqa: PLC0415

    from poolwatch._loopback import LoopbackServer, _server, default_routes  # noqa: PLC0415

    # asyncio sets TCP_NODELAY only on sockets whose proto is IPPROTO_TCP, and accepted ones
    # say 0: without it every response written in several pieces (head, body, end) waits
    # ~40 ms for the client's delayed ACK on a kept-alive connection. Set it on each accept.
    attach = _server._Engine._attach

    async def attach_nodelay(self: Any, conn: Any, client: socket.socket) -> None:
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        await attach(self, conn, client)

    _server._Engine._attach = attach_nodelay  # type: ignore[method-assign]
    server = LoopbackServer(default_routes()).start()
    print(server.port, flush=True)
    for line in sys.stdin:
        if line.strip() == "stats":
            print(json.dumps(server.stats.snapshot()), flush=True)
    server.stop()


class ServerProcess:
    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--serve"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        self.port = int(self.proc.stdout.readline())
        self.url = f"http://127.0.0.1:{self.port}"

    def stats(self) -> dict[str, Any]:
        assert self.proc.stdin is not None
        assert self.proc.stdout is not None
        self.proc.stdin.write("stats\n")
        self.proc.stdin.flush()
        result: dict[str, Any] = json.loads(self.proc.stdout.readline())
        return result

    def stop(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


# -- the client ----------------------------------------------------------------------------


@dataclass
class Book:
    """What the callers saw."""

    done: int = 0
    ok: int = 0
    caught: Counter[str] = field(default_factory=Counter)
    cancelled: int = 0
    leaked: int = 0
    connects_cancelled: int = 0
    kinds: Counter[str] = field(default_factory=Counter)

    async def trace(self, name: str, info: dict[str, Any]) -> None:
        if name.endswith("connect_tcp.failed") and _is_cancel(info.get("exception")):
            self.connects_cancelled += 1


def _is_cancel(exc: BaseException | None) -> bool:
    if isinstance(exc, BaseExceptionGroup):
        return all(_is_cancel(e) for e in exc.exceptions)
    return isinstance(exc, anyio.get_cancelled_exc_class())


def rss_mib() -> float:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource  # noqa: PLC0415

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def plan(args: argparse.Namespace) -> list[str]:
    """The kind of each request, reproducible from ``--seed``."""
    rng = random.Random(args.seed)
    kinds = list(CHAOS)
    weights = list(CHAOS.values())
    out = [
        rng.choices(kinds, weights)[0] if rng.random() < args.chaos else "ok"
        for _ in range(args.requests)
    ]
    for i in range(args.leaks):  # spread the leaks over the run
        out[(i + 1) * args.requests // (args.leaks + 1)] = "leak"
    return out


async def one(client: Any, hx: Any, base: str, kind: str, book: Book) -> None:
    ext = {"trace": book.trace}
    deadline = 0.0003 if kind == "cancel" else float("inf")
    try:
        with anyio.move_on_after(deadline) as scope:
            try:
                if kind in ("ok", "cancel"):
                    await client.get(f"{base}/ok", extensions=ext)
                elif kind == "stall":
                    timeout = hx.Timeout(5.0, read=0.05, pool=client.timeout.pool)
                    await client.get(f"{base}/stall", timeout=timeout, extensions=ext)
                elif kind == "stream_early":
                    url = f"{base}/stream?chunks=8&size=4096"
                    async with client.stream("GET", url, extensions=ext) as r:
                        async for _ in r.aiter_raw():
                            break
                elif kind == "leak":
                    request = client.build_request("GET", f"{base}/ok", extensions=ext)
                    response = await client.send(request, stream=True)
                    book.leaked += 1
                    del response
                else:
                    await client.get(f"{base}/{kind}", extensions=ext)
                book.ok += 1
            except Exception as exc:
                book.caught[type(exc).__name__] += 1
        if scope.cancelled_caught:
            book.cancelled += 1
    finally:
        book.done += 1
        book.kinds[kind] += 1


def report_header() -> None:
    print(
        f"{'requests':>10} {'s':>7} {'req/s':>7} {'RSS MiB':>8} {'tm cur':>7} {'tm peak':>7}"
        f" {'conn rec':>8} {'inflight':>8} {'origins':>7} {'active':>6} {'idle':>5}",
        flush=True,
    )


def report(book: Book, t0: float, client: Any) -> None:
    elapsed = time.perf_counter() - t0
    current, peak = tracemalloc.get_traced_memory() if tracemalloc.is_tracing() else (0, 0)
    watch = poolwatch._api._lookup(client)
    core = watch.core if watch is not None else None
    snap = poolwatch.snapshot(client)
    print(
        f"{book.done:>10} {elapsed:>7.1f} {book.done / elapsed:>7.0f} {rss_mib():>8.1f}"
        f" {current / 2**20:>7.2f} {peak / 2**20:>7.2f}"
        f" {len(core.conns) if core else -1:>8} {len(core._inflight) if core else -1:>8}"
        f" {len(snap.origins):>7} {snap.active_connections:>6} {snap.idle_connections:>5}",
        flush=True,
    )


async def soak(args: argparse.Namespace, server: ServerProcess) -> int:
    hx = importlib.import_module(args.client)
    kinds = plan(args)
    book = Book()
    options: dict[str, Any] = {"http1": False, "http2": True} if args.http2 else {}
    limits = hx.Limits(max_connections=args.max_connections)
    timeout = hx.Timeout(5.0, pool=args.pool_timeout)
    async with hx.AsyncClient(limits=limits, timeout=timeout, **options) as client:
        poolwatch.instrument(client, name="soak", saturation_threshold=None)
        queue = iter(kinds)
        t0 = time.perf_counter()
        report_header()

        async def worker() -> None:
            for kind in queue:
                await one(client, hx, server.url, kind, book)
                if book.done % args.report_every == 0:
                    report(book, t0, client)

        async with anyio.create_task_group() as tg:
            for _ in range(args.concurrency):
                tg.start_soon(worker)
        elapsed = time.perf_counter() - t0
        gc.collect()
        # Let the server's count of open connections catch up with the last closes.
        deadline = time.monotonic() + 3.0
        while time.monotonic() < deadline:
            snap = poolwatch.snapshot(client)
            stats = server.stats()
            if stats["open_connections"] == snap.idle_connections + snap.active_connections:
                break
            await anyio.sleep(0.05)
        snap = poolwatch.snapshot(client)
        stats = server.stats()
        print(f"\n{args.requests} requests in {elapsed:.1f} s ({args.requests / elapsed:.0f}/s)")
        print("kinds:", dict(sorted(book.kinds.items())))
        return final_table(snap, stats, book)


def final_table(snap: poolwatch.PoolSnapshot, stats: dict[str, Any], book: Book) -> int:
    errors = Counter(snap.errors or {})
    cancelled = errors.pop("cancelled", 0)
    created, accepted = snap.connections_created_total, stats["accepted_connections"]
    rows: list[tuple[str, object, object, bool | None]] = [
        ("active requests (at rest)", snap.active_requests, 0, snap.active_requests == 0),
        ("pending requests (at rest)", snap.pending_requests, 0, snap.pending_requests == 0),
        (
            "connections created / server accepted",
            created,
            f"{accepted} (connects cancelled: {book.connects_cancelled})",
            created <= accepted <= created + book.connects_cancelled,
        ),
        (
            "idle + active / server open",
            snap.idle_connections + snap.active_connections,
            stats["open_connections"],
            snap.idle_connections + snap.active_connections == stats["open_connections"],
        ),
        ("active connections / leaked", snap.active_connections, book.leaked, None),
        (
            "leaked responses",
            snap.leaked_responses_total,
            book.leaked,
            snap.leaked_responses_total == book.leaked,
        ),
        (
            "PoolTimeouts / caught",
            snap.pool_timeouts_total,
            book.caught["PoolTimeout"],
            snap.pool_timeouts_total == book.caught["PoolTimeout"],
        ),
        ("errors by type / caught", dict(errors), dict(book.caught), errors == book.caught),
        ("cancelled / callers' cancels", cancelled, book.cancelled, cancelled <= book.cancelled),
        ("requests obtaining a connection / server", snap.requests_total, stats["requests"], None),
        ("reuse ratio", f"{snap.reuse_ratio or 0:.3f}", "", None),
    ]
    width = max(len(r[0]) for r in rows)
    print(f"\n{'figure':<{width}}  {'poolwatch':>24}  {'ground truth':>28}  check")
    bad = 0
    for name, ours, truth, ok in rows:
        mark = "" if ok is None else ("ok" if ok else "MISMATCH")
        bad += ok is False
        print(f"{name:<{width}}  {ours!s:>24}  {truth!s:>28}  {mark}")
    return 1 if bad else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--requests", type=int, default=1_000_000)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-connections", type=int, default=10)
    parser.add_argument("--pool-timeout", type=float, default=0.5)
    parser.add_argument("--chaos", type=float, default=0.05, help="share of misbehaving calls")
    parser.add_argument("--leaks", type=int, default=4, help="responses dropped unclosed")
    parser.add_argument("--client", choices=["httpx", "httpx2"], default="httpx")
    parser.add_argument("--http2", action="store_true", help="HTTP/2 (h2c, prior knowledge)")
    parser.add_argument("--backend", choices=["asyncio", "trio"], default="asyncio")
    parser.add_argument("--report-every", type=int, default=50_000)
    parser.add_argument(
        "--tracemalloc", action="store_true", help="also trace Python allocations (~3x slower)"
    )
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    if args.serve:
        serve()
        return 0
    if args.leaks >= args.max_connections and not args.http2:
        parser.error("--leaks must stay below --max-connections (a leak holds a connection)")
    if args.tracemalloc:
        tracemalloc.start()
    server = ServerProcess()
    try:
        return anyio.run(soak, args, server, backend=args.backend)
    finally:
        server.stop()


if __name__ == "__main__":
    sys.exit(main())
