"""``poolwatch top URL`` against a real exporter, a dead port, and pages that are not poolwatch's.

The pool in the main test is held still (requests parked on a slow route, one waiting, one
leaked) so that what ``top`` shows can be compared figure by figure with ``snapshot()``.
"""

from __future__ import annotations

import gc
import io
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry
from rich.console import Console

import poolwatch
import poolwatch.prometheus
from poolwatch._cli import main
from poolwatch._loopback import LoopbackRequest, LoopbackServer, Responder, default_routes
from poolwatch._top import parse, rows, run_top

ServerFactory = Callable[..., LoopbackServer]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _wait_until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.02)


@pytest.fixture
def exporter() -> Iterator[str]:
    """poolwatch's /metrics on a private registry, on a free loopback port."""
    server, thread = poolwatch.prometheus.start_http_server(0, registry=CollectorRegistry())
    yield f"http://127.0.0.1:{server.server_address[1]}/metrics"
    server.shutdown()
    server.server_close()
    thread.join(5)


def test_top_once_shows_the_pool_with_the_figures_of_its_snapshot(
    exporter: str, loopback_server: LoopbackServer
) -> None:
    base = loopback_server.url
    client = poolwatch.instrument(
        httpx.Client(limits=httpx.Limits(max_connections=4), trust_env=False),
        name="top-test-pool",
        saturation_threshold=None,
    )
    held: list[threading.Thread] = []
    try:
        for _ in range(10):
            client.get(f"{base}/ok").raise_for_status()
        # A streamed response dropped without being closed: one connection gone for good.
        leaked = client.send(client.build_request("GET", f"{base}/stream?chunks=3"), stream=True)
        del leaked
        gc.collect()
        # Three requests hold the other three connections; a fifth waits for one.
        for seconds in ("2.5", "2.5", "2.5", "0.01"):
            t = threading.Thread(target=client.get, args=(f"{base}/delay?s={seconds}",))
            t.start()
            held.append(t)
            if seconds == "0.01":
                break
            n = len(held)
            _wait_until(lambda: loopback_server.stats.in_flight_requests == n)  # noqa: B023
        _wait_until(lambda: poolwatch.snapshot(client).pending_requests == 1)

        before = poolwatch.snapshot(client)
        console = Console(record=True, width=200, file=io.StringIO())
        assert run_top(exporter, interval=0.3, once=True, console=console) == 0
        after = poolwatch.snapshot(client)
    finally:
        for t in held:
            t.join(10)
        client.close()

    # Nothing moved while top was looking, so its figures must be the snapshot's.
    fields = (
        "active_connections",
        "idle_connections",
        "pending_requests",
        "requests_total",
        "leaked_responses_total",
        "pool_timeouts_total",
        "utilization",
    )
    assert {f: getattr(before, f) for f in fields} == {f: getattr(after, f) for f in fields}
    assert (before.active_connections, before.max_connections) == (4, 4)
    assert before.leaked_responses_total == 1
    assert before.requests_total == 11

    screen = console.export_text()
    assert exporter in screen
    line = next((ln for ln in screen.splitlines() if "top-test-pool" in ln), None)
    assert line is not None, screen
    cells = line.split()
    # pool, utilization, bar, active/max, idle, waiting, oldest wait, "s", req/s, reuse,
    # queue p99, "s", timeouts/s, leaks, requests
    assert cells[0] == "top-test-pool"
    assert cells[1] == f"{before.utilization:.0%}" == "100%"
    assert cells[3] == f"{before.active_connections}/{before.max_connections}"
    assert cells[4] == str(before.idle_connections)
    assert cells[5] == str(before.pending_requests)
    assert float(cells[6]) >= 0.3  # the waiting request's age, at least the interval
    assert cells[8] == "0.00"  # requests/s: nothing finished during the interval
    assert cells[-3] == "0.00"  # PoolTimeouts/s
    assert cells[-2] == str(before.leaked_responses_total)
    assert cells[-1] == str(before.requests_total)
    for header in ("utilization", "active/max", "waiting", "oldest wait", "req/s", "reuse"):
        assert header in screen


def test_rates_come_from_the_difference_between_two_scrapes() -> None:
    page = """\
# TYPE poolwatch_pool_utilization_ratio gauge
poolwatch_pool_utilization_ratio{{pool_name="p",instance="a:1"}} 0.5
# TYPE poolwatch_pool_requests_total counter
poolwatch_pool_requests_total{{pool_name="p",instance="a:1",connection_reused="true"}} {reused}
poolwatch_pool_requests_total{{pool_name="p",instance="a:1",connection_reused="false"}} {new}
# TYPE poolwatch_pool_timeouts_total counter
poolwatch_pool_timeouts_total{{pool_name="p",instance="a:1"}} {timeouts}
# TYPE poolwatch_pool_leaked_responses_total counter
poolwatch_pool_leaked_responses_total{{pool_name="p",instance="a:1"}} {leaks}
"""
    first = parse(page.format(reused=90, new=10, timeouts=1, leaks=0), at=100.0)
    second = parse(page.format(reused=126, new=14, timeouts=5, leaks=2), at=102.0)
    (row,) = rows(second, first)
    assert (row.pool, row.instance) == ("p", "a:1")
    assert row.requests_per_s == pytest.approx(20.0)
    assert row.reuse_ratio == pytest.approx(36 / 40)
    assert row.pool_timeouts_per_s == pytest.approx(2.0)
    assert (row.leaked_responses_total, row.leaked_new) == (2, 2)
    assert row.utilization == 0.5
    (unrated,) = rows(first, None)
    assert unrated.requests_per_s is None
    assert unrated.reuse_ratio == pytest.approx(0.9)


def test_an_unreachable_url_exits_1_with_a_clear_message(
    capsys: pytest.CaptureFixture[str],
) -> None:
    url = f"http://127.0.0.1:{_free_port()}/metrics"
    assert main(["top", url, "--once", "--interval", "0.1"]) == 1
    err = capsys.readouterr().err
    assert f"cannot reach {url}" in err
    assert "connection refused" in err


def _page(body: bytes, content_type: str) -> Callable[[LoopbackRequest, Responder], Any]:
    async def handler(request: LoopbackRequest, response: Responder) -> None:
        await response.respond(200, body, [("content-type", content_type)])

    return handler


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("/other-metrics", "has no poolwatch metrics"),
        ("/html", "does not look like a Prometheus /metrics page"),
        ("/missing", "answered HTTP 404"),
    ],
)
def test_a_page_without_poolwatch_metrics_exits_1(
    loopback_server_factory: ServerFactory,
    capsys: pytest.CaptureFixture[str],
    path: str,
    message: str,
) -> None:
    routes = default_routes()
    routes["/other-metrics"] = _page(
        b"# HELP jobs_total Jobs.\n# TYPE jobs_total counter\njobs_total 3.0\n",
        "text/plain; version=0.0.4",
    )
    routes["/html"] = _page(b"<html><body>hello {</body></html>\n", "text/html")
    server = loopback_server_factory(routes)
    assert main(["top", f"{server.url}{path}", "--once", "--interval", "0.1"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("poolwatch top: error: ")
    assert message in err


def test_top_without_once_keeps_watching_until_ctrl_c(exporter: str) -> None:
    client = poolwatch.instrument(httpx.Client(trust_env=False), name="top-live-pool")
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    try:
        # A suite started in the background (``cmd &`` in a script, ``nohup``) runs with SIGINT
        # ignored, which its children inherit and Python then keeps: hand the child SIGINT as a
        # terminal would (a caught signal is reset to the default by exec).
        previous = signal.signal(signal.SIGINT, signal.default_int_handler)
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", "poolwatch", "top", exporter, "--interval", "0.2"],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=env,
            )
        finally:
            signal.signal(signal.SIGINT, previous)
        time.sleep(2.0)
        assert proc.poll() is None, proc.communicate()
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=10)
    finally:
        client.close()
    assert proc.returncode == 130, err
    assert "top-live-pool" in out
    assert "Traceback" not in err
