"""Which of the host's specialised bytecodes poolwatch turns back into generic ones.

CPython 3.11+ specialises each attribute read and method call after a few runs
(``LOAD_ATTR_INSTANCE_VALUE``, ``LOAD_METHOD_WITH_VALUES``); an object whose ``__dict__`` was
read, or that carries an instance attribute under a method's name, makes those sites fall back
to generic lookups (``..._ADAPTIVE``, ``..._WITH_DICT``, ``..._WITH_HINT``) for every request
after. The cost lands in httpcore's own frames, where no profiler of poolwatch's code sees it.

A bare client and a poolwatch client each send ``--requests`` requests (``--concurrency``
workers) in their own process; then every function of httpx, httpcore, h11 and anyio is
disassembled with its specialised instructions, and the sites where the two differ are
printed. Expected, and unavoidable with instance patches: the calls of the patched methods
themselves (``handle_async_request``, ``_response_closed``). Run
``python bench/adaptive.py --url http://127.0.0.1:PORT/`` against ``bench/server.py``; seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import dis
import importlib
import json
import os
import subprocess
import sys
import types
from collections.abc import Iterator

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
#: The host's packages whose bytecode is compared.
HOST = ("httpx", "httpcore", "httpx2", "httpcore2", "h11", "h2", "anyio")


def _functions(module: types.ModuleType) -> Iterator[types.FunctionType]:
    """Every function defined in ``module``: module level, methods and properties."""
    for value in vars(module).values():
        if isinstance(value, types.FunctionType) and value.__module__ == module.__name__:
            yield value
        elif isinstance(value, type) and value.__module__ == module.__name__:
            for attr in vars(value).values():
                func = attr.fget if isinstance(attr, property) else getattr(attr, "__func__", attr)
                if isinstance(func, types.FunctionType):
                    yield func


def sites(
    family: str, url: str, requests: int, concurrency: int, instrumented: bool
) -> dict[str, str]:
    """``module:function:offset`` -> specialised instruction, after ``requests`` requests
    sent by ``concurrency`` workers through a pool of as many connections."""
    sys.path.insert(0, ROOT)  # the working tree's poolwatch
    hx = importlib.import_module(family)

    async def main() -> None:
        limits = hx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        transport = hx.AsyncHTTPTransport(limits=limits)
        async with hx.AsyncClient(transport=transport) as client:
            if instrumented:
                import poolwatch  # noqa: PLC0415

                poolwatch.instrument(client, saturation_threshold=None)
            left = requests

            async def worker() -> None:
                nonlocal left
                while left > 0:
                    left -= 1
                    (await client.get(url)).raise_for_status()
                    if instrumented and left == requests // 2:
                        poolwatch.snapshot(client)  # a scrape, as Prometheus makes them

            await asyncio.gather(*(worker() for _ in range(concurrency)))

    asyncio.run(main())
    found: dict[str, str] = {}
    for name, module in list(sys.modules.items()):
        if module is None or name.partition(".")[0] not in HOST:
            continue
        for func in _functions(module):
            where = f"{name}:{func.__qualname__}"
            for ins in dis.get_instructions(func.__code__, adaptive=True):  # type: ignore[call-arg]
                found[f"{where}:{ins.offset}"] = f"{ins.opname} {ins.argval}"
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True, help="bench/server.py's URL")
    parser.add_argument("--family", choices=["httpx", "httpx2"], default="httpx2")
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--child", choices=["bare", "poolwatch"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        found = sites(
            args.family, args.url, args.requests, args.concurrency, args.child == "poolwatch"
        )
        json.dump(found, sys.stdout)
        return
    runs = {}
    for child in ("bare", "poolwatch"):
        out = subprocess.run(
            [
                sys.executable,
                *(__file__, "--url", args.url, "--family", args.family),
                *("--requests", str(args.requests), "--concurrency", str(args.concurrency)),
                *("--child", child),
            ],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        runs[child] = json.loads(out)
    bare, watched = runs["bare"], runs["poolwatch"]
    changed = [
        (site, bare[site], watched[site])
        for site in bare
        if site in watched
        and bare[site] != watched[site]
        and _worse(bare[site].split()[0], watched[site].split()[0])
    ]
    print(f"{args.family}, {args.requests} requests by {args.concurrency} workers each:")
    print(f"{len(changed)} sites specialised for the bare client and not for poolwatch's\n")
    print("| site | bare | poolwatch |")
    print("|---|---|---|")
    for site, was, now in changed:
        print(f"| `{site}` | `{was}` | `{now}` |")


#: Attribute and method accesses: the instructions an instance dictionary or patch can slow.
_FAMILIES = ("LOAD_ATTR", "LOAD_METHOD", "STORE_ATTR")
#: Their forms that look the name up generically, or through a dictionary.
_GENERIC = ("_ADAPTIVE", "_WITH_HINT", "_WITH_DICT")


def _worse(bare: str, watched: str) -> bool:
    """The bare client's access was specialised; the watched one's is generic or slower."""
    family = next((f for f in _FAMILIES if bare.startswith(f)), None)
    if family is None or bare == family or bare.endswith(_GENERIC):
        return False
    return watched == family or watched.endswith(_GENERIC)


if __name__ == "__main__":
    main()
