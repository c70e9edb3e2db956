"""Connection attempts per request at concurrency: why httpx costs twice httpx2 at C=32.

    python bench/attempts.py --url http://127.0.0.1:PORT/     # bench/server.py's URL

httpcore 1.0.9's pool hands a connection that just went idle to every queued request in one
assignment pass (an HTTP/1.1 connection stays "available" until a request starts on it): one
of them gets it, the others raise ``ConnectionNotAvailable`` inside the pool and go round its
retry loop again (encode/httpcore#822; httpcore2 assigns each idle connection once since
pydantic/httpx2#1075). No new connection is opened while one looks available, so the pool
stays small. This counts the passes of that loop per request (each one is a call of the
pool request's ``wait_for_connection``), with and without poolwatch, and what each client
ends with: the pool's size and its CPU per request.

poolwatch's connection hook runs on every pass, and undoes its bookkeeping when httpcore
raises ``ConnectionNotAvailable``: the count says how often it pays that.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import importlib
import logging
import time
from typing import Any

from client import Driver, Setup  # also puts the working tree's poolwatch first on the path

_COUNTERS: dict[str, list[int]] = {}


def _count_passes(family: str) -> list[int]:
    """Patch the pool request class of ``family``'s core (once): count
    ``wait_for_connection``."""
    if family in _COUNTERS:
        return _COUNTERS[family]
    core = importlib.import_module("httpcore" if family == "httpx" else "httpcore2")
    cls: Any = core._async.connection_pool.AsyncPoolRequest
    counter = [0]
    original = cls.wait_for_connection

    async def wait_for_connection(self: Any, timeout: float | None = None) -> Any:
        counter[0] += 1
        return await original(self, timeout)

    cls.wait_for_connection = wait_for_connection
    _COUNTERS[family] = counter
    return counter


async def _run(
    family: str, variant: str, url: str, concurrency: int, requests: int, warmup: float
) -> dict[str, Any]:
    base = variant.removesuffix("-httpx2")
    setup = Setup(base, family, concurrency, saturation_threshold=None)
    passes = _count_passes(family)
    driver = Driver(setup.client, url, concurrency)
    async with setup.client:
        await driver.warm_up(1000, warmup)  # past httpcore's 5 s keep-alive expiry
        gc.collect()
        passes[0] = 0
        cpu = time.process_time()
        await driver.timed(requests)
        cpu = time.process_time() - cpu
        connections = len(setup.pool.connections)
    if driver.errors:
        raise RuntimeError(f"{variant}: failed requests {dict(driver.error_types)}")
    if setup.log_counter is not None:  # one process runs every variant: detach it
        logging.getLogger("poolwatch").removeHandler(setup.log_counter)
        if setup.log_counter.counts.get("ERROR"):
            raise RuntimeError(f"{variant}: poolwatch logged {setup.log_counter.first}")
    return {
        "family": family,
        "variant": variant,
        "passes": passes[0] / requests,
        "connections": connections,
        "cpu_us": cpu / requests * 1e6,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", required=True, help="bench/server.py's URL")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--requests", type=int, default=4000)
    parser.add_argument("--warmup-seconds", type=float, default=6.0)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    logging.getLogger("poolwatch").setLevel(logging.ERROR)  # saturation warnings, expected

    print(f"C={args.concurrency}, {args.requests:,} timed requests per run, one process\n")
    print("| client | variant | pool passes per request | connections at the end | CPU µs/req |")
    print("|---|---|---|---|---|")
    for _ in range(args.rounds):
        for family in ("httpx", "httpx2"):
            for base in ("bare", "poolwatch-prom"):
                variant = base if family == "httpx" else f"{base}-httpx2"
                row = asyncio.run(
                    _run(
                        family,
                        variant,
                        args.url,
                        args.concurrency,
                        args.requests,
                        args.warmup_seconds,
                    )
                )
                print(
                    f"| {family} | {base} | {row['passes']:.2f} | {row['connections']} "
                    f"| {row['cpu_us']:.0f} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
