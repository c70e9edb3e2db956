"""A keep-alive HTTP/1.1 loopback server for the benchmarks, as cheap as a Python server gets.

    python bench/server.py                      # 127.0.0.1, a free port
    python bench/server.py --host 127.0.0.1 --host 127.0.0.2 --port 0

It prints the port on its first line of stdout, then a JSON line describing itself, and serves
until SIGTERM / SIGINT. Every address given with ``--host`` is bound on the same port (the whole
of 127.0.0.0/8 is loopback on Linux), so one server can stand for several origins.

A raw ``asyncio.Protocol`` (on uvloop when it is importable): it does not parse requests, it
counts the ``\\r\\n\\r\\n`` that end their headers and writes one precomputed response per
terminator, so pipelined requests are answered in order. The benchmarks only send GETs without
a body. Every response is ``200``, ``Connection: keep-alive``, with the same 73-byte JSON body.

One extra: a connection whose first bytes are ``GET /__stats`` gets the server's counters as
JSON and is closed. The runner reads them before and after each client run, to check the
client's request count and poolwatch's connection count against what the server saw. It is
checked once per connection, never per request, and such connections are not counted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import sys
import time

BODY = b'{"id":"bench","object":"chat.completion","ok":true,"choices":[],"n":1234}'
assert len(BODY) == 73, len(BODY)
RESPONSE = (
    b"HTTP/1.1 200 OK\r\n"
    b"content-type: application/json\r\n"
    b"content-length: 73\r\n"
    b"connection: keep-alive\r\n"
    b"\r\n" + BODY
)
TERMINATOR = b"\r\n\r\n"
STATS_PREFIX = b"GET /__stats"

#: Counters since start: connections accepted (stats ones excluded), requests answered,
#: connections open now.
stats = {"connections": 0, "requests": 0, "open": 0}


class BenchProtocol(asyncio.Protocol):
    __slots__ = ("first", "tail", "transport")

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.tail = b""
        self.first = True

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        transport = self.transport
        assert transport is not None
        if self.first:
            self.first = False
            if data.startswith(STATS_PREFIX):
                body = json.dumps({**stats, "pid": os.getpid(), "time": time.time()}).encode()
                transport.write(
                    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                    b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(body), body)
                )
                transport.close()
                return
            stats["connections"] += 1
            stats["open"] += 1
        # A terminator split across two reads is found in the last 3 bytes + the new data; one
        # wholly inside the previous read cannot fit in 3 bytes, so none is counted twice.
        buf = self.tail + data if self.tail else data
        n = buf.count(TERMINATOR)
        self.tail = buf[-3:]
        if n:
            stats["requests"] += n
            transport.write(RESPONSE * n if n > 1 else RESPONSE)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.first:
            stats["open"] -= 1
        self.transport = None


def _loop_name() -> str:
    try:
        import uvloop  # noqa: F401, PLC0415
    except ImportError:
        return "asyncio"
    return "uvloop"


async def serve(hosts: list[str], port: int) -> None:
    loop = asyncio.get_running_loop()
    servers = []
    for host in hosts:
        server = await loop.create_server(BenchProtocol, host, port, backlog=1024)
        servers.append(server)
        if port == 0:
            port = server.sockets[0].getsockname()[1]
    print(port, flush=True)
    print(
        json.dumps({"port": port, "hosts": hosts, "loop": _loop_name(), "pid": os.getpid()}),
        flush=True,
    )
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    for server in servers:
        server.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--host",
        action="append",
        help="address to bind (repeatable; all on the same port). Default 127.0.0.1",
    )
    parser.add_argument("--port", type=int, default=0, help="0: any free port (default)")
    args = parser.parse_args()
    hosts = args.host or ["127.0.0.1"]
    for host in hosts:
        if not host.startswith("127."):
            sys.exit(f"server.py binds loopback addresses only, not {host!r}")
    if _loop_name() == "uvloop":
        import uvloop  # noqa: PLC0415

        uvloop.run(serve(hosts, args.port))
    else:
        asyncio.run(serve(hosts, args.port))


if __name__ == "__main__":
    main()
