"""poolwatch's CPU cost per request, paired within one process: the sharpest figure here.

    python bench/paired.py                      # poolwatch-prom, httpx2 and httpx, C=1 and 32
    python bench/paired.py --families httpx2 --concurrency 1 \
        --variants poolwatch-prom,trace-floor,poolwatch-prom-otel,otel-httpx

``run.py`` gives each run a fresh process, as the overhead target asks, and pairs runs within
a round; but on this VM two processes of the very same client differ by up to 10 % in CPU per
request (memory layout, hash seeds, the hour), three times the 3 % being judged. Here a bare
client and an instrumented one live in one process, both warmed up past httpcore's keep-alive
expiry, and take turns: blocks of ``--block`` requests, A B then B A, each block timed with
``time.process_time()``. Each pair of neighbouring blocks gives one ratio, seconds apart, so a
drift of the machine cancels out. The process is pinned to one core and the server to another
when the machine has two. After the pairs, the instrumented client passes ``client.py``'s
sanity checks (poolwatch counted every request, every span was exported by the right
instrumentation), or the run fails.

``trace-floor`` is the perf baseline's variant c, which it names the floor of a design built on
httpcore's trace extension (~30 µs, 3 % there): a transport that gives each request a trace
callback noting every event's time and a few counts. Measured here the same way as poolwatch,
it says what "3 %" costs in this harness. ``hooks-skeleton``, ``hooks-entry``,
``hooks-connections``, ``hooks-attributes`` and ``hooks-current`` (poolwatch's hooking as it was
from 614634f: pool entry, connection call and close, HTTP/1.1 release) give a bare client parts of
poolwatch's hooking with no bookkeeping (``_Skeleton``): what the hooks cost by themselves.
``hooks-two-names`` is that hooking as of 4cc1310 (the release a plain call), ``hooks-now`` as
of cf17475 (the connections' close learnt from the pool's ``_close_connections``: one attribute
name on the connection class instead of two, which matters here because the bare client's
warm-up makes the process's first connections: past ~28 of them CPython 3.11 lets only one
more name into the class's layout, and a connection given two gets a dictionary).
``hooks-ledger`` adds the least bookkeeping poolwatch's figures could be made from (a note of
each request's times, handed to the scrape on release; nothing counted on the request path).
``--no-gc`` and ``--no-sampler`` take the garbage collector and poolwatch's saturation sampler
out.

What it cannot tell: anything a second process adds (a fresh interpreter's first requests),
and httpx at C=32, where httpcore 1.0.9's retry loop makes each block's pool different
(``attempts.py``): two clients taking turns there read 0.45 to 2.4 between the quartiles, so
that cell gets no verdict.

One child process per (client, concurrency, variant): poolwatch's exporters are process-wide,
so two instrumented variants cannot share a process.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import importlib
import json
import logging
import os
import statistics
import subprocess
import sys
import time
import weakref
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from client import Driver, Setup, parse_variant  # noqa: E402  (also puts the working tree's poolwatch first)
from run import TARGET_OTEL_SHARE, TARGET_PROM_RATIO, Server, pinning  # noqa: E402


class _PoolStats:
    __slots__ = ("active", "closed", "done", "duration", "new", "peak")

    def __init__(self) -> None:
        self.active = self.closed = self.done = self.new = self.peak = 0
        self.duration = 0.0


class _RequestTrace:
    """The perf baseline's variant c, the floor it names for a trace-callback design: a trace
    extension per request whose callback notes each event's time and keeps in-flight, peak,
    done, duration and new-connection counts."""

    __slots__ = ("events", "stats")

    def __init__(self, stats: _PoolStats) -> None:
        self.events: list[tuple[str, int]] = []
        self.stats = stats

    async def __call__(self, name: str, info: dict[str, Any]) -> None:
        del info
        now = time.perf_counter_ns()
        self.events.append((name, now))
        stats = self.stats
        if name.endswith("send_request_headers.started"):
            stats.active += 1
            stats.peak = max(stats.peak, stats.active)
        elif name.endswith("response_closed.complete"):
            stats.active -= 1
            stats.done += 1
            stats.duration += (now - self.events[0][1]) / 1e9
        elif name.endswith("connect_tcp.complete"):
            stats.new += 1


class _TraceFloor:
    """A bare client behind a transport that gives each request a ``_RequestTrace``."""

    def __init__(self, family: str, concurrency: int) -> None:
        hx = importlib.import_module(family)
        limits = hx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        inner = hx.AsyncHTTPTransport(limits=limits)
        stats = self.stats = _PoolStats()

        class TraceTransport(hx.AsyncBaseTransport):  # type: ignore[misc, name-defined]
            async def handle_async_request(self, request: Any) -> Any:
                request.extensions = {**request.extensions, "trace": _RequestTrace(stats)}
                return await inner.handle_async_request(request)

            async def aclose(self) -> None:
                await inner.aclose()

        self.client = hx.AsyncClient(transport=TraceTransport())


class _Skeleton:
    """A bare client given parts of poolwatch's hooking, with no bookkeeping at all: what the
    hooks cost by themselves. ``parts``: ``entry`` (a coroutine wrapper on the pool's request
    call that tags the request for the connection's call, as poolwatch's pool entry),
    ``connections`` (a coroutine wrapper per connection for its request call and its close,
    set as instance attributes, as poolwatch's), ``streams`` (a close wrapper per response
    holding a weak reference to the stream), ``release`` (a coroutine wrapper on each HTTP/1.1
    connection's ``_response_closed``, set once per connection as an instance attribute: how
    poolwatch ends a request since 614634f; ``plain-release`` makes it a plain call that
    returns httpcore's own coroutine, as since 4cc1310), ``pool-close`` (the connections'
    close is not wrapped; the pool's ``_close_connections`` is, a plain call that returns
    httpcore's own: one attribute name on the connection class, as poolwatch since cf17475),
    ``attributes`` (only two instance attributes per connection, holding its own bound
    methods: no wrapper at all). Set after the warm-up, on the connections the pool has then
    and on those it makes later."""

    def __init__(self, family: str, concurrency: int, parts: set[str]) -> None:
        self._bare = Setup("bare", family, concurrency)
        self.client = self._bare.client
        self.parts = parts
        self.stats = _PoolStats()  # requests through the pool entry, when it is hooked
        #: ``ledger``: the notes of requests in flight, and of those over (a scrape's to read).
        self.inflight: dict[int, _Note] = {}
        self.finished: list[_Note] = []

    def hook(self) -> None:
        pool, parts, stats = self._bare.pool, self.parts, self.stats
        pool_cls = type(pool)
        if "entry" in parts:
            ledger = "ledger" in parts
            inflight = self.inflight
            clock = time.perf_counter

            async def entry(request: Any) -> Any:
                note = None
                if ledger:
                    note = _Note(clock())
                    inflight[id(note)] = note
                request._paired_note = note  # the connection's call reads it, as poolwatch's
                try:
                    return await pool_cls.handle_async_request(pool, request)
                except BaseException:
                    if note is not None:
                        inflight.pop(id(note), None)
                    raise
                finally:
                    stats.done += 1

            pool.handle_async_request = entry
        for conn in pool.connections:
            self._hook_connection(conn)
        create = pool.create_connection

        def create_connection(origin: Any) -> Any:
            conn = create(origin)
            self._hook_connection(conn)
            return conn

        pool.create_connection = create_connection
        if "pool-close" in parts:
            close_cls = pool_cls

            def close_connections(closing: list[Any]) -> Any:
                if closing:
                    stats.closed += len(closing)
                return close_cls._close_connections(pool, closing)

            pool._close_connections = close_connections

    def _hook_connection(self, conn: Any) -> None:
        parts = self.parts
        cls = type(conn)
        if "attributes" in parts:
            conn.handle_async_request = conn.handle_async_request
            conn.aclose = conn.aclose
        if "connections" not in parts:
            return
        hooked: list[Any] = [None]  # the HTTP/1.1 connection whose release is hooked
        ledger = "ledger" in parts
        clock = time.perf_counter
        current: list[Any] = [None]  # the note of the request the connection serves
        finished, inflight = self.finished, self.inflight

        async def handle_async_request(request: Any) -> Any:
            note = getattr(request, "_paired_note", None)
            if ledger:
                note.acquired = clock()
                note.conn = conn
            response = await cls.handle_async_request(conn, request)
            if ledger:
                note.headers = clock()
                note.status = response.status
                current[0] = note
            if "streams" in parts:
                response.stream.aclose = _SkeletonClose(response.stream)
            if "release" in parts:
                inner = getattr(conn, "_connection", None)
                if inner is not None and inner is not hooked[0]:  # once per connection
                    hooked[0] = inner
                    inner._response_closed = (
                        _LedgerRelease(inner, current, finished, inflight)
                        if ledger
                        else _PlainRelease(inner)
                        if "plain-release" in parts
                        else _SkeletonRelease(inner)
                    )
            return response

        async def aclose() -> None:
            await cls.aclose(conn)

        conn.handle_async_request = handle_async_request
        if "pool-close" not in parts:  # else the pool's close call says it (see hook())
            conn.aclose = aclose


class _SkeletonClose:
    __slots__ = ("ref",)

    def __init__(self, stream: Any) -> None:
        self.ref = weakref.ref(stream, _ignore)

    async def __call__(self) -> None:
        stream = self.ref()
        try:
            if stream is not None:
                await type(stream).aclose(stream)
        finally:
            if stream is not None and getattr(stream, "aclose", None) is self:
                delattr(stream, "aclose")


class _SkeletonRelease:
    """An HTTP/1.1 connection's ``_response_closed``, wrapped: as poolwatch's ``_Release``."""

    __slots__ = ("inner",)

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    async def __call__(self) -> None:
        inner = self.inner
        await type(inner)._response_closed(inner)


class _PlainRelease:
    """``plain-release``: the release handed on as httpcore's own coroutine (a plain call that
    returns it), as poolwatch's since 4cc1310."""

    __slots__ = ("inner",)

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def __call__(self) -> Any:
        inner = self.inner
        return type(inner)._response_closed(inner)


class _Note:
    """``ledger``: a request's times, and nothing done with them on the request path."""

    __slots__ = ("acquired", "conn", "end", "headers", "start", "status")

    def __init__(self, start: float) -> None:
        self.start = start
        self.acquired = self.headers = self.end = 0.0
        self.conn: Any = None
        self.status = 0


class _LedgerRelease:
    """``ledger``'s release hook: the request's end noted, its note handed to the scrape."""

    __slots__ = ("current", "finished", "inflight", "inner")

    def __init__(
        self, inner: Any, current: list[Any], finished: list[_Note], inflight: dict[int, _Note]
    ) -> None:
        self.inner = inner
        self.current = current
        self.finished = finished
        self.inflight = inflight

    async def __call__(self) -> None:
        current = self.current
        note = current[0]
        current[0] = None
        inner = self.inner
        await type(inner)._response_closed(inner)
        if note is not None:
            note.end = time.perf_counter()
            del self.inflight[id(note)]
            self.finished.append(note)


def _ignore(ref: Any) -> None:
    del ref


#: ``--variants`` names of ``_Skeleton``, and the parts each one hooks.
SKELETONS = {
    "hooks-skeleton": {"entry", "connections", "streams"},
    "hooks-current": {"entry", "connections", "release"},
    "hooks-two-names": {"entry", "connections", "release", "plain-release"},
    "hooks-now": {"entry", "connections", "release", "plain-release", "pool-close"},
    "hooks-ledger": {"entry", "connections", "release", "ledger"},
    "hooks-entry": {"entry"},
    "hooks-connections": {"connections"},
    "hooks-attributes": {"attributes"},
}


def _quartiles(values: list[float]) -> tuple[float, float, float]:
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[0], statistics.median(values), q[2]


async def _pairs(args: argparse.Namespace) -> dict[str, Any]:
    logging.getLogger("poolwatch").setLevel(logging.ERROR)  # saturation warnings, expected
    bare = Setup("bare", args.family, args.concurrency)
    if args.variant == "trace-floor":
        other: Any = _TraceFloor(args.family, args.concurrency)
    elif args.variant in SKELETONS:
        other = _Skeleton(args.family, args.concurrency, SKELETONS[args.variant])
    else:
        threshold = None if args.no_sampler else 0.8
        if args.variant.startswith("poolwatch") and "otel" in args.variant:
            import poolwatch.otel  # noqa: PLC0415 (the tree client.py put on the path)

            # Its recorder thread would record during bare blocks too: settle() does it
            # at the end of each of the variant's own blocks instead.
            poolwatch.otel._RECORD_INTERVAL = 3600.0
        other = Setup(args.variant, args.family, args.concurrency, saturation_threshold=threshold)
    drivers = {
        "bare": Driver(bare.client, args.url, args.concurrency),
        "other": Driver(other.client, args.url, args.concurrency),
    }
    warm = 6.0 if args.concurrency > 1 else 0.0
    for driver in drivers.values():
        await driver.warm_up(1000, warm)
    counted_from = 0  # requests sent before the variant's counts began
    if isinstance(other, _Skeleton):
        counted_from = drivers["other"].sent
        other.hook()
        await drivers["other"].warm_up(200, 0.0)
    if args.no_gc:
        gc.collect()
        gc.disable()
    per_request: dict[str, list[float]] = {"bare": [], "other": []}
    ratios: list[float] = []
    for i in range(args.pairs):
        order = ("bare", "other") if i % 2 == 0 else ("other", "bare")
        block: dict[str, float] = {}
        for name in order:
            cpu = time.process_time()
            await drivers[name].timed(args.block)
            if name == "other" and isinstance(other, Setup):
                other.settle()  # its background work, in its own block
            elif name == "other" and isinstance(other, _Skeleton):
                other.finished.clear()  # what a scrape would take, in its own block
            block[name] = (time.process_time() - cpu) / args.block * 1e6
            per_request[name].append(block[name])
        ratios.append(block["other"] / block["bare"])
    errors = {name: dict(d.error_types) for name, d in drivers.items() if d.errors}
    # The variant did what it says: the run's own sanity checks (poolwatch counted every
    # request, every span was exported by the right instrumentation...).
    if isinstance(other, Setup):
        sent = drivers["other"].sent
        problems = other.sanity(other.export(), sent, drivers["other"].errors)["problems"]
    elif isinstance(other, _Skeleton) and "entry" not in other.parts:
        problems = []  # nothing counted: errors above are the check
    else:
        counted = drivers["other"].sent - counted_from
        problems = [] if other.stats.done == counted else [f"{other.stats.done} of {counted}"]
        if other.inflight:
            problems.append(f"{len(other.inflight)} notes left in flight")
    await bare.client.aclose()
    await other.client.aclose()
    return {
        "family": args.family,
        "concurrency": args.concurrency,
        "variant": args.variant,
        "block": args.block,
        "pairs": args.pairs,
        "bare_us": statistics.median(per_request["bare"]),
        "other_us": statistics.median(per_request["other"]),
        "overheads_us": [
            o - b for o, b in zip(per_request["other"], per_request["bare"], strict=True)
        ],
        "ratios": ratios,
        "errors": errors,
        "problems": problems,
    }


def _child(args: argparse.Namespace) -> None:
    print(json.dumps(asyncio.run(_pairs(args))), flush=True)


def _row(r: dict[str, Any]) -> str:
    q1, ratio, q3 = _quartiles(r["ratios"])
    o1, overhead, o3 = _quartiles(r["overheads_us"])
    chaotic = r["family"] == "httpx" and r["concurrency"] > 1
    if r["variant"] != "poolwatch-prom":
        verdict = "(not this target's)"
    elif chaotic:
        verdict = "no verdict (see the docstring)"
    else:
        verdict = "met" if ratio <= TARGET_PROM_RATIO else "**not met**"
    return (
        f"| {r['family']} | {r['concurrency']} | {r['variant']} | {r['bare_us']:.0f} "
        f"| {r['other_us']:.0f} | {overhead:+.0f} [{o1:+.0f}..{o3:+.0f}] "
        f"| {ratio:.3f} [{q1:.3f}..{q3:.3f}] | {r['pairs']} x {r['block']} | {verdict} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", default="httpx2,httpx")
    parser.add_argument("--concurrency", default="1,32", help="comma-separated")
    parser.add_argument(
        "--variants",
        default="poolwatch-prom",
        help="comma-separated, each against bare: run.py's names without -httpx2, trace-floor "
        "(the perf baseline's trace-callback floor) or " + ", ".join(SKELETONS) + " (parts of "
        "poolwatch's hooking, no bookkeeping); with poolwatch-prom-otel and otel-httpx both, "
        "the OTel target's quotient too",
    )
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--pairs", type=int, default=24, help="pairs of blocks per cell")
    parser.add_argument("--block", type=int, default=1000, help="requests per block")
    parser.add_argument(
        "--no-gc", action="store_true", help="the garbage collector off while timing"
    )
    parser.add_argument(
        "--no-sampler", action="store_true", help="poolwatch's saturation sampler off"
    )
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--family", help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        args.concurrency = int(args.concurrency)
        _child(args)
        return

    pins = pinning(True)
    server = Server(None if pins is None else pins[0])
    client_cores = None if pins is None else pins[1]
    results = []
    try:
        for family, c, base in (
            (f, c, v)
            for f in args.families.split(",")
            for c in args.concurrency.split(",")
            for v in args.variants.split(",")
        ):
            if base != "trace-floor" and base not in SKELETONS:
                parse_variant(base)  # known, or exit
            cmd = [
                sys.executable,
                __file__,
                "--child",
                "--family",
                family,
                "--concurrency",
                c,
                "--variant",
                base,
                "--pairs",
                str(args.pairs),
                "--block",
                str(args.block),
                "--url",
                server.url,
                *(["--no-gc"] if args.no_gc else []),
                *(["--no-sampler"] if args.no_sampler else []),
            ]
            with subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True) as proc:
                if client_cores is not None:
                    os.sched_setaffinity(proc.pid, client_cores)
                out, _ = proc.communicate()
            if proc.returncode != 0:
                raise SystemExit(f"{family} C={c}: the child failed ({proc.returncode})")
            result = json.loads(out.strip().splitlines()[-1])
            if result["errors"] or result["problems"]:
                raise SystemExit(f"{family} C={c} {base}: {result['errors']} {result['problems']}")
            results.append(result)
            print(_row(result), file=sys.stderr, flush=True)
    finally:
        server.stop()
    print(
        "| client | C | variant | bare µs/req | instrumented µs/req | overhead µs/req "
        "[quartiles] | CPU ratio [quartiles] | pairs x block "
        f"| poolwatch-prom ≤ {TARGET_PROM_RATIO} |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(_row(r))
    quotients = _quotients(results)
    if quotients:
        print(
            "\n| client | C | poolwatch-prom-otel overhead / otel-httpx overhead "
            f"(medians of the paired overheads) | ≤ {TARGET_OTEL_SHARE} |"
        )
        print("|---|---|---|---|")
        for family, c, q in quotients:
            verdict = "met" if q <= TARGET_OTEL_SHARE else "**not met**"
            print(f"| {family} | {c} | {q:.2f} | {verdict} |")


def _quotients(results: list[dict[str, Any]]) -> list[tuple[str, int, float]]:
    """The OTel target's measure per cell, where both variants ran."""
    by_cell: dict[tuple[str, int], dict[str, float]] = {}
    for r in results:
        cell = by_cell.setdefault((r["family"], r["concurrency"]), {})
        cell[r["variant"]] = statistics.median(r["overheads_us"])
    return [
        (family, c, v["poolwatch-prom-otel"] / v["otel-httpx"])
        for (family, c), v in by_cell.items()
        if "poolwatch-prom-otel" in v and v.get("otel-httpx", 0) > 0
    ]


if __name__ == "__main__":
    main()
