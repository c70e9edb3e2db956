"""Per-request instruction counts under valgrind: a noise-free view of poolwatch's cost.

CPU time on a shared VM moves by several per cent between identical runs; instructions do
not. Each variant runs twice under ``valgrind --tool=callgrind`` (N and 3N requests through
one keep-alive connection, or with ``--concurrency C`` shared by C workers through a pool of
C); the difference divided by 2N is the per-request count, free of interpreter start-up and
imports. Every thread counts (the OTel batch span processor's too).
The variants are ``client.py``'s, built by its ``Setup`` (poolwatch's saturation sampler off:
its once-a-second wake-ups would count by valgrind's slow clock), without the export step.
Run: ``python bench/instructions.py --url http://127.0.0.1:PORT/`` against ``bench/server.py``
(started separately, not under valgrind). ``--after-bare``: another client makes the process's
first connections, as the bare client's warm-up does in ``paired.py`` (what poolwatch adds to
httpcore's classes must fit their layout then too). Slow: minutes per run. "quotient" is a variant's
overhead over otel-httpx's, ``(variant - bare) / (otel-httpx - bare)``: the OTel target's measure.

Every client process runs with a fixed ``PYTHONHASHSEED`` (``--seeds``, default 0). A random
one gives each process its own string hashes, so its own dictionary probe lengths: an
in-process stub-network client counted 1,511,956 instructions per request with seed 0 and
1,500,916 with seed 1, a difference of a quarter of what poolwatch costs. A variant and bare
are compared at the same seed; ``--seeds 0,1,2`` pairs them over several layouts and reports
the median ratio with its range.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from client import Setup

VARIANTS = ("bare", "poolwatch-prom", "poolwatch-prom-otel", "otel-httpx")


def client(
    family: str,
    variant: str,
    url: str,
    requests: int,
    concurrency: int = 1,
    after_bare: bool = False,
) -> None:
    async def main() -> None:
        if after_bare:
            # The process's first connections are another client's, as in paired.py, where
            # the bare client warms up first: once ~28 connections exist, CPython 3.11 lets
            # one more attribute name into their class's shared layout, and poolwatch's
            # names must fit (tests/test_host_objects.py).
            async with Setup("bare", family, concurrency).client as first:
                await asyncio.gather(*(first.get(url) for _ in range(4 * concurrency)))
        setup = Setup(variant, family, concurrency, saturation_threshold=None)
        if setup.poolwatch_otel:
            # Valgrind runs ~50x slower in wall time, so waits of a fraction of a millisecond
            # would cross the 5 ms wait-span threshold and add a span to most requests; in the
            # CPU runs, 1 to 3 requests of 9,000 get one at C=1. Counted without them.
            import poolwatch.otel  # noqa: PLC0415 (the tree client.py put on the path)

            poolwatch.otel.WAIT_SPAN_THRESHOLD = math.inf
        left = requests

        async def worker() -> None:
            nonlocal left
            while left > 0:
                left -= 1
                (await c.get(url)).raise_for_status()

        async with setup.client as c:
            await asyncio.gather(*(worker() for _ in range(concurrency)))

    asyncio.run(main())


def callgrind(args: list[str], seed: int = 0) -> int:
    """Instructions valgrind's callgrind counts for ``python ARGS`` at ``PYTHONHASHSEED=seed``."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "callgrind.out"
        cmd = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", sys.executable]
        env = {**os.environ, "PYTHONHASHSEED": str(seed)}
        result = subprocess.run([*cmd, *args], capture_output=True, text=True, check=True, env=env)
        found = re.search(r"Collected : (\d+)", result.stderr)
        if not found:
            raise RuntimeError(result.stderr[-2000:])
        return int(found.group(1))


def count(
    family: str,
    variant: str,
    url: str,
    requests: int,
    concurrency: int = 1,
    seed: int = 0,
    after_bare: bool = False,
) -> int:
    args = [__file__, "--client", family, variant, url, str(requests)]
    args += ["--concurrency", str(concurrency)] + (["--after-bare"] if after_bare else [])
    return callgrind(args, seed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="bench/server.py's URL (required unless --client)")
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument(
        "--concurrency",
        type=int,
        default=1,
        help="workers sharing the requests, and the pool's limit (default 1)",
    )
    parser.add_argument("--family", choices=("httpx", "httpx2"), action="append")
    parser.add_argument("--variant", choices=VARIANTS, action="append")
    parser.add_argument(
        "--seeds",
        default="0",
        help="comma-separated PYTHONHASHSEED values; each variant is paired with bare per seed",
    )
    parser.add_argument(
        "--after-bare",
        action="store_true",
        help="another client makes the process's first 4 x C requests, as in paired.py",
    )
    parser.add_argument("--client", nargs=4, metavar=("FAMILY", "VARIANT", "URL", "N"))
    args = parser.parse_args()
    if args.client:
        family, variant, url, n = args.client
        client(family, variant, url, int(n), args.concurrency, args.after_bare)
        return
    if not args.url:
        parser.error("--url is required")
    n = args.requests
    rows = []
    variants = args.variant or VARIANTS
    if "bare" not in variants:
        variants = ["bare", *variants]
    seeds = [int(seed) for seed in args.seeds.split(",")]
    after = args.after_bare
    for family in args.family or ("httpx", "httpx2"):
        # per_request[variant][i]: instructions per request at seeds[i]
        per_request: dict[str, list[float]] = {}
        for variant in variants:
            for seed in seeds:
                small = count(family, variant, args.url, n, args.concurrency, seed, after)
                large = count(family, variant, args.url, 3 * n, args.concurrency, seed, after)
                per_request.setdefault(variant, []).append((large - small) / (2 * n))
        bare = per_request["bare"]
        otel_httpx = per_request.get("otel-httpx")
        for variant, counts in per_request.items():
            ratios = [c / b for c, b in zip(counts, bare, strict=True)]
            row = {
                "family": family, "concurrency": args.concurrency, "variant": variant,
                "seeds": seeds,
                "instructions_per_request": round(statistics.median(counts)),
                "by_seed": [round(c) for c in counts],
                "ratio_vs_bare": round(statistics.median(ratios), 4),
                "ratio_range": [round(min(ratios), 4), round(max(ratios), 4)],
            }  # fmt: skip
            if otel_httpx is not None and variant != "bare":
                # The OTel target's quotient: this variant's overhead over otel-httpx's.
                quotients = [
                    (c - b) / (o - b) for c, b, o in zip(counts, bare, otel_httpx, strict=True)
                ]
                row["overhead_vs_otel_httpx"] = round(statistics.median(quotients), 3)
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(
        f"\n(PYTHONHASHSEED {args.seeds}; with several seeds, medians and [min..max] over them)"
        + (", after another client's first connections" if after else "")
        + "\n\n| family | C | variant | instructions / request | ratio vs bare "
        "| overhead / otel-httpx's |"
    )
    print("|---|---|---|---|---|---|")
    for r in rows:
        q = r.get("overhead_vs_otel_httpx")
        low, high = r["ratio_range"]
        spread = f" [{low:.3f}..{high:.3f}]" if len(seeds) > 1 else ""
        print(
            f"| {r['family']} | {r['concurrency']} | {r['variant']} "
            f"| {r['instructions_per_request']:,} "
            f"| {r['ratio_vs_bare']:.3f}{spread} | {'' if q is None else f'{q:.2f}'} |"
        )


if __name__ == "__main__":
    main()
