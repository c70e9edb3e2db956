"""``poolwatch demo``: a pool that is too small, driven hard, watched live, then explained.

An embedded fake LLM API (``poolwatch._loopback``) answers chat completions on 127.0.0.1, streamed
and not, with a realistic time to first token and per-token delay. ``concurrency`` tasks call it
through one instrumented ``httpx.AsyncClient`` whose pool holds fewer connections than there are
tasks, with a pool timeout short enough that some of them give up. A couple of times during the
run a task opens a streamed response and drops it without closing it: the classic leak, which
keeps its connection (HTTP/2: its stream slot) forever.

The figures in the report come from ``poolwatch.snapshot()``; the loopback server's own counters
(accepted connections, requests received) are printed beside them as ground truth.

``requests`` in the report is poolwatch's ``requests_total``: requests that obtained a connection
and were sent. After a run that ends normally (the driver stops starting requests and lets those
in flight finish) it equals the number of requests the server received. Requests that gave up
with ``PoolTimeout`` never reached the server and are not in it; ``completed`` counts the
responses the driver read to the end (leaked ones excluded).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import importlib
import json
import logging
import random
import signal
import textwrap
import threading
import time
from collections import Counter, deque
from dataclasses import asdict, dataclass, field
from types import ModuleType
from typing import Any

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

import poolwatch
import poolwatch.prometheus

from ._histogram import HistogramSnapshot
from ._loopback import LoopbackServer, llm_routes
from ._snapshot import PoolSnapshot

__all__ = ["DemoError", "DemoOptions", "DemoReport", "run_demo"]

POOL_NAME = "demo-llm"
#: The fake model: time to first token, delay per token after it, jitter on both.
TTFT_S = 0.15
TOKEN_DELAY_S = 0.015
JITTER = 0.4
#: Most completions are short; a few are long and hold their connection for seconds.
SHORT_TOKENS = (8, 40)
LONG_TOKENS = 120
LONG_SHARE = 0.08
#: Partway through, a batch job sends ``max_connections`` long completions at once: they hold
#: every connection for a couple of seconds, and the requests queued behind them time out.
BATCH_AT = 0.4
BATCH_TOKENS = 150
STREAM_SHARE = 0.6
#: Pause between a task's calls (seconds, uniform), and after a PoolTimeout (a retry's backoff).
THINK_S = (0.1, 0.7)
BACKOFF_S = (0.2, 0.6)
#: How often the pool is sampled (peak utilization) and the live view redrawn.
SAMPLE_S = 0.1
REFRESH_S = 0.25
#: Without a terminal, a plain progress line on stderr this often.
PLAIN_PROGRESS_S = 5.0
#: The leaking request waits this long for a connection (the others: ``--pool-timeout``).
LEAK_POOL_TIMEOUT_S = 30.0
#: After the duration, how long requests already started get to finish.
DRAIN_GRACE_S = 35.0


class DemoError(Exception):
    """The demo could not run (the message says why, and which flag to change)."""


@dataclass(frozen=True)
class DemoOptions:
    duration: float = 20.0
    concurrency: int = 24
    max_connections: int = 8
    http2: bool = False
    metrics_port: int = 9464
    json: bool = False
    seed: int | None = None
    pool_timeout: float = 1.0
    #: ``auto`` (httpx if installed, else httpx2), ``httpx`` or ``httpx2``.
    client: str = "auto"


@dataclass
class DemoReport:
    """What the demo saw. ``to_json()`` is what ``--json`` prints."""

    requests: int = 0
    completed: int = 0
    attempts: int = 0
    peak_utilization: float = 0.0
    peak_active_connections: int = 0
    peak_pending_requests: int = 0
    peak_active_requests: int = 0
    queue_wait_p50_s: float | None = None
    queue_wait_p99_s: float | None = None
    queue_wait_max_seen_s: float = 0.0
    pool_timeouts: int = 0
    reuse_ratio: float | None = None
    leaked_responses: int = 0
    leaks_planned: int = 0
    batch_requests: int = 0
    connections_created: int = 0
    server_accepted_connections: int = 0
    server_requests: int = 0
    server_h2_max_concurrent_streams: int | None = None
    errors_by_type: dict[str, int] = field(default_factory=dict)
    poolwatch_errors_by_type: dict[str, int] = field(default_factory=dict)
    saturation_warnings: int = 0
    first_saturation_warning: str | None = None
    poolwatch_internal_errors: list[str] = field(default_factory=list)
    duration_s: float = 0.0
    concurrency: int = 0
    max_connections: int = 0
    http2: bool = False
    pool_timeout_s: float = 0.0
    client: str = ""
    seed: int = 0
    interrupted: bool = False
    #: Requests cancelled by Ctrl-C or by the end of the drain grace; they may or may not have
    #: reached the server, so ``requests`` and ``server_requests`` may differ by up to this.
    cancelled_in_flight: int = 0
    metrics_url: str | None = None
    findings: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------------------------
# Figures from snapshots
# --------------------------------------------------------------------------------------------


def merged_time_in_queue(snap: PoolSnapshot) -> HistogramSnapshot | None:
    """The pool's queue-wait histogram, summed over its origins (``None`` before a request)."""
    merged: HistogramSnapshot | None = None
    for origin in snap.origins:
        h = origin.time_in_queue
        if merged is None:
            merged = h
        elif merged.bounds == h.bounds:
            merged = HistogramSnapshot(
                h.bounds,
                tuple(a + b for a, b in zip(merged.counts, h.counts, strict=True)),
                merged.count + h.count,
                merged.sum + h.sum,
            )
    return merged


def queue_quantile(snap: PoolSnapshot, q: float) -> float | None:
    """The q-quantile of the time requests waited for a connection, estimated from buckets."""
    h = merged_time_in_queue(snap)
    return None if h is None else h.quantile(q)


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------


def _client_module(choice: str) -> ModuleType:
    names = ("httpx", "httpx2") if choice == "auto" else (choice,)
    for name in names:
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    wanted = " or ".join(names)
    extra = "httpx" if choice == "auto" else choice
    raise DemoError(
        f"poolwatch demo drives an {wanted} client, and it is not installed: "
        f"pip install 'poolwatch[{extra}]'"
    )


class _LogCatcher(logging.Handler):
    """Holds the ``poolwatch`` logger's records during the demo, so they cannot tear the view."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lock_ = threading.Lock()
        self.warnings: list[str] = []
        self.errors: list[str] = []
        self.last: str | None = None

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
        except Exception:  # a malformed record must not break the demo
            return
        with self.lock_:
            self.last = message
            if record.levelno >= logging.ERROR:
                self.errors.append(message)
            elif record.levelno >= logging.WARNING:
                self.warnings.append(message)


class _Demo:
    def __init__(self, options: DemoOptions, stderr: Console) -> None:
        self.o = options
        self.stderr = stderr
        self.seed = options.seed if options.seed is not None else random.randrange(2**31)
        self.httpx = _client_module(options.client)
        self.report = DemoReport(
            concurrency=options.concurrency,
            max_connections=options.max_connections,
            http2=options.http2,
            pool_timeout_s=options.pool_timeout,
            client=self.httpx.__name__,
            seed=self.seed,
        )
        self.server: LoopbackServer | None = None
        self.metrics_server: Any = None
        self.client: Any = None
        self.url = ""
        self.started = 0.0
        #: Set at the end of the duration: tasks start no new request.
        self.draining = asyncio.Event()
        self.interrupted = False
        self.errors: Counter[str] = Counter()
        self.completed = 0
        self.attempts = 0
        self.leaks_due: deque[float] = deque()
        self.snap: PoolSnapshot | None = None
        self.logs = _LogCatcher()
        self.workers: list[asyncio.Task[None]] = []
        self.stop_now = asyncio.Event()

    # -- setup and teardown -----------------------------------------------------------------

    def start_metrics(self) -> None:
        if not self.o.metrics_port:
            return
        from prometheus_client import CollectorRegistry  # noqa: PLC0415

        try:
            server, _thread = poolwatch.prometheus.start_http_server(
                self.o.metrics_port, registry=CollectorRegistry(auto_describe=True)
            )
        except OSError as exc:
            raise DemoError(
                f"cannot serve /metrics on 127.0.0.1:{self.o.metrics_port} ({exc.strerror or exc}):"
                f" choose another port with --metrics-port N, or --metrics-port 0 for none"
            ) from exc
        self.metrics_server = server
        self.report.metrics_url = f"http://127.0.0.1:{server.server_address[1]}/metrics"

    def start_server(self) -> None:
        streams = self.o.max_connections if self.o.http2 else 100
        self.report.server_h2_max_concurrent_streams = streams if self.o.http2 else None
        routes = llm_routes(
            ttft=TTFT_S, token_delay=TOKEN_DELAY_S, jitter=JITTER, tokens=1000, seed=self.seed
        )
        self.server = LoopbackServer(routes, h2_max_concurrent_streams=streams).start()
        self.url = f"{self.server.url}/v1/chat/completions"

    def make_client(self) -> None:
        httpx = self.httpx
        client = httpx.AsyncClient(
            limits=httpx.Limits(
                max_connections=self.o.max_connections,
                max_keepalive_connections=self.o.max_connections,
            ),
            timeout=httpx.Timeout(30.0, pool=self.o.pool_timeout),
            http1=not self.o.http2,
            http2=self.o.http2,
            trust_env=False,  # loopback only: never through a proxy from the environment
        )
        self.client = poolwatch.instrument(client, name=POOL_NAME, warning_interval=5.0)

    def stop_servers(self) -> None:
        if self.server is not None:
            self.server.stop()
        if self.metrics_server is not None:
            self.metrics_server.shutdown()
            self.metrics_server.server_close()

    # -- traffic ---------------------------------------------------------------------------

    def body(
        self, rng: random.Random, *, stream: bool, tokens: int | None = None
    ) -> dict[str, Any]:
        if tokens is None:
            long = rng.random() < LONG_SHARE
            tokens = LONG_TOKENS if long else rng.randint(*SHORT_TOKENS)
        return {
            "model": "gpt-fake",
            "messages": [{"role": "user", "content": "Say hello to the connection pool."}],
            "stream": stream,
            "max_tokens": tokens,
        }

    async def call(self, body: dict[str, Any]) -> None:
        if not body["stream"]:
            response = await self.client.post(self.url, json=body)
            response.raise_for_status()
            response.json()
            return
        async with self.client.stream("POST", self.url, json=body) as response:
            response.raise_for_status()
            # Read to the end (past "data: [DONE]"), so the connection goes back to the pool.
            async for _line in response.aiter_lines():
                pass

    async def leak(self, rng: random.Random) -> None:
        """Open a streamed response and drop it without closing it: the bug on display."""
        # A patient pool timeout: the leak is the point of the scenario, not another PoolTimeout.
        request = self.client.build_request(
            "POST",
            self.url,
            json=self.body(rng, stream=True),
            timeout=self.httpx.Timeout(30.0, pool=LEAK_POOL_TIMEOUT_S),
        )
        response = await self.client.send(request, stream=True)
        del response  # no aclose(), no `async with`: its connection never returns
        gc.collect()  # poolwatch sees the response die and counts the leak

    async def attempt(self, rng: random.Random, kind: str) -> str | None:
        """One request (``call``, ``leak`` or ``batch``), counted; the error type if it failed."""
        self.attempts += 1
        try:
            if kind == "leak":
                await self.leak(rng)
            else:
                batch = kind == "batch"
                stream = not batch and rng.random() < STREAM_SHARE
                await self.call(
                    self.body(rng, stream=stream, tokens=BATCH_TOKENS if batch else None)
                )
                self.completed += 1
        except asyncio.CancelledError:
            self.report.cancelled_in_flight += 1
            raise
        except Exception as exc:
            self.errors[type(exc).__name__] += 1
            return type(exc).__name__
        return None

    async def worker(self, index: int) -> None:
        rng = random.Random(self.seed * 1_000_003 + index)
        while not self.draining.is_set():
            await asyncio.sleep(rng.uniform(*THINK_S))
            if self.draining.is_set():
                return
            leak = bool(self.leaks_due) and time.monotonic() >= self.leaks_due[0]
            if leak:
                self.leaks_due.popleft()
            error = await self.attempt(rng, "leak" if leak else "call")
            if error is not None and leak:
                self.leaks_due.appendleft(time.monotonic())  # try again on the next call
            if error == "PoolTimeout":
                await asyncio.sleep(rng.uniform(*BACKOFF_S))  # as a retrying client would

    async def batch(self, delay: float) -> None:
        """A batch job: as many long completions at once as the pool has connections."""
        await asyncio.sleep(delay)
        if self.draining.is_set():
            return
        self.report.batch_requests = self.o.max_connections
        rng = random.Random(self.seed * 7 + 1)
        await asyncio.gather(*(self.attempt(rng, "batch") for _ in range(self.o.max_connections)))

    # -- watching ----------------------------------------------------------------------------

    def sample(self) -> PoolSnapshot:
        snap = poolwatch.snapshot(self.client)
        r = self.report
        r.peak_utilization = max(r.peak_utilization, snap.utilization)
        r.peak_active_connections = max(r.peak_active_connections, snap.active_connections)
        r.peak_pending_requests = max(r.peak_pending_requests, snap.pending_requests)
        r.peak_active_requests = max(r.peak_active_requests, snap.active_requests)
        r.queue_wait_max_seen_s = max(r.queue_wait_max_seen_s, snap.pending_max_age)
        self.snap = snap
        return snap

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    async def watch(self, live: Live | None) -> None:
        last_refresh = last_plain = 0.0
        while True:
            snap = self.sample()
            now = time.monotonic()
            if live is not None and now - last_refresh >= REFRESH_S:
                live.update(self.render(snap), refresh=True)
                last_refresh = now
            if live is None and not self.o.json and now - last_plain >= PLAIN_PROGRESS_S:
                if last_plain:
                    self.stderr.print(
                        self.plain_progress(snap), highlight=False, markup=False, soft_wrap=True
                    )
                last_plain = now
            await asyncio.sleep(SAMPLE_S)

    def plain_progress(self, snap: PoolSnapshot) -> str:
        return (
            f"poolwatch demo: {self.elapsed():5.1f} s  requests {snap.requests_total}  "
            f"active {snap.active_connections}/{self.o.max_connections}  "
            f"waiting {snap.pending_requests}  PoolTimeouts {snap.pool_timeouts_total}  "
            f"leaked {snap.leaked_responses_total}"
        )

    def render(self, snap: PoolSnapshot) -> RenderableType:
        limit = snap.max_connections or self.o.max_connections
        protocol = "HTTP/2 (h2c)" if self.o.http2 else "HTTP/1.1"
        title = Text.assemble(
            ("poolwatch demo", "bold"),
            f"  pool {POOL_NAME!r} -> fake LLM API {self.url} ({protocol})  ",
            (f"{self.elapsed():.1f} s / {self.o.duration:g} s", "dim"),
            (
                "  (time is up: letting the requests in flight finish)"
                if self.draining.is_set()
                else "",
                "dim",
            ),
        )
        util_style = (
            "red" if snap.utilization >= 1.0 else "yellow" if snap.utilization >= 0.8 else "green"
        )
        bar = ProgressBar(
            total=float(limit), completed=float(snap.active_connections), width=40,
            complete_style=util_style, finished_style=util_style,
        )  # fmt: skip
        grid = Table.grid(padding=(0, 2))
        grid.add_column(style="bold", no_wrap=True)
        grid.add_column()
        grid.add_row(
            "utilization",
            Group(
                Text.assemble(
                    (f"{snap.utilization:4.0%}", util_style),
                    f"  {snap.active_connections}/{limit} connections",
                    (f"  (peak {self.report.peak_utilization:.0%})", "dim"),
                ),
                bar,
            ),
        )
        grid.add_row(
            "connections",
            f"active {snap.active_connections}   idle {snap.idle_connections}   "
            f"waiting requests {snap.pending_requests}   "
            f"oldest wait {snap.pending_max_age:.2f} s",
        )
        p50, p99 = queue_quantile(snap, 0.5), queue_quantile(snap, 0.99)
        grid.add_row("queue wait", f"p50 {_seconds(p50)}   p99 {_seconds(p99)}")
        reuse = "-" if snap.reuse_ratio is None else f"{snap.reuse_ratio:.1%}"
        timeouts_style = "red" if snap.pool_timeouts_total else ""
        leaks_style = "red" if snap.leaked_responses_total else ""
        grid.add_row(
            "requests",
            Text.assemble(
                f"{snap.requests_total} sent   reuse {reuse}   ",
                (f"PoolTimeouts {snap.pool_timeouts_total}", timeouts_style),
                "   ",
                (f"leaked {snap.leaked_responses_total}", leaks_style),
                f"   connections opened {snap.connections_created_total}",
            ),
        )
        assert self.server is not None
        stats = self.server.stats
        grid.add_row(
            "server",
            f"{stats.accepted_connections} connections accepted, {stats.requests} requests, "
            f"{stats.in_flight_requests} in flight",
        )
        if self.report.metrics_url:
            grid.add_row("metrics", self.report.metrics_url)
        with self.logs.lock_:
            last = self.logs.last
        if last:
            grid.add_row(
                "poolwatch log", Text(last, style="yellow", no_wrap=True, overflow="ellipsis")
            )
        return Group(title, grid, Text("Ctrl-C stops and prints the report", style="dim"))

    # -- the whole run ---------------------------------------------------------------------

    def on_sigint(self) -> None:
        self.interrupted = True
        self.stop_now.set()
        loop = asyncio.get_running_loop()
        with contextlib.suppress(Exception):
            loop.remove_signal_handler(signal.SIGINT)  # a second Ctrl-C stops at once

    async def wait_workers(self) -> None:
        await asyncio.wait(self.workers)

    async def wait_stop_now(self) -> None:
        await self.stop_now.wait()

    async def run(self, live: Live | None) -> None:
        loop = asyncio.get_running_loop()
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signal.SIGINT, self.on_sigint)
        self.make_client()
        self.started = time.monotonic()
        leaks = 1 if self.o.duration < 10 else 2
        self.report.leaks_planned = leaks
        for fraction in (0.25, 0.6)[:leaks]:
            self.leaks_due.append(self.started + fraction * self.o.duration)
        watcher = asyncio.create_task(self.watch(live))
        self.workers = [
            asyncio.create_task(self.worker(i), name=f"demo-worker-{i}")
            for i in range(self.o.concurrency)
        ]
        self.workers.append(
            asyncio.create_task(self.batch(BATCH_AT * self.o.duration), name="demo-batch")
        )
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop_now.wait(), self.o.duration)
            self.draining.set()
            if not self.interrupted:
                # Let the requests already started finish, so every count is exact; a Ctrl-C
                # or the grace running out cuts it short.
                drain = asyncio.create_task(self.wait_workers())
                stop = asyncio.create_task(self.wait_stop_now())
                await asyncio.wait(
                    {drain, stop}, timeout=DRAIN_GRACE_S, return_when=asyncio.FIRST_COMPLETED
                )
                drain.cancel()
                stop.cancel()
            for task in self.workers:
                task.cancel()
            await asyncio.gather(*self.workers, return_exceptions=True)
            gc.collect()
            self.sample()
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
            self.report.duration_s = round(self.elapsed(), 3)
            await self.client.aclose()
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.remove_signal_handler(signal.SIGINT)

    def finish_report(self) -> DemoReport:
        r = self.report
        snap = self.snap
        if snap is not None:
            r.requests = snap.requests_total
            r.queue_wait_p50_s = _round(queue_quantile(snap, 0.5))
            r.queue_wait_p99_s = _round(queue_quantile(snap, 0.99))
            r.pool_timeouts = snap.pool_timeouts_total
            r.reuse_ratio = _round(snap.reuse_ratio)
            r.leaked_responses = snap.leaked_responses_total
            r.connections_created = snap.connections_created_total
            r.poolwatch_errors_by_type = dict(sorted((snap.errors or {}).items()))
        r.queue_wait_max_seen_s = round(r.queue_wait_max_seen_s, 3)
        r.peak_utilization = round(r.peak_utilization, 4)
        r.completed = self.completed
        r.attempts = self.attempts
        r.errors_by_type = dict(sorted(self.errors.items()))
        r.interrupted = self.interrupted
        if self.server is not None:
            created = r.connections_created
            # The server accepts a connection a moment after the client's connect completes.
            with contextlib.suppress(TimeoutError):
                self.server.wait_for(lambda s: s.accepted_connections >= created, timeout=1.0)
            r.server_accepted_connections = self.server.stats.accepted_connections
            r.server_requests = self.server.stats.requests
        with self.logs.lock_:
            r.saturation_warnings = len(self.logs.warnings)
            r.first_saturation_warning = self.logs.warnings[0] if self.logs.warnings else None
            r.poolwatch_internal_errors = list(self.logs.errors)
        r.findings = findings(r)
        return r


def run_demo(
    options: DemoOptions, *, stdout: Console | None = None, stderr: Console | None = None
) -> tuple[DemoReport, int]:
    """Run the demo; print the live view (on a terminal) and the report. Returns the exit code.

    Raises:
        DemoError: it could not start (a port in use, no httpx installed).
    """
    out = stdout if stdout is not None else Console(highlight=False)
    err = stderr if stderr is not None else Console(stderr=True, highlight=False)
    demo = _Demo(options, err)
    logger = logging.getLogger("poolwatch")
    saved_propagate = logger.propagate
    logger.addHandler(demo.logs)
    logger.propagate = False
    try:
        demo.start_metrics()
        demo.start_server()
        protocol = "HTTP/2 (h2c)" if options.http2 else "HTTP/1.1"
        metrics = f", /metrics on {demo.report.metrics_url}" if demo.report.metrics_url else ""
        err.print(
            f"poolwatch demo: fake LLM API on {demo.url} ({protocol}){metrics}; "
            f"{options.concurrency} tasks share {options.max_connections} connections for "
            f"{options.duration:g} s (Ctrl-C stops early)",
            markup=False,
            highlight=False,
            soft_wrap=True,
        )
        if err.is_terminal:
            with Live(console=err, auto_refresh=False, transient=False) as live:
                asyncio.run(demo.run(live))
        else:
            asyncio.run(demo.run(None))
    finally:
        demo.stop_servers()
        logger.removeHandler(demo.logs)
        logger.propagate = saved_propagate
    report = demo.finish_report()
    if options.json:
        out.file.write(json.dumps(report.to_json(), sort_keys=False) + "\n")
        out.file.flush()
    else:
        print_report(report, out)
    return report, (130 if report.interrupted else 0)


# --------------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------------


def _n(count: int, noun: str, plural: str | None = None) -> str:
    """``1 request``, ``3 requests``."""
    return f"{count} {noun if count == 1 else (plural or noun + 's')}"


def findings(r: DemoReport) -> list[str]:
    """What the figures mean, in plain words, with what to do."""
    out: list[str] = []
    usable = max(r.max_connections - r.leaked_responses, 0)
    waited = (r.queue_wait_p99_s or 0.0) >= 0.05 or r.pool_timeouts > 0
    quantiles = (
        f"p50 ~{_seconds(r.queue_wait_p50_s)}, p99 ~{_seconds(r.queue_wait_p99_s)}, estimated "
        f"from the histogram's buckets as histogram_quantile() does"
    )
    longest = f"{r.queue_wait_max_seen_s:.2f} s"
    if r.http2:
        streams = r.server_h2_max_concurrent_streams
        out.append(
            f"HTTP/2 multiplexed the requests over {_n(r.connections_created, 'connection')}, "
            f"so the pool's limit of {r.max_connections} connections never bound: peak "
            f"utilization was {r.peak_utilization:.0%}. The limit that mattered is the server's "
            f"{streams} concurrent streams per connection."
        )
        if waited:
            out.append(
                f"Requests waited for a stream slot up to {longest} ({quantiles}). httpx does "
                f"not open a second connection when a connection's streams are all taken: lower "
                f"concurrency to {streams}, or spread the load over several clients (or use "
                f"HTTP/1.1 with max_connections={r.concurrency})."
            )
    elif r.peak_utilization >= 1.0 and waited:
        out.append(
            f"The pool was the bottleneck: all {r.max_connections} connections were busy and "
            f"requests waited up to {longest} for one ({quantiles}). {r.concurrency} tasks "
            f"shared {r.max_connections} connections: raise max_connections to {r.concurrency} "
            f"(one per concurrent request) or lower concurrency to {r.max_connections}."
        )
    elif r.peak_utilization >= 1.0:
        out.append(
            f"All {r.max_connections} connections were busy at the peak, but requests hardly "
            f"waited ({quantiles}): the pool is at its limit with no room for a burst."
        )
    else:
        out.append(
            f"The pool never filled (peak utilization {r.peak_utilization:.0%}); requests "
            f"waited {quantiles}."
        )
    if r.pool_timeouts:
        share = r.pool_timeouts / max(r.attempts, 1)
        batch = (
            f" Most come in bursts: when the batch job's {r.batch_requests} long completions "
            f"held every connection, everything queued behind them ran out of time."
            if r.batch_requests
            else ""
        )
        out.append(
            f"{_n(r.pool_timeouts, 'request')} ({share:.0%} of attempts) gave up with "
            f"PoolTimeout after waiting {r.pool_timeout_s:g} s for a connection; they never "
            f"reached the server.{batch} This is the 'mysterious PoolTimeout' of a saturated "
            f"pool: size the pool as above, or allow a longer pool timeout if waiting is "
            f"acceptable."
        )
    elif r.http2 and waited:
        out.append(
            "No PoolTimeouts: the pool timeout only covers the wait for a connection, and a "
            "multiplexed connection always counts as available; the wait for a stream slot "
            "inside it has no timeout at all."
        )
    elif waited and r.queue_wait_max_seen_s <= r.pool_timeout_s:
        out.append(
            f"No PoolTimeouts: every wait stayed under the {r.pool_timeout_s:g} s pool timeout."
        )
    if not r.http2 and r.queue_wait_max_seen_s > 1.25 * r.pool_timeout_s:
        library = (
            "httpx's httpcore 1.x hands a freed connection to every waiter at once; the losers "
            "go back to the queue with a fresh pool timeout (encode/httpcore#822), so the "
            "timeout only fires when no connection frees up for that long"
            if r.client == "httpx"
            else "a request that loses a freed connection to another one waits again with a "
            "fresh pool timeout"
        )
        out.append(
            f"Some requests waited {longest} for a connection, longer than the "
            f"{r.pool_timeout_s:g} s pool timeout: {library}. Under steady load the pool "
            f"timeout does not bound the wait; poolwatch's queue wait shows the real one."
        )
    if r.leaked_responses:
        what = "stream slot on its connection" if r.http2 else "connection"
        left = "" if r.http2 else f" (the pool ran on {usable} of {r.max_connections})"
        keeps = "it keeps" if r.leaked_responses == 1 else "each keeps"
        out.append(
            f"{_n(r.leaked_responses, 'streamed response was', 'streamed responses were')} "
            f"dropped without being closed: {keeps} its {what} out of the pool until the "
            f"client is closed{left}. Close streams with `async with client.stream(...)`, or "
            f"`await response.aclose()`."
        )
    elif r.leaks_planned and not r.interrupted:
        out.append("No leaked response was caught: the planned leak never got a connection.")
    if r.reuse_ratio is not None:
        opened = f"{_n(r.connections_created, 'connection')} opened for {r.requests} requests"
        if r.connections_created <= r.max_connections:
            out.append(
                f"{r.reuse_ratio:.1%} of requests reused an open connection ({opened}: the "
                f"pool opened each slot once and kept it)."
            )
        else:
            out.append(
                f"{r.reuse_ratio:.1%} of requests reused an open connection ({opened}, more "
                f"than the pool holds): connections are being closed and reopened; check "
                f"keepalive_expiry and max_keepalive_connections."
            )
    agree_requests = r.requests == r.server_requests
    agree_conns = r.connections_created == r.server_accepted_connections
    counted = (
        f"poolwatch counted {_n(r.requests, 'request')} sent on "
        f"{_n(r.connections_created, 'connection')}"
    )
    if agree_requests and agree_conns:
        out.append(f"Cross-check: {counted}, exactly what the server received.")
    else:
        why = (
            f" ({_n(r.cancelled_in_flight, 'request')} cancelled in flight may or may not have "
            f"reached the server)"
            if r.cancelled_in_flight
            else ""
        )
        out.append(
            f"Cross-check: {counted}; the server received {_n(r.server_requests, 'request')} "
            f"on {_n(r.server_accepted_connections, 'connection')}{why}."
        )
    if r.saturation_warnings:
        out.append(
            f"poolwatch's saturation warning fired {_n(r.saturation_warnings, 'time')} on the "
            f"'poolwatch' logger; the first: {r.first_saturation_warning}"
        )
    for message in r.poolwatch_internal_errors:
        out.append(f"poolwatch reported an internal error: {message}")
    if r.interrupted:
        out.append(f"Interrupted after {r.duration_s:.1f} s: these are the figures so far.")
    return out


def report_rows(r: DemoReport) -> list[tuple[str, str]]:
    errors = ", ".join(f"{k}: {v}" for k, v in r.errors_by_type.items()) or "none"
    cancelled = f" ({r.cancelled_in_flight} cancelled)" if r.cancelled_in_flight else ""
    return [
        ("requests (sent)", f"{r.requests}   server received {r.server_requests}"),
        ("completed", f"{r.completed} of {r.attempts} attempts{cancelled}"),
        (
            "peak utilization",
            f"{r.peak_utilization:.0%}   ({r.peak_active_connections}/{r.max_connections}"
            " connections)",
        ),
        (
            "queue wait p50 / p99",
            f"{_seconds(r.queue_wait_p50_s)} / {_seconds(r.queue_wait_p99_s)}"
            f"   longest seen {r.queue_wait_max_seen_s:.2f} s",
        ),
        ("pool timeouts", str(r.pool_timeouts)),
        ("reuse ratio", "-" if r.reuse_ratio is None else f"{r.reuse_ratio:.1%}"),
        ("leaked responses", str(r.leaked_responses)),
        (
            "connections created",
            f"{r.connections_created}   server accepted {r.server_accepted_connections}",
        ),
        ("errors by type", errors),
    ]


def print_report(r: DemoReport, console: Console) -> None:
    """The report as text: a title, the figures, then what they mean."""
    width = max(console.width, 60)
    protocol = "HTTP/2" if r.http2 else "HTTP/1.1"
    title = (
        f"({r.client}, {protocol}, {r.concurrency} tasks, max_connections={r.max_connections}, "
        f"pool timeout {r.pool_timeout_s:g} s, ran {r.duration_s:.1f} s, seed {r.seed})"
    )
    console.print(Text("poolwatch demo report", style="bold"))
    console.print(Text(textwrap.fill(title, width=width)), soft_wrap=True)
    console.print()
    rows = report_rows(r)
    label_width = max(len(label) for label, _ in rows)
    for label, value in rows:
        console.print(
            Text.assemble(("  " + label.ljust(label_width), "bold"), "  ", value), soft_wrap=True
        )
    console.print()
    console.print(Text("What it means", style="bold"))
    for line in r.findings:
        text = textwrap.fill(line, width=width, initial_indent="  - ", subsequent_indent="    ")
        console.print(Text(text), soft_wrap=True)


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f} s"


def _round(value: float | None, digits: int = 4) -> float | None:
    return None if value is None else round(value, digits)
