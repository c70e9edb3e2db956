"""poolwatch's other costs: /metrics render time, snapshot() cost, memory over many requests.

    python bench/micro.py                       # everything, 1,000,000 requests for memory
    python bench/micro.py --requests 50000      # a shorter memory run
    python bench/micro.py --part render         # one part only (render, snapshot, memory)

Starts ``server.py`` bound to 127.0.0.1 ... 127.0.0.5 on one port (five distinct origins, all
loopback), runs each part in a fresh process and prints a markdown section, which replaces the
blocks of the parts it ran in the micro section of ``bench/results/latest.md`` (the other
parts' latest blocks stay).

render
    100 instrumented ``AsyncClient`` pools (``--pools``), each with traffic to the 5 origins,
    so 500 per-origin series groups; ``poolwatch.prometheus.enable(registry)`` on a private
    registry; the time of ``poolwatch.prometheus.generate_latest(registry)`` (the page
    poolwatch's ``start_http_server`` serves) when nothing moved since the last scrape and
    when traffic reached every origin of every pool in between, against prometheus_client's
    own ``generate_latest(registry)`` of the same registry (checked to hold the same samples).
    Also the OTel side: one ``get_metrics_data()`` of an InMemoryMetricReader with
    ``poolwatch.otel.enable()`` for the same pools.
    Unchanged, the pools are at rest: each snapshot is the last one again (after one poll of
    its idle sockets) and each pool's text is reused. Moved, the scrape reads every pool's
    core again (the saturation sampler's reading each second is a light one that leaves no
    snapshot to reuse); its connections are the very ones of the last reading, idle again
    between requests, so their reading is kept (after the same poll). Busy, every pool also
    has a request in flight while it is read: only its connections' states are read again.
    Churned, every pool has also closed a connection and opened another since the last
    scrape: every connection is walked again, the worst case. Every other moved render starts
    after a
    ``gc.collect()``: httpx 0.28 leaves cyclic garbage behind each request (~15 objects;
    httpx2 and poolwatch none), which a collection set off by the render's allocations
    sweeps on the render's clock. Also the time gzip (level 1,
    what poolwatch's server uses) takes on the page.
snapshot
    ``poolwatch.snapshot(client)`` for one pool with 5 origins and 20 open connections: at
    rest (the last reading reused) and with one request in flight (read in full); and the
    saturation sampler's lighter reading of the same busy pool.
memory
    one instrumented client with Prometheus enabled (scraped every 10,000 requests, as a
    server would be) sends ``--requests`` requests round-robin over the 5 origins; tracemalloc
    (started before the client is made) current size and the process RSS after 10,000
    requests and at the end, the growth, and the allocation sites that grew most.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import gzip
import json
import logging
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import timeit
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)  # measure the working tree's poolwatch

ORIGIN_HOSTS = [f"127.0.0.{i}" for i in range(1, 6)]
MARK_START = "<!-- micro.py: start -->"
MARK_END = "<!-- micro.py: end -->"
CHECKPOINT = 10_000


def _hx(family: str) -> Any:
    import importlib  # noqa: PLC0415

    return importlib.import_module(family)


def _client(family: str, limit: int) -> Any:
    hx = _hx(family)
    transport = hx.AsyncHTTPTransport(
        limits=hx.Limits(max_connections=limit, max_keepalive_connections=limit)
    )
    return hx.AsyncClient(transport=transport)


def _urls(port: int) -> list[str]:
    return [f"http://{host}:{port}/" for host in ORIGIN_HOSTS]


async def _get(client: Any, url: str) -> None:
    r = await client.get(url)
    if r.status_code != 200 or len(r.content) != 73:
        raise RuntimeError(f"bad response from {url}: {r.status_code}, {len(r.content)} bytes")


def _parsed(page: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    from prometheus_client.parser import text_string_to_metric_families  # noqa: PLC0415

    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(page.decode())
        for s in family.samples
    }


def _stats(samples: list[float]) -> dict[str, float]:
    s = sorted(samples)
    return {"median": statistics.median(s), "min": s[0], "max": s[-1]}


# -- render --------------------------------------------------------------------------------


async def part_render(args: argparse.Namespace) -> dict[str, Any]:
    from opentelemetry.sdk.metrics import MeterProvider  # noqa: PLC0415
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader  # noqa: PLC0415
    from prometheus_client import CollectorRegistry, generate_latest  # noqa: PLC0415

    import poolwatch  # noqa: PLC0415
    import poolwatch.otel  # noqa: PLC0415
    import poolwatch.prometheus  # noqa: PLC0415

    urls = _urls(args.port)
    clients = []
    for i in range(args.pools):
        client = _client(args.family, 10)
        poolwatch.instrument(client, name=f"pool-{i:03d}")
        clients.append(client)

    async def traffic(per_origin: int) -> None:
        """Every pool calls every origin, two at a time per origin (two connections each)."""
        for client in clients:
            await asyncio.gather(
                *(
                    _get(client, url)
                    for _ in range(max(per_origin // 2, 1))
                    for url in urls
                    for _ in (0, 1)
                )
            )

    await traffic(args.per_origin)
    requests = sum(poolwatch.snapshot(c).requests_total for c in clients)
    connections = sum(
        poolwatch.snapshot(c).idle_connections + poolwatch.snapshot(c).active_connections
        for c in clients
    )
    origins = sum(len(poolwatch.snapshot(c).origins) for c in clients)

    registry = CollectorRegistry()
    poolwatch.prometheus.enable(registry)
    first_t0 = time.perf_counter()
    text = poolwatch.prometheus.generate_latest(registry)
    first = time.perf_counter() - first_t0

    def timed(render: Any) -> tuple[float, float, bytes]:
        w0, c0 = time.perf_counter(), time.process_time()
        page = render(registry)
        return (time.perf_counter() - w0) * 1e3, (time.process_time() - c0) * 1e3, page

    # Unchanged: nothing happened since the last scrape (a pool at rest).
    walls, cpus = [], []
    for _ in range(args.repeats):
        wall, cpu, text = timed(poolwatch.prometheus.generate_latest)
        walls.append(wall)
        cpus.append(cpu)
    # Moved: traffic to every origin of every pool before each scrape, so every per-origin
    # series moved (and with max_connections=10 over 5 origins, connections closed too).
    # httpx 0.28 leaves ~15 objects of cyclic garbage per request (its responses and streams;
    # httpx2 none, poolwatch none): a collection that the render's allocations set off sweeps
    # them too, 1-3 ms counted to the render that would otherwise go to the host's next
    # allocation. Every other moved render starts after a collection (not timed), which says
    # what the render costs by itself.
    moved_walls, moved_cpus, collected_walls = [], [], []
    for _ in range(max(args.repeats // 2, 3)):
        await traffic(2)
        wall, cpu, text = timed(poolwatch.prometheus.generate_latest)
        moved_walls.append(wall)
        moved_cpus.append(cpu)
        await traffic(2)
        gc.collect()
        wall, _cpu, text = timed(poolwatch.prometheus.generate_latest)
        collected_walls.append(wall)
    # Busy: the same, with a request in flight in every pool while the scrape reads it (a
    # response held open, its body unread). Its connections are those of the last reading,
    # so only their states are read again. Churned: each held response is closed unread, so
    # httpcore closes its connection and the next traffic opens another: every pool's
    # connections changed since the last scrape and are walked again, the worst case.
    busy_walls, churned_walls = [], []
    for into, churn in ((busy_walls, False), (churned_walls, True)):
        for _ in range(max(args.repeats // 2, 3)):
            await traffic(2)
            held = [await c.send(c.build_request("GET", urls[0]), stream=True) for c in clients]
            wall, _cpu, text = timed(poolwatch.prometheus.generate_latest)
            into.append(wall)
            for response in held:
                if not churn:
                    await response.aread()  # a request over, its connection given back
                await response.aclose()
    await traffic(2)
    text = poolwatch.prometheus.generate_latest(registry)
    # What poolwatch's server adds when the scraper accepts gzip (Prometheus always does).
    gzip_ms = []
    for _ in range(3):
        t0 = time.perf_counter()
        gzip.compress(text, compresslevel=1)
        gzip_ms.append((time.perf_counter() - t0) * 1e3)
    # prometheus_client writing the whole registry through poolwatch's collector.
    pc_walls = []
    for _ in range(3):
        wall, _cpu, pc_text = timed(generate_latest)
        pc_walls.append(wall)
    same = _parsed(pc_text) == _parsed(poolwatch.prometheus.generate_latest(registry))
    collector = poolwatch.prometheus.PoolCollector()
    collect_ms = []
    for _ in range(3):
        t0 = time.perf_counter()
        families = list(collector.collect())
        collect_ms.append((time.perf_counter() - t0) * 1e3)
    series = sum(len(f.samples) for f in families)
    lines = [ln for ln in text.decode().splitlines() if ln and not ln.startswith("#")]
    pool_names = set(re.findall(r'pool_name="([^"]+)"', text.decode()))

    reader = InMemoryMetricReader()
    poolwatch.otel.enable(MeterProvider(metric_readers=[reader]), spans=False)
    otel_ms = []
    for _ in range(max(args.repeats // 2, 3)):
        time.sleep(0.25)  # poolwatch.otel reuses one reading for 0.2 s
        t0 = time.perf_counter()
        reader.get_metrics_data()
        otel_ms.append((time.perf_counter() - t0) * 1e3)

    for client in clients:
        await client.aclose()
    return {
        "part": "render",
        "family": args.family,
        "pools": args.pools,
        "origins_total": origins,
        "requests": requests,
        "open_connections": connections,
        "pools_in_output": len(pool_names),
        "bytes": len(text),
        "sample_lines": len(lines),
        "collector_samples": series,
        "first_render_ms": first * 1e3,
        "render_wall_ms": _stats(walls),
        "render_cpu_ms": _stats(cpus),
        "moved_render_wall_ms": _stats(moved_walls),
        "moved_render_cpu_ms": _stats(moved_cpus),
        "moved_collected_render_wall_ms": _stats(collected_walls),
        "busy_render_wall_ms": _stats(busy_walls),
        "churned_render_wall_ms": _stats(churned_walls),
        "prometheus_client_render_wall_ms": _stats(pc_walls),
        "gzip_ms": _stats(gzip_ms),
        "pages_agree": same,
        "collect_ms": _stats(collect_ms),
        "otel_collect_ms": _stats(otel_ms),
        "repeats": args.repeats,
    }


# -- snapshot ------------------------------------------------------------------------------


async def part_snapshot(args: argparse.Namespace) -> dict[str, Any]:
    from prometheus_client import CollectorRegistry  # noqa: PLC0415

    import poolwatch  # noqa: PLC0415
    import poolwatch.prometheus  # noqa: PLC0415
    from poolwatch._api import watches  # noqa: PLC0415

    urls = _urls(args.port)
    client = _client(args.family, 20)
    poolwatch.instrument(client, name="snapshot")
    [watch] = [w for w in watches() if w.name == "snapshot"]
    # 20 requests at once, 4 per origin, on an empty pool: 20 connections.
    for _ in range(3):
        await asyncio.gather(*(_get(client, url) for url in urls for _ in range(4)))
    snap = poolwatch.snapshot(client)
    number = 2000
    # At rest: the last reading is still true after one poll of the idle sockets.
    per_call = [
        t / number * 1e6
        for t in timeit.repeat(lambda: poolwatch.snapshot(client), number=number, repeat=7)
    ]
    # One request in flight (its response not read yet): every call reads the pool in full.
    async with client.stream("GET", urls[0]) as held:
        busy = [
            t / number * 1e6
            for t in timeit.repeat(lambda: poolwatch.snapshot(client), number=number, repeat=7)
        ]
        busy_snap = poolwatch.snapshot(client)
        # The saturation sampler's reading of the same busy pool, each second.
        pressure = [
            t / number * 1e6 for t in timeit.repeat(watch.pressure, number=number, repeat=7)
        ]
        await held.aread()
    if busy_snap.active_requests != 1:
        raise RuntimeError(f"expected one request in flight, saw {busy_snap.active_requests}")
    registry = CollectorRegistry()
    poolwatch.prometheus.enable(registry)
    poolwatch.prometheus.generate_latest(registry)
    render = [
        t / 50 * 1e3
        for t in timeit.repeat(
            lambda: poolwatch.prometheus.generate_latest(registry), number=50, repeat=5
        )
    ]
    await client.aclose()
    return {
        "part": "snapshot",
        "family": args.family,
        "origins": len(snap.origins),
        "open_connections": snap.idle_connections + snap.active_connections,
        "requests": snap.requests_total,
        "snapshot_us": _stats(per_call),
        "snapshot_busy_us": _stats(busy),
        "pressure_busy_us": _stats(pressure),
        "render_one_pool_ms": _stats(render),
        "calls_per_repeat": number,
    }


# -- memory --------------------------------------------------------------------------------


def _rss_kib() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                key, value = line.split(":", 1)
                out[key] = int(value.split()[0])
    return out


async def part_memory(args: argparse.Namespace) -> dict[str, Any]:
    import tracemalloc  # noqa: PLC0415

    from prometheus_client import CollectorRegistry, generate_latest  # noqa: PLC0415

    import poolwatch  # noqa: PLC0415
    import poolwatch.prometheus  # noqa: PLC0415

    urls = _urls(args.port)
    traced = args.frames > 0
    if traced:
        tracemalloc.start(args.frames)
    client = _client(args.family, len(urls))
    poolwatch.instrument(client, name="memory")
    registry = CollectorRegistry()
    poolwatch.prometheus.enable(registry)

    total = args.requests
    sent = 0
    checkpoints: list[dict[str, Any]] = []
    marks = sorted(
        {CHECKPOINT, *(m for m in (100_000, total // 2) if CHECKPOINT < m < total), total}
    )
    first_dump = os.path.join(tempfile.mkdtemp(prefix="poolwatch-micro-"), "first.snapshot")
    t_start = time.perf_counter()

    async def run_until(limit: int) -> None:
        async def worker(url: str) -> None:
            nonlocal sent
            while sent < limit:
                sent += 1
                await _get(client, url)

        await asyncio.gather(*(worker(url) for url in urls))

    for mark in marks:
        while sent < mark:
            await run_until(min(mark, (sent // CHECKPOINT + 1) * CHECKPOINT))
            generate_latest(registry)  # a scrape every 10,000 requests, as a server would
        gc.collect()
        if mark == CHECKPOINT and traced:
            # Before the reading, so that both RSS readings come after the memory a snapshot
            # takes (freed, but not all given back to the OS); on disk, not held in memory.
            tracemalloc.take_snapshot().dump(first_dump)
            gc.collect()
        current, peak = tracemalloc.get_traced_memory() if traced else (None, None)
        s = poolwatch.snapshot(client)
        checkpoints.append(
            {
                "requests": sent,
                "elapsed_s": round(time.perf_counter() - t_start, 1),
                "tracemalloc_current": current,
                "tracemalloc_peak": peak,
                "tracemalloc_own": tracemalloc.get_tracemalloc_memory() if traced else None,
                **_rss_kib(),
                "allocated_blocks": sys.getallocatedblocks(),
                "gc_objects": len(gc.get_objects()),
                "pw_requests_total": s.requests_total,
                "pw_active_requests": s.active_requests,
                "pw_leaked": s.leaked_responses_total,
            }
        )
        print(json.dumps({"checkpoint": checkpoints[-1]}), file=sys.stderr, flush=True)
    top: list[dict[str, Any]] = []
    poolwatch_growth = None
    if traced:
        snap_last = tracemalloc.take_snapshot()
        snap_first = tracemalloc.Snapshot.load(first_dump)
        os.unlink(first_dump)
        filters = [tracemalloc.Filter(False, tracemalloc.__file__)]
        diff = snap_last.filter_traces(filters).compare_to(
            snap_first.filter_traces(filters), "lineno"
        )
        top = [
            {
                "site": f"{_short(d.traceback[0].filename)}:{d.traceback[0].lineno}",
                "size_diff": d.size_diff,
                "count_diff": d.count_diff,
            }
            for d in diff[:8]
            if d.size_diff > 0
        ]
        poolwatch_growth = sum(
            d.size_diff
            for d in snap_last.compare_to(snap_first, "filename")
            if _short(d.traceback[0].filename).startswith("poolwatch/")
        )
    os.rmdir(os.path.dirname(first_dump))
    core = poolwatch._api._lookup(client).core
    internals = {
        "inflight_records": len(core._inflight),
        "connection_records": len(core.conns),
        "origins": len(core._origins),
    }
    wall = time.perf_counter() - t_start
    await client.aclose()
    if traced:
        tracemalloc.stop()
    return {
        "part": "memory",
        "family": args.family,
        "requests": sent,
        "wall_s": round(wall, 1),
        "req_per_s": round(sent / wall, 1),
        "checkpoints": checkpoints,
        "top_growth": top,
        "poolwatch_files_growth": poolwatch_growth,
        "poolwatch_internals": internals,
        "tracemalloc_frames": args.frames,
    }


def _short(path: str) -> str:
    for marker in ("site-packages/", ROOT + "/"):
        if marker in path:
            return path.split(marker, 1)[1]
    return path


class _PrintErrors(logging.Handler):
    """poolwatch's saturation warnings are expected here (pools run at their limit): keep
    them off the terminal, but show its errors."""

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno >= logging.ERROR:
            print(self.format(record), file=sys.stderr)


def _quiet_poolwatch_log() -> None:
    logging.getLogger("poolwatch").addHandler(_PrintErrors())


# -- orchestration -------------------------------------------------------------------------


def start_server() -> tuple[subprocess.Popen[str], int]:
    cmd = [sys.executable, os.path.join(HERE, "server.py")]
    for host in ORIGIN_HOSTS:
        cmd += ["--host", host]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    port = int(proc.stdout.readline())
    proc.stdout.readline()
    return proc, port


def run_child(part: str, family: str, port: int, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--child",
        part,
        "--family",
        family,
        "--port",
        str(port),
        "--requests",
        str(args.requests),
        "--pools",
        str(args.pools),
        "--repeats",
        str(args.repeats),
        "--per-origin",
        str(args.per_origin),
        "--frames",
        str(args.frames),
    ]
    print(f"micro: {part} ({family}) ...", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=False)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"part": part, "family": family, "failed": True, "returncode": proc.returncode}
    result: dict[str, Any] = json.loads(lines[-1])
    result["process_wall_s"] = round(time.perf_counter() - t0, 1)
    return result


def _mr(s: dict[str, float], fmt: str) -> str:
    return f"{format(s['median'], fmt)} [{format(s['min'], fmt)}..{format(s['max'], fmt)}]"


def _render_part(results: list[dict[str, Any]]) -> list[str]:
    out: list[str] = []
    renders = [r for r in results if r["part"] == "render" and not r.get("failed")]
    if renders:
        out.append("### `/metrics` render with poolwatch enabled")
        out.append("")
        out.append(
            "`poolwatch.prometheus.generate_latest()` (what poolwatch's `start_http_server` "
            "serves) after nothing moved and after traffic to every origin of every pool "
            "(every per-origin series moved; between its requests, a pool whose connections "
            "are the very ones of its last reading keeps their reading), with a request in "
            "flight in every pool as well (busy: its connections' states read again), and with "
            "a connection replaced in every pool since the last scrape too (churned: every "
            "connection walked again), against "
            "prometheus_client's `generate_latest()` of the same registry (poolwatch's collector "
            "read, prometheus_client formatting)."
        )
        out.append("")
        out.append(
            "| family | pools x origins | open conns | output | poolwatch page, unchanged, ms "
            "| poolwatch page, all moved, ms | all moved, the host's garbage collected first, ms "
            "| all moved and busy, ms | busy and churned, ms "
            "| prometheus_client page ms | same samples "
            "| first render ms | gzip level 1 of the page ms | OTel `get_metrics_data()` ms "
            "| target ≤ 20 ms |"
        )
        out.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for r in renders:
            busy = r.get("busy_render_wall_ms")  # not measured before 2026-11-25
            churned = r.get("churned_render_wall_ms")  # nor this, until later that day
            worst = max(
                r["render_wall_ms"]["median"],
                r["moved_render_wall_ms"]["median"],
                busy["median"] if busy else 0.0,
                churned["median"] if churned else 0.0,
            )
            ok = "met" if worst <= 20 else "**not met**"
            out.append(
                f"| {r['family']} | {r['pools']} x {r['origins_total'] // max(r['pools'], 1)} "
                f"({r['pools_in_output']} pools in output) | {r['open_connections']} "
                f"| {r['bytes'] / 1e6:.2f} MB, {r['sample_lines']:,} lines "
                f"| {_mr(r['render_wall_ms'], '.1f')} | {_mr(r['moved_render_wall_ms'], '.1f')} "
                f"| {_mr(r['moved_collected_render_wall_ms'], '.1f')} "
                f"| {_mr(busy, '.1f') if busy else 'not measured'} "
                f"| {_mr(churned, '.1f') if churned else 'not measured'} "
                f"| {_mr(r['prometheus_client_render_wall_ms'], '.0f')} "
                f"| {'yes' if r['pages_agree'] else '**no**'} | {r['first_render_ms']:.1f} "
                f"| {_mr(r['gzip_ms'], '.1f')} | {_mr(r['otel_collect_ms'], '.1f')} | {ok} |"
            )
        out.append("")
        out.append(
            f"Wall time, median [min..max] over {renders[0]['repeats']} renders (unchanged), "
            "half as many (moved, each way, busy and churned), 3 (prometheus_client). The "
            "target is judged on the worst of the plain, moved, busy and churned figures. "
            "httpx 0.28 leaves "
            "cyclic garbage behind each request (httpx2 and poolwatch none): the collection "
            "a render sets off sweeps it, which the column collected first leaves out."
        )
        out.append("")
    return out


def _snapshot_part(results: list[dict[str, Any]]) -> list[str]:
    out: list[str] = []
    snaps = [r for r in results if r["part"] == "snapshot" and not r.get("failed")]
    if snaps:
        out.append("### `poolwatch.snapshot()`: one pool, 5 origins, 20 open connections")
        out.append("")
        out.append(
            "At rest, a snapshot is the last one again once a poll shows no idle socket closed "
            "by the server; with a request in flight, each call reads the pool in full. The "
            "saturation sampler's reading (`ClientWatch.pressure()`, once a second per pool: "
            "busy connections, the limit, the waiting requests) of the same busy pool."
        )
        out.append("")
        out.append(
            "| family | origins | open conns | µs per call, at rest | µs per call, one request "
            "in flight | sampler's reading µs, one request in flight "
            "| one pool's `/metrics` render ms, at rest |"
        )
        out.append("|---|---|---|---|---|---|---|")
        for r in snaps:
            out.append(
                f"| {r['family']} | {r['origins']} | {r['open_connections']} "
                f"| {_mr(r['snapshot_us'], '.1f')} | {_mr(r['snapshot_busy_us'], '.1f')} "
                f"| {_mr(r['pressure_busy_us'], '.1f')} | {_mr(r['render_one_pool_ms'], '.2f')} |"
            )
        out.append("")
        out.append(
            f"Median [min..max] over 7 repeats of {snaps[0]['calls_per_repeat']:,} calls "
            "(render: 5 repeats of 50)."
        )
        out.append("")
    return out


def _memory_part(results: list[dict[str, Any]]) -> list[str]:
    out: list[str] = []
    mems = [r for r in results if r["part"] == "memory" and not r.get("failed")]
    for r in mems:
        first, last = r["checkpoints"][0], r["checkpoints"][-1]
        traced = r["tracemalloc_frames"] > 0
        out.append(
            f"### Memory: one instrumented {r['family']} client + Prometheus, "
            f"{r['requests']:,} requests"
        )
        out.append("")
        out.append(
            f"{r['wall_s'] / 60:.1f} min at {r['req_per_s']:,.0f} req/s "
            + (
                f"under tracemalloc ({r['tracemalloc_frames']} frame(s), started before the "
                "client was made; it slows requests about 3x)"
                if traced
                else "without tracemalloc"
            )
            + "; 5 workers round-robin over the 5 origins, a scrape every 10,000 requests, "
            "`gc.collect()` before each reading."
            + (
                " RSS includes tracemalloc's own tables "
                '(column "tracemalloc own") and, from the first reading on, what its snapshot '
                "of that moment took (freed, but not all returned to the OS)."
                if traced
                else ""
            )
        )
        out.append("")
        out.append(
            "| after requests | tracemalloc current | tracemalloc own | RSS | RSS peak "
            "| allocated blocks | gc objects | poolwatch requests_total / active / leaked |"
        )
        out.append("|---|---|---|---|---|---|---|---|")

        def kib(v: int | None) -> str:
            return "-" if v is None else f"{v / 1024:,.0f} KiB"

        for cp in r["checkpoints"]:
            out.append(
                f"| {cp['requests']:,} | {kib(cp['tracemalloc_current'])} "
                f"| {kib(cp['tracemalloc_own'])} "
                f"| {cp['VmRSS'] / 1024:,.1f} MiB | {cp['VmHWM'] / 1024:,.1f} MiB "
                f"| {cp['allocated_blocks']:,} | {cp['gc_objects']:,} "
                f"| {cp['pw_requests_total']:,} / {cp['pw_active_requests']} / {cp['pw_leaked']} |"
            )
        extra = max(last["requests"] - first["requests"], 1)
        grow_rss = (last["VmRSS"] - first["VmRSS"]) * 1024
        if traced:
            grow_tm = last["tracemalloc_current"] - first["tracemalloc_current"]
            tm = f"**{grow_tm / 1024:+,.0f} KiB** ({grow_tm / extra:+.3f} B/request)"
            own = f"{(last['tracemalloc_own'] - first['tracemalloc_own']) / 1024:+,.0f} KiB"
        else:
            tm = own = "-"
        out.append(
            f"| **growth {first['requests']:,} → {last['requests']:,}** | {tm} | {own} "
            f"| **{grow_rss / 1024 / 1024:+,.1f} MiB** | "
            f"| {last['allocated_blocks'] - first['allocated_blocks']:+,} "
            f"| {last['gc_objects'] - first['gc_objects']:+,} | |"
        )
        out.append("")
        out.append(f"poolwatch's internal records at the end: {r['poolwatch_internals']}.")
        if traced:
            out.append(
                f"Growth of live allocations made in poolwatch's own files: "
                f"{r['poolwatch_files_growth'] / 1024:+,.1f} KiB. Allocation sites that grew "
                f"most ({first['requests']:,} requests → end):"
            )
            out.append("")
            for t in r["top_growth"][:5]:
                out.append(
                    f"- `{t['site']}`: {t['size_diff'] / 1024:+,.1f} KiB "
                    f"({t['count_diff']:+,} blocks)"
                )
        out.append("")
    return out


PART_WRITERS = {"render": _render_part, "snapshot": _snapshot_part, "memory": _memory_part}


def part_blocks(results: list[dict[str, Any]], meta: dict[str, Any]) -> dict[str, str]:
    """Markdown for each part that ran, each with its own run line, between its markers."""
    blocks = {}
    for part, write in PART_WRITERS.items():
        ran = [r for r in results if r["part"] == part]
        if not ran:
            continue
        m = meta["parts"][part]
        out = [f"<!-- micro.py part: {part} -->", ""]
        out.append(
            f"Run {m['started']} ({m['duration_s'] / 60:.1f} min): `{meta['command']}`; "
            f"load average at start {m['loadavg']}. Server: one process bound to "
            f"{', '.join(ORIGIN_HOSTS)} on one port (5 origins)."
        )
        out.append("")
        for r in ran:
            if r.get("failed"):
                out.append(f"- **{part} ({r['family']}) failed** (exit {r.get('returncode')})")
        out += write([r for r in ran if not r.get("failed")])
        out.append(f"<!-- micro.py part end: {part} -->")
        blocks[part] = "\n".join(out)
    return blocks


_PART_RE = re.compile(
    r"<!-- micro\.py part: (\w+) -->.*?<!-- micro\.py part end: \1 -->", re.DOTALL
)


def write_section(path: str, blocks: dict[str, str]) -> str:
    """Replace, in the report, the blocks of the parts that ran; keep the others' latest."""
    try:
        with open(path) as f:
            text = f.read()
    except FileNotFoundError:
        text = ""
    kept: dict[str, str] = {}
    if MARK_START in text and MARK_END in text:
        before, rest = text.split(MARK_START, 1)
        old, after = rest.split(MARK_END, 1)
        kept = {m.group(1): m.group(0) for m in _PART_RE.finditer(old)}
        after = after.lstrip("\n")
    else:
        before, after = text.rstrip("\n") + ("\n\n" if text else ""), ""
    kept.update(blocks)
    body = "\n\n".join(kept[part] for part in PART_WRITERS if part in kept)
    section = f"{MARK_START}\n\n## Micro-measurements (`bench/micro.py`)\n\n{body}\n\n{MARK_END}\n"
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(before + section + after)
    return section


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--requests", type=int, default=1_000_000, help="memory part: requests (default 1M)"
    )
    parser.add_argument("--part", choices=["all", "render", "snapshot", "memory"], default="all")
    parser.add_argument(
        "--family",
        choices=["httpx", "httpx2", "both"],
        default="both",
        help="render and snapshot: which client stack (default both)",
    )
    parser.add_argument(
        "--memory-family",
        choices=["httpx", "httpx2"],
        default="httpx",
        help="the memory part's client stack (default httpx)",
    )
    parser.add_argument("--pools", type=int, default=100)
    parser.add_argument("--per-origin", type=int, default=10, help="render: requests per origin")
    parser.add_argument("--repeats", type=int, default=20, help="render: repeats")
    parser.add_argument(
        "--frames",
        type=int,
        default=1,
        help="memory: tracemalloc frames per trace; 0 = no tracemalloc (RSS only, ~3x faster)",
    )
    parser.add_argument("--output", default=os.path.join(HERE, "results", "latest.md"))
    parser.add_argument("--no-write", action="store_true", help="print only")
    parser.add_argument("--child", choices=["render", "snapshot", "memory"], help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        _quiet_poolwatch_log()
        fn = {"render": part_render, "snapshot": part_snapshot, "memory": part_memory}[args.child]
        print(json.dumps(asyncio.run(fn(args))), flush=True)
        return

    if args.requests < 2 * CHECKPOINT:
        parser.error(
            f"--requests must be at least {2 * CHECKPOINT:,} (the first reading is at "
            f"{CHECKPOINT:,})"
        )
    families = ["httpx", "httpx2"] if args.family == "both" else [args.family]
    parts = ["render", "snapshot", "memory"] if args.part == "all" else [args.part]
    meta: dict[str, Any] = {
        "command": " ".join(["python", "bench/micro.py", *sys.argv[1:]]),
        "parts": {},
    }
    server, port = start_server()
    results = []
    try:
        for part in parts:
            with open("/proc/loadavg") as f:
                loadavg = " ".join(f.read().split()[:3])
            t0 = time.perf_counter()
            started = time.strftime("%Y-%m-%d %H:%M %Z")
            for family in [args.memory_family] if part == "memory" else families:
                results.append(run_child(part, family, port, args))
            meta["parts"][part] = {
                "started": started,
                "duration_s": time.perf_counter() - t0,
                "loadavg": loadavg,
            }
    finally:
        server.terminate()
        server.wait(timeout=10)
    blocks = part_blocks(results, meta)
    print("\n\n".join(blocks.values()))
    if not args.no_write:
        write_section(args.output, blocks)
        print(f"micro: wrote its parts of {args.output}", file=sys.stderr)
        raw = os.path.join(os.path.dirname(args.output), "micro.jsonl")
        try:
            with open(raw) as f:
                earlier = [json.loads(line) for line in f if line.strip()]
        except FileNotFoundError:
            earlier = []
        with open(raw, "w") as f:  # the other parts' latest figures stay
            for r in [r for r in earlier if r.get("part") not in parts] + results:
                f.write(json.dumps(r) + "\n")
    if any(r.get("failed") for r in results):
        sys.exit(1)


if __name__ == "__main__":
    main()
