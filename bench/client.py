"""One benchmark run: one variant, one fresh process, one JSON line on stdout.

    python bench/client.py --variant poolwatch-prom --concurrency 1 --requests 8000 \\
        --url http://127.0.0.1:PORT/

C asyncio workers share a budget of N ``GET`` requests through one ``AsyncClient`` whose
transport is built explicitly as ``AsyncHTTPTransport(limits=Limits(C, C))`` (httpx, or httpx2
for the ``*-httpx2`` variants). After a warm-up (1,000 requests, and at least 6 s when C > 1,
because httpcore's pool only settles once unused connections reach keep-alive expiry) and a
``gc.collect()``, the timed region covers the N requests and then the variant's export work:
one ``generate_latest()`` for Prometheus, ``force_flush()`` of the span processor and one
metric collection for OpenTelemetry.

Client CPU is ``time.process_time()`` over the timed region: every thread of the process,
the OTel batch span processor's and poolwatch's saturation sampler included. ``drift`` is the
CPU per request of the second half of the requests divided by that of the first half (export
work excluded); far from 1.0 means the run was not in a steady state.

Variants (append ``-httpx2`` to any for the httpx2 / httpcore2 stack):

    bare                          nothing instrumented
    poolwatch-prom                poolwatch.instrument() + poolwatch.prometheus.enable(registry)
    poolwatch-prom-otel           the above + poolwatch.otel.enable(SDK meter + tracer providers)
    otel-httpx                    opentelemetry-instrumentation-httpx's instrument_client()
    poolwatch-otel-on-otel-httpx  otel-httpx + poolwatch.instrument() + poolwatch.otel.enable()

The SDK providers are a MeterProvider with an InMemoryMetricReader and a TracerProvider with a
BatchSpanProcessor around an exporter that counts spans and discards them.

Sanity counters, checked after the timed region (``sanity.ok`` is False when one disagrees):
no request failed; poolwatch's snapshot counts exactly the requests sent, with nothing left
active, pending or leaked; the Prometheus and OTel exports count them too; every span was
exported, once, by the instrumentation that should make it.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import importlib
import json
import logging
import os
import sys
import threading
import time
from collections import Counter
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)  # measure the working tree's poolwatch

BASE_VARIANTS = (
    "bare",
    "poolwatch-prom",
    "poolwatch-prom-otel",
    "otel-httpx",
    "poolwatch-otel-on-otel-httpx",
)
BODY_LENGTH = 73


def all_variants() -> list[str]:
    return [*BASE_VARIANTS, *(f"{v}-httpx2" for v in BASE_VARIANTS)]


def parse_variant(name: str) -> tuple[str, str]:
    """(base variant, family) from e.g. ``poolwatch-prom-httpx2``."""
    family = "httpx"
    base = name
    if name.endswith("-httpx2"):
        family, base = "httpx2", name.removesuffix("-httpx2")
    if base not in BASE_VARIANTS:
        raise SystemExit(f"unknown variant {name!r}; known: {', '.join(all_variants())}")
    return base, family


# -- what the variants attach --------------------------------------------------------------


class CountingDiscardExporter:
    """A SpanExporter that counts what it is given and keeps nothing."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.calls = 0
        self.by_kind: Counter[str] = Counter()
        self.enriched = 0

    def export(self, spans: Any) -> Any:
        from opentelemetry.sdk.trace.export import SpanExportResult  # noqa: PLC0415

        with self._lock:
            self.calls += 1
            for span in spans:
                scope = span.instrumentation_scope.name if span.instrumentation_scope else "?"
                self.by_kind[f"{scope}|{span.kind.name}|{span.name}"] += 1
                if span.attributes and "poolwatch.pool.name" in span.attributes:
                    self.enriched += 1
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        pass

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        del timeout_millis
        return True


class LogCounter(logging.Handler):
    """Counts poolwatch's log records by level (saturation warnings, internal errors)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.counts: Counter[str] = Counter()
        self.first: dict[str, str] = {}

    def emit(self, record: logging.LogRecord) -> None:
        self.counts[record.levelname] += 1
        self.first.setdefault(record.levelname, record.getMessage()[:300])


class Setup:
    """The client of one variant, and what its export step and sanity checks need."""

    def __init__(
        self, base: str, family: str, concurrency: int, *, saturation_threshold: float | None = 0.8
    ) -> None:
        self.base = base
        self.family = family
        hx = importlib.import_module(family)
        limits = hx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        self.transport = hx.AsyncHTTPTransport(limits=limits)
        self.client = hx.AsyncClient(transport=self.transport)
        self.pool = self.transport._pool
        self.registry: Any = None
        self.reader: Any = None
        self.tracer_provider: Any = None
        self.exporter: CountingDiscardExporter | None = None
        self.log_counter: LogCounter | None = None
        self.poolwatch = base.startswith("poolwatch")
        self.otel_sdk = "otel" in base
        self.otel_httpx = base in ("otel-httpx", "poolwatch-otel-on-otel-httpx")
        self.prom = base in ("poolwatch-prom", "poolwatch-prom-otel")
        self.poolwatch_otel = base in ("poolwatch-prom-otel", "poolwatch-otel-on-otel-httpx")

        if self.otel_sdk:
            from opentelemetry.sdk.metrics import MeterProvider  # noqa: PLC0415
            from opentelemetry.sdk.metrics.export import InMemoryMetricReader  # noqa: PLC0415
            from opentelemetry.sdk.trace import TracerProvider  # noqa: PLC0415
            from opentelemetry.sdk.trace.export import BatchSpanProcessor  # noqa: PLC0415

            self.reader = InMemoryMetricReader()
            self.meter_provider = MeterProvider(metric_readers=[self.reader])
            self.tracer_provider = TracerProvider()
            self.exporter = CountingDiscardExporter()
            self.tracer_provider.add_span_processor(BatchSpanProcessor(self.exporter))

        if self.otel_httpx:
            from opentelemetry.instrumentation import httpx as otel_httpx  # noqa: PLC0415

            instrumentor = (
                otel_httpx.HTTPXClientInstrumentor
                if family == "httpx"
                else otel_httpx.HTTPX2ClientInstrumentor
            )
            instrumentor.instrument_client(
                self.client,
                tracer_provider=self.tracer_provider,
                meter_provider=self.meter_provider,
            )

        if self.poolwatch:
            import poolwatch  # noqa: PLC0415

            self.log_counter = LogCounter()
            logging.getLogger("poolwatch").addHandler(self.log_counter)
            poolwatch.instrument(
                self.client, name="bench", saturation_threshold=saturation_threshold
            )
            if self.prom:
                from prometheus_client import CollectorRegistry  # noqa: PLC0415

                import poolwatch.prometheus  # noqa: PLC0415

                self.registry = CollectorRegistry()
                poolwatch.prometheus.enable(self.registry)
            if self.poolwatch_otel:
                import poolwatch.otel  # noqa: PLC0415

                poolwatch.otel.enable(self.meter_provider, self.tracer_provider)

    # -- the export step, inside the timed region -------------------------------------------

    def export(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.registry is not None:
            from prometheus_client import generate_latest  # noqa: PLC0415

            out["prometheus_text"] = generate_latest(self.registry)
        if self.tracer_provider is not None:
            out["flushed"] = self.tracer_provider.force_flush()
            out["metrics_data"] = self.reader.get_metrics_data()
        return out

    def settle(self) -> None:
        """Do now, in this thread, the background work the last requests left behind: the span
        processor's export and poolwatch's OTel histogram records (``paired.py`` calls it at
        the end of each of the variant's blocks, so their CPU lands in that block and never in
        a bare one, and holds poolwatch's recorder thread off for the run)."""
        if self.tracer_provider is not None:
            self.tracer_provider.force_flush()
        if self.poolwatch_otel:
            import poolwatch.otel  # noqa: PLC0415

            for exporter in poolwatch.otel._enabled:
                exporter.record_pending()

    def pool_size(self) -> int:
        return len(self.pool.connections)

    # -- sanity, after the timed region ------------------------------------------------------

    def sanity(self, exported: dict[str, Any], sent: int, errors: int) -> dict[str, Any]:
        s: dict[str, Any] = {"requests_sent": sent, "request_errors": errors}
        problems: list[str] = []
        if errors:
            problems.append(f"{errors} requests failed")

        def expect(label: str, got: Any, want: Any) -> None:
            s[label] = got
            if got != want:
                problems.append(f"{label} = {got!r}, expected {want!r}")

        if self.poolwatch:
            import poolwatch  # noqa: PLC0415

            snap = poolwatch.snapshot(self.client)
            expect("pw_requests_total", snap.requests_total, sent)
            expect("pw_active_requests", snap.active_requests, 0)
            expect("pw_pending_requests", snap.pending_requests, 0)
            expect("pw_leaked_responses", snap.leaked_responses_total, 0)
            expect("pw_pool_timeouts", snap.pool_timeouts_total, 0)
            expect("pw_errors", dict(snap.errors or {}), {})
            expect("pw_unreadable_pools", snap.unreadable_pools, 0)
            open_now = sum(1 for c in self.pool.connections if not c.is_closed())
            expect(
                "pw_open_connections",
                snap.active_connections + snap.idle_connections + snap.connecting_connections,
                open_now,
            )
            s["pw_active_connections"] = snap.active_connections
            s["pw_idle_connections"] = snap.idle_connections
            s["pw_reused_requests_total"] = snap.reused_requests_total
            s["pw_connections_created_total"] = snap.connections_created_total
            s["pw_max_connections"] = snap.max_connections
            assert self.log_counter is not None
            s["pw_log_records"] = dict(self.log_counter.counts)
            s["pw_log_first"] = dict(self.log_counter.first)
            if self.log_counter.counts.get("ERROR") or self.log_counter.counts.get("CRITICAL"):
                problems.append(f"poolwatch logged errors: {self.log_counter.first}")

        if self.prom:
            from prometheus_client.parser import text_string_to_metric_families  # noqa: PLC0415

            text = exported["prometheus_text"].decode()
            sums: Counter[str] = Counter()
            for family in text_string_to_metric_families(text):
                for sample in family.samples:
                    sums[sample.name] += sample.value
            s["prom_bytes"] = len(text)
            expect("prom_requests_total", int(sums["poolwatch_pool_requests_total"]), sent)
            expect(
                "prom_time_in_queue_count",
                int(sums["http_client_request_time_in_queue_seconds_count"]),
                sent,
            )
            expect(
                "prom_connections_created_total",
                int(sums["poolwatch_pool_connections_created_total"]),
                s.get("pw_connections_created_total"),
            )

        if self.otel_sdk:
            assert self.exporter is not None
            s["spans_flushed"] = exported["flushed"]
            if not exported["flushed"]:
                problems.append("force_flush() returned False")
            spans = dict(self.exporter.by_kind)
            s["spans_exported"] = spans
            totals = _metric_totals(exported["metrics_data"])
            s["otel_metrics"] = {
                k: v
                for k, v in totals.items()
                if k
                in (
                    "http.client.duration",
                    "http.client.request.duration",
                    "poolwatch.pool.requests",
                    "poolwatch.request.duration",
                    "http.client.request.time_in_queue",
                )
            }
            httpx_scope = "opentelemetry.instrumentation.httpx"
            httpx_spans = sum(n for k, n in spans.items() if k.startswith(httpx_scope + "|"))
            pw_client = sum(n for k, n in spans.items() if k.startswith("poolwatch|CLIENT|"))
            pw_wait = sum(
                n for k, n in spans.items() if k.startswith("poolwatch|INTERNAL|wait_for_conn")
            )
            s["spans_wait_for_connection"] = pw_wait
            if self.otel_httpx:
                expect("spans_otel_httpx", httpx_spans, sent)
                expect(
                    "otel_httpx_duration_count",
                    int(
                        totals.get("http.client.duration", 0)
                        or totals.get("http.client.request.duration", 0)
                    ),
                    sent,
                )
            if self.poolwatch_otel:
                # Its own CLIENT span only when no other instrumentation made one.
                expect("spans_poolwatch_client", pw_client, 0 if self.otel_httpx else sent)
                expect("spans_with_pool_name", self.exporter.enriched, sent)
                expect("otel_pw_requests", int(totals.get("poolwatch.pool.requests", 0)), sent)
                # The default: per-request histograms off, the pool's queue wait on.
                expect(
                    "otel_pw_time_in_queue_count",
                    int(totals.get("http.client.request.time_in_queue", 0)),
                    sent,
                )
            unexpected = {
                k: n
                for k, n in spans.items()
                if not k.startswith((httpx_scope + "|", "poolwatch|"))
            }
            if unexpected:
                problems.append(f"unexpected spans {unexpected}")

        s["ok"] = not problems
        s["problems"] = problems
        return s


def _metric_totals(data: Any) -> dict[str, float]:
    """Per metric name: sum of a Sum's points, or count of a Histogram's points."""
    totals: Counter[str] = Counter()
    if data is None:
        return {}
    for rm in data.resource_metrics:
        for sm in rm.scope_metrics:
            for metric in sm.metrics:
                for point in metric.data.data_points:
                    if hasattr(point, "bucket_counts"):
                        totals[metric.name] += point.count
                    elif hasattr(point, "value"):
                        totals[metric.name] += point.value
    return dict(totals)


# -- driving requests --------------------------------------------------------------------


class Driver:
    def __init__(self, client: Any, url: str, concurrency: int) -> None:
        self.client = client
        self.url = url
        self.concurrency = concurrency
        self.sent = 0
        self.errors = 0
        self.error_types: Counter[str] = Counter()

    async def _one(self) -> None:
        try:
            r = await self.client.get(self.url)
            if r.status_code != 200 or len(r.content) != BODY_LENGTH:
                self.errors += 1
                self.error_types[f"status {r.status_code} len {len(r.content)}"] += 1
        except Exception as exc:
            self.errors += 1
            self.error_types[type(exc).__name__] += 1
        self.sent += 1

    async def warm_up(self, requests: int, seconds: float) -> int:
        start_sent = self.sent
        budget = requests
        deadline = time.perf_counter() + seconds

        async def worker() -> None:
            nonlocal budget
            while budget > 0 or time.perf_counter() < deadline:
                budget -= 1
                await self._one()

        await asyncio.gather(*(worker() for _ in range(self.concurrency)))
        return self.sent - start_sent

    async def timed(self, n: int) -> tuple[float, float]:
        """Send n requests; returns (process_time, perf_counter) when half of them were done."""
        budget = n
        done = 0
        half = n // 2
        mid = (0.0, 0.0)

        async def worker() -> None:
            nonlocal budget, done, mid
            while budget > 0:
                budget -= 1
                await self._one()
                done += 1
                if done == half:
                    mid = (time.process_time(), time.perf_counter())

        await asyncio.gather(*(worker() for _ in range(self.concurrency)))
        return mid


def _gc_counts() -> list[int]:
    return [g["collections"] for g in gc.get_stats()]


async def run(args: argparse.Namespace) -> dict[str, Any]:
    base, family = parse_variant(args.variant)
    setup = Setup(base, family, args.concurrency)
    driver = Driver(setup.client, args.url, args.concurrency)
    async with setup.client:
        warm_seconds = args.warmup_seconds if args.concurrency > 1 else 0.0
        t0 = time.perf_counter()
        warm_sent = await driver.warm_up(args.warmup_requests, warm_seconds)
        warm_wall = time.perf_counter() - t0
        warm_errors = driver.errors
        gc.collect()

        pool_start = setup.pool_size()
        gc0 = _gc_counts()
        wall0, cpu0, main0 = time.perf_counter(), time.process_time(), time.thread_time()
        mid_cpu, mid_wall = await driver.timed(args.requests)
        wall1, cpu1 = time.perf_counter(), time.process_time()
        exported = setup.export()
        wall2, cpu2, main2 = time.perf_counter(), time.process_time(), time.thread_time()
        gc1 = _gc_counts()
        pool_end = setup.pool_size()

        n = args.requests
        half = n // 2
        first = (mid_cpu - cpu0) / half if half else float("nan")
        second = (cpu1 - mid_cpu) / (n - half) if n - half else float("nan")
        sanity = setup.sanity(exported, driver.sent, driver.errors)
    wall = wall2 - wall0
    cpu = cpu2 - cpu0
    try:
        import sniffio  # noqa: F401, PLC0415

        has_sniffio = True
    except ImportError:
        has_sniffio = False
    return {
        "variant": args.variant,
        "base": base,
        "family": family,
        "concurrency": args.concurrency,
        "requests": n,
        "wall_s": round(wall, 4),
        "cpu_s": round(cpu, 4),
        "cpu_us_per_req": round(cpu / n * 1e6, 2),
        "req_per_s": round(n / wall, 1),
        "cpu_utilisation": round(cpu / wall, 3),
        "other_threads_cpu_us_per_req": round(((cpu2 - cpu0) - (main2 - main0)) / n * 1e6, 2),
        "export_cpu_us": round((cpu2 - cpu1) * 1e6, 1),
        "export_wall_us": round((wall2 - wall1) * 1e6, 1),
        "drift": round(second / first, 3) if first else None,
        "gc_collections": [b - a for a, b in zip(gc0, gc1, strict=True)],
        "pool_start": pool_start,
        "pool_end": pool_end,
        "warmup_requests": warm_sent,
        "warmup_wall_s": round(warm_wall, 2),
        "warmup_errors": warm_errors,
        "error_types": dict(driver.error_types),
        "sanity": sanity,
        "sniffio": has_sniffio,
        "loop": type(asyncio.get_running_loop()).__module__,
        "python": sys.version.split()[0],
        "pid": os.getpid(),
        "mid_wall_fraction": round((mid_wall - wall0) / (wall1 - wall0), 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description="One benchmark run of one variant.",
        epilog="Variants: " + ", ".join(all_variants()),
    )
    parser.add_argument("--variant", required=True)
    parser.add_argument("--concurrency", type=int, required=True)
    parser.add_argument("--requests", type=int, required=True, help="timed requests")
    parser.add_argument("--url", required=True)
    parser.add_argument("--warmup-requests", type=int, default=1000)
    parser.add_argument(
        "--warmup-seconds",
        type=float,
        default=6.0,
        help="minimum warm-up time when concurrency > 1 (httpcore's pool settles after the "
        "5 s keep-alive expiry)",
    )
    args = parser.parse_args()
    parse_variant(args.variant)
    if args.concurrency < 1 or args.requests < 2:
        raise SystemExit("--concurrency must be >= 1 and --requests >= 2")
    result = asyncio.run(run(args))
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
