"""Bytecodes one ``/metrics`` scrape of 100 pools x 5 origins runs, by function and line.

The render bench (``micro.py --part render``) times the same scrape, but its wall time moves by
a third between runs on this VM; an opcode trace counts the interpreter's instructions, the
same every run, so it tells whether a change to the read or the writer cut anything. It counts
poolwatch's frames and the httpcore methods they call (C work, such as formatting numbers, is
not in it). The scrape reads every pool and writes the page (``Exposition.render`` of every
snapshot) after traffic reached every origin of every pool; ``--busy`` holds a response open in
every pool while it reads them; ``--churn`` (with ``--busy``) has each pool close a connection
and open another since the last scrape, so every pool's connections are walked again (the
worst case).

Start ``bench/server.py`` bound to five loopback addresses on one port, then::

    python bench/server.py --port 8931 --host 127.0.0.1 ... --host 127.0.0.5 &
    python bench/scrape_opcodes.py --port 8931 [--family httpx2] [--busy [--churn]]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import gc
import logging
import os
import sys
from types import FrameType
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for path in (ROOT, HERE):
    if path not in sys.path:
        sys.path.insert(0, path)  # measure the working tree's poolwatch

import micro  # noqa: E402

import poolwatch  # noqa: E402
import poolwatch.prometheus  # noqa: E402
from poolwatch._samples import every_snapshot  # noqa: E402

Counts = collections.Counter[tuple[str, str]]


def _where(frame: FrameType) -> str:
    name = frame.f_code.co_filename
    return name.split("site-packages" + os.sep)[-1].replace(ROOT + os.sep, "")


def _tracer(by_function: Counts, by_line: Counts) -> Any:
    def trace(frame: FrameType, event: str, arg: Any) -> Any:
        frame.f_trace_opcodes = True
        frame.f_trace_lines = False
        if event == "opcode":
            where = _where(frame)
            by_function[where, frame.f_code.co_name] += 1
            by_line[f"{where}:{frame.f_lineno}", frame.f_code.co_name] += 1
        return trace

    return trace


async def run(args: argparse.Namespace) -> None:
    urls = micro._urls(args.port)
    clients = []
    for i in range(args.pools):
        client = micro._client(args.family, 10)
        poolwatch.instrument(client, name=f"pool-{i:03d}")
        clients.append(client)
    exposition = poolwatch.prometheus._exposition

    async def traffic(per_origin: int) -> None:
        for client in clients:
            gets = [micro._get(client, url) for url in urls for _ in range(2 * per_origin)]
            await asyncio.gather(*gets)

    # Warm up: the pools settle on their connections (the first rounds open and close some),
    # and each pool's text exists, as on a server scraped for a while.
    async def hold() -> list[Any]:
        return [await c.send(c.build_request("GET", urls[0]), stream=True) for c in clients]

    await traffic(10)
    for _ in range(2):
        await traffic(1)
        held = await hold() if args.busy else []
        exposition.render(list(every_snapshot("bench")))
        for response in held:
            if not args.churn:
                await response.aread()  # else closed unread: httpcore closes its connection
            await response.aclose()
    await traffic(1)
    held = await hold() if args.busy else []
    gc.collect()
    by_function: Counts = collections.Counter()
    by_line: Counts = collections.Counter()
    sys.settrace(_tracer(by_function, by_line))
    try:
        page = exposition.render(list(every_snapshot("bench")))
    finally:
        sys.settrace(None)
    for response in held:
        await response.aclose()
    for client in clients:
        await client.aclose()
    total = sum(by_function.values())
    kind = "busy (a request in flight in each pool)" if args.busy else "all moved, between requests"
    if args.churn:
        kind += ", a connection replaced in each pool since the last scrape"
    print(
        f"{args.family}, {args.pools} pools x {len(urls)} origins, {kind}: "
        f"{total:,} bytecodes for one scrape ({len(page):,} bytes)"
    )
    for (where, name), n in by_function.most_common(args.top):
        print(f"{n:>9,} {n / total:6.1%}  {name} ({where})")
    print("by line:")
    for (where, name), n in by_line.most_common(args.top):
        print(f"{n:>9,} {n / total:6.1%}  {where} {name}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True, help="bench/server.py's port")
    parser.add_argument("--family", choices=["httpx", "httpx2"], default="httpx")
    parser.add_argument("--pools", type=int, default=100)
    parser.add_argument("--busy", action="store_true", help="a request in flight in each pool")
    parser.add_argument(
        "--churn",
        action="store_true",
        help="with --busy: each pool closed a connection and opened another since the last scrape",
    )
    parser.add_argument("--top", type=int, default=25, help="functions and lines to list")
    args = parser.parse_args()
    logging.disable(logging.WARNING)  # the saturation warnings of the traffic bursts
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
