"""Bytecodes poolwatch runs per request, by function: where its request-path cost is.

Exact and repeatable (an opcode trace counts instructions of the interpreter, not time), and
fast: seconds, against minutes for ``instructions.py``. It sees only Python frames whose code
lives in the ``poolwatch`` package, so it says where to cut, not what a request costs in all:
what poolwatch calls into C (locks, clocks) or other packages (the OTel SDK) is not in it.
Run ``python bench/opcodes.py --url http://127.0.0.1:PORT/`` against ``bench/server.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import importlib
import os
import sys
from types import FrameType
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)  # measure the working tree's poolwatch

import poolwatch  # noqa: E402
import poolwatch.prometheus  # noqa: E402

PACKAGE = os.path.join(ROOT, "poolwatch") + os.sep


def _enable_otel() -> None:
    """OTel metrics and spans through SDK providers, as ``run.py``'s OTel variants."""
    from opentelemetry.sdk.metrics import MeterProvider  # noqa: PLC0415
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader  # noqa: PLC0415
    from opentelemetry.sdk.trace import TracerProvider  # noqa: PLC0415
    from opentelemetry.sdk.trace.export import BatchSpanProcessor  # noqa: PLC0415
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import (  # noqa: PLC0415
        InMemorySpanExporter,
    )

    import poolwatch.otel  # noqa: PLC0415

    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(BatchSpanProcessor(InMemorySpanExporter()))
    meter_provider = MeterProvider(metric_readers=[InMemoryMetricReader()])
    poolwatch.otel.enable(meter_provider, tracer_provider)


def count(
    family: str, url: str, requests: int, *, otel: bool, concurrency: int = 1
) -> tuple[Any, Any]:
    """(bytecodes, calls) per ``file:function`` over ``requests`` requests, after a warm-up."""
    from prometheus_client import CollectorRegistry  # noqa: PLC0415

    hx = importlib.import_module(family)
    poolwatch.prometheus.enable(CollectorRegistry())
    if otel:
        _enable_otel()
    opcodes: collections.Counter[str] = collections.Counter()
    calls: collections.Counter[str] = collections.Counter()

    def trace(frame: FrameType, event: str, arg: object) -> Any:
        del arg
        code = frame.f_code
        if not code.co_filename.startswith(PACKAGE):
            return None
        site = f"{os.path.basename(code.co_filename)}:{code.co_name}"
        calls[site] += 1  # a coroutine counts once per resumption

        def local(frame: FrameType, event: str, arg: object) -> Any:
            del frame, arg
            if event == "opcode":
                opcodes[site] += 1
            return local

        frame.f_trace_opcodes = True
        return local

    async def worker(client: Any, n: int) -> None:
        for _ in range(n):
            (await client.get(url)).raise_for_status()

    async def send(client: Any, n: int) -> None:
        # ``concurrency`` workers share the n requests (a pool of as many connections).
        share, rest = divmod(n, concurrency)
        sizes = [share + (i < rest) for i in range(concurrency)]
        await asyncio.gather(*(worker(client, size) for size in sizes))

    async def main() -> None:
        limits = hx.Limits(max_connections=concurrency)
        transport = hx.AsyncHTTPTransport(limits=limits)
        async with hx.AsyncClient(transport=transport) as client:
            poolwatch.instrument(client, saturation_threshold=None)
            await send(client, 100 * concurrency)  # warm: connections open, caches filled
            sys.settrace(trace)
            try:
                await send(client, requests)
            finally:
                sys.settrace(None)

    asyncio.run(main())
    return opcodes, calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True, help="bench/server.py's URL")
    parser.add_argument("--family", choices=["httpx", "httpx2"], default="httpx")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--otel", action="store_true", help="also OTel metrics and spans")
    parser.add_argument("--concurrency", type=int, default=1, help="workers, and connections")
    args = parser.parse_args()
    opcodes, calls = count(
        args.family, args.url, args.requests, otel=args.otel, concurrency=args.concurrency
    )
    n = args.requests
    what = "Prometheus + OTel" if args.otel else "Prometheus"
    where = (
        "one keep-alive connection"
        if args.concurrency == 1
        else f"{args.concurrency} workers sharing a pool of {args.concurrency}"
    )
    print(f"{args.family}, poolwatch + {what}, {n} requests on {where}:")
    print(
        f"{sum(opcodes.values()) / n:,.0f} bytecodes and "
        f"{sum(calls.values()) / n:.1f} frame entries per request in poolwatch's own code\n"
    )
    print("| bytecodes / request | entries / request | function |")
    print("|---|---|---|")
    for site, ops in opcodes.most_common():
        print(f"| {ops / n:.0f} | {calls[site] / n:.1f} | `{site}` |")


if __name__ == "__main__":
    main()
