"""Client CPU per request with no network at all: an in-process stub behind httpcore's pool.

    python bench/stub.py --family httpx2 --variant poolwatch-prom
    python bench/stub.py --family httpx2 --variant bare --instructions --seed 0

httpcore's pool gets a network backend whose streams answer every request at once with a
canned 200 (73-byte body, keep-alive), so a request costs only the client's Python: no
sockets, no kernel, no server sharing the machine. Everything above the socket is httpx's and
httpcore's own (h11, the pool, anyio's locks and their checkpoints). What it cannot show:
what a real socket adds (readiness waits, the event loop's selector, the kernel's share of
the CPU); ``paired.py`` and ``instructions.py`` measure that.

Default: ``--rounds`` timed rounds of ``--requests`` requests after a warm-up, CPU per request
(``time.process_time()``) for each. ``--instructions``: run this script twice under valgrind's
callgrind, N and 3N requests, and print the difference per request: exact, ~2 minutes, and free
of start-up. A fixed ``PYTHONHASHSEED`` (``--seed``) makes two variants hash strings alike.

Variants: ``bare``; ``poolwatch-prom`` (``instrument()`` + ``prometheus.enable()``, the
saturation sampler off); ``trace-floor`` (a no-op async trace callback on every request).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import importlib
import os
import sys
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)  # measure the working tree's poolwatch

VARIANTS = ("bare", "poolwatch-prom", "trace-floor")
RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 73\r\n\r\n" + b"x" * 73


def _client(family: str, variant: str) -> tuple[Any, dict[str, Any]]:
    """The variant's ``AsyncClient`` over the stub network, and the ``get()`` keywords."""
    hx = importlib.import_module(family)
    hc = importlib.import_module("httpcore" if family == "httpx" else "httpcore2")

    class Stream(hc.AsyncNetworkStream):
        def __init__(self) -> None:
            self.pending: list[bytes] = []

        async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
            return self.pending.pop() if self.pending else b""

        async def write(self, buffer: bytes, timeout: float | None = None) -> None:
            if buffer.endswith(b"\r\n\r\n"):  # a GET's head: answer it
                self.pending.append(RESPONSE)

        async def aclose(self) -> None:
            pass

        def get_extra_info(self, info: str) -> Any:
            return None

    class Backend(hc.AsyncNetworkBackend):
        async def connect_tcp(self, *args: Any, **kwargs: Any) -> Stream:
            return Stream()

        async def sleep(self, seconds: float) -> None:
            await asyncio.sleep(seconds)

    transport = hx.AsyncHTTPTransport()
    transport._pool = hc.AsyncConnectionPool(network_backend=Backend())
    client = hx.AsyncClient(transport=transport)
    if variant == "poolwatch-prom":
        from prometheus_client import CollectorRegistry  # noqa: PLC0415

        import poolwatch  # noqa: PLC0415
        import poolwatch.prometheus  # noqa: PLC0415

        poolwatch.instrument(client, name="stub", saturation_threshold=None)
        poolwatch.prometheus.enable(CollectorRegistry())
    if variant == "trace-floor":

        async def trace(name: str, info: dict[str, Any]) -> None:
            pass

        return client, {"extensions": {"trace": trace}}
    return client, {}


async def _run(family: str, variant: str, requests: int, rounds: int, warmup: int) -> list[float]:
    client, kwargs = _client(family, variant)
    url = "http://127.0.0.1:9/"  # never connected to: the stub backend answers
    for _ in range(warmup):
        (await client.get(url, **kwargs)).raise_for_status()
    gc.collect()
    cpu = []
    for _ in range(rounds):
        start = time.process_time()
        for _ in range(requests):
            (await client.get(url, **kwargs)).raise_for_status()
        cpu.append((time.process_time() - start) / requests * 1e6)
    return cpu


def _instructions(family: str, variant: str, requests: int, seed: int) -> float:
    from instructions import callgrind  # noqa: PLC0415 (bench/, on the path as the script's)

    args = [__file__, "--family", family, "--variant", variant, "--rounds", "1"]
    small = callgrind([*args, "--requests", str(requests)], seed)
    large = callgrind([*args, "--requests", str(3 * requests)], seed)
    return (large - small) / (2 * requests)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=("httpx", "httpx2"), default="httpx2")
    parser.add_argument("--variant", choices=VARIANTS, default="poolwatch-prom")
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2000)
    parser.add_argument("--instructions", action="store_true", help="count under valgrind")
    parser.add_argument("--seed", type=int, default=0, help="PYTHONHASHSEED for --instructions")
    args = parser.parse_args()
    if args.instructions:
        per_request = _instructions(args.family, args.variant, args.requests // 4, args.seed)
        print(f"{args.family} {args.variant} seed {args.seed}: {per_request:,.0f} instructions")
        return
    cpu = asyncio.run(_run(args.family, args.variant, args.requests, args.rounds, args.warmup))
    print(f"{args.family} {args.variant}: " + " ".join(f"{c:.1f}" for c in cpu) + " µs/request")


if __name__ == "__main__":
    main()
