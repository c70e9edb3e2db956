"""Per-request instruction counts under valgrind: a noise-free view of poolwatch's cost.

CPU time on a shared VM moves by several per cent between identical runs; instructions do
not. Each variant runs twice under ``valgrind --tool=callgrind`` (N and 3N requests through
one keep-alive connection); the difference divided by 2N is the per-request count, free of
interpreter start-up and imports. Run: ``python bench/instructions.py --url http://127.0.0.1:PORT/``
against ``bench/server.py`` (started separately, not under valgrind). Slow: minutes per run.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from prometheus_client import CollectorRegistry

import poolwatch
import poolwatch.prometheus

VARIANTS = ("bare", "poolwatch-prom")


def client(family: str, variant: str, url: str, requests: int) -> None:
    hx = importlib.import_module(family)
    if variant != "bare":
        poolwatch.prometheus.enable(CollectorRegistry())

    async def main() -> None:
        transport = hx.AsyncHTTPTransport(limits=hx.Limits(max_connections=1))
        async with hx.AsyncClient(transport=transport) as c:
            if variant != "bare":
                poolwatch.instrument(c, saturation_threshold=None)
            for _ in range(requests):
                (await c.get(url)).raise_for_status()

    asyncio.run(main())


def count(family: str, variant: str, url: str, requests: int) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "callgrind.out"
        cmd = [
            "valgrind", "--tool=callgrind", f"--callgrind-out-file={out}",
            sys.executable, __file__, "--client", family, variant, url, str(requests),
        ]  # fmt: skip
        result = subprocess.run(cmd, capture_output=True, text=True, check=True)
        found = re.search(r"Collected : (\d+)", result.stderr)
        if not found:
            raise RuntimeError(result.stderr[-2000:])
        return int(found.group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="bench/server.py's URL (required unless --client)")
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--client", nargs=4, metavar=("FAMILY", "VARIANT", "URL", "N"))
    args = parser.parse_args()
    if args.client:
        family, variant, url, n = args.client
        client(family, variant, url, int(n))
        return
    if not args.url:
        parser.error("--url is required")
    n = args.requests
    rows = []
    for family in ("httpx", "httpx2"):
        per_request = {}
        for variant in VARIANTS:
            small = count(family, variant, args.url, n)
            large = count(family, variant, args.url, 3 * n)
            per_request[variant] = (large - small) / (2 * n)
        bare = per_request["bare"]
        for variant, instructions in per_request.items():
            rows.append({
                "family": family, "variant": variant,
                "instructions_per_request": round(instructions),
                "ratio_vs_bare": round(instructions / bare, 4),
            })  # fmt: skip
            print(json.dumps(rows[-1]), flush=True)
    print("\n| family | variant | instructions / request | ratio vs bare |")
    print("|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['family']} | {r['variant']} | {r['instructions_per_request']:,} "
            f"| {r['ratio_vs_bare']:.3f} |"
        )


if __name__ == "__main__":
    main()
