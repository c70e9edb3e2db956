"""A worker process for the multiprocess test: traffic through an instrumented client, one
response held open, figures pushed to the multiprocess files, then wait for stdin."""

from __future__ import annotations

import sys

import httpx

import poolwatch
import poolwatch.prometheus
from poolwatch._multiprocess import MultiprocessPusher


def main() -> None:
    url, requests = sys.argv[1], int(sys.argv[2])
    poolwatch.prometheus.enable()  # PROMETHEUS_MULTIPROC_DIR is set: push mode
    client = poolwatch.instrument(
        httpx.Client(limits=httpx.Limits(max_connections=2)), name="workers"
    )
    for _ in range(requests):
        client.get(f"{url}/ok").raise_for_status()
    held = client.send(
        client.build_request("GET", f"{url}/stream?chunks=2&size=10&delay=30"), stream=True
    )
    pusher = MultiprocessPusher._instance
    assert pusher is not None
    pusher.push()
    print("ready", flush=True)
    sys.stdin.readline()
    held.close()
    client.close()


if __name__ == "__main__":
    main()
