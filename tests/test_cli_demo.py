"""``poolwatch demo`` and the command line around it, run as a user runs them: subprocesses.

The three long demo runs start together (a module fixture) so the file stays well under 40 s.

What "requests" means, precisely: the report's ``requests`` is poolwatch's ``requests_total``,
requests that obtained a connection and were sent. After a run that ends on its own (the driver
stops starting requests and lets those in flight finish) it must equal ``server_requests``, what
the embedded server received. Requests that gave up with ``PoolTimeout`` never reach the server
and are in neither; ``completed`` counts the responses the driver read to the end, so
``requests == completed + leaked_responses`` when PoolTimeout is the only error.
"""

from __future__ import annotations

import json
import os
import re
import selectors
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

import poolwatch
from poolwatch._cli import main

ANSI = re.compile(r"\x1b\[")
DEMO_ARGS = ["--duration", "4", "--concurrency", "16", "--max-connections", "4"]


def _env() -> dict[str, str]:
    """A plain environment: no forced colours, no proxies, whatever the developer's shell has."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE", "COLUMNS")
        and not k.lower().endswith("_proxy")
    }
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _poolwatch(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "poolwatch", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
        env=_env(),
    )


@dataclass
class Run:
    proc: subprocess.Popen[str]
    metrics_port: int | None = None
    scraped: str | None = None
    _out: tuple[str, str] | None = None

    def result(self, timeout: float = 60.0) -> tuple[int, str, str]:
        if self._out is None:
            self._out = self.proc.communicate(timeout=timeout)
        return self.proc.returncode, self._out[0], self._out[1]

    def report(self) -> dict[str, Any]:
        code, out, err = self.result()
        assert code == 0, err
        assert out.endswith("\n"), f"not one line of JSON: {out!r}"
        assert out.count("\n") == 1, f"not one line of JSON: {out!r}"
        data = json.loads(out)
        assert isinstance(data, dict)
        return data


@pytest.fixture(scope="module")
def runs() -> Iterator[dict[str, Run]]:
    """The long runs, started at once: HTTP/1.1 and HTTP/2 as JSON, and one as plain text."""
    port = _free_port()
    started = {
        "http1": Run(
            _poolwatch("demo", *DEMO_ARGS, "--json", "--metrics-port", "0", "--seed", "1")
        ),
        "http2": Run(
            _poolwatch(
                "demo", *DEMO_ARGS, "--json", "--metrics-port", "0", "--http2", "--seed", "2"
            )
        ),
        "text": Run(_poolwatch("demo", *DEMO_ARGS, "--metrics-port", str(port)), port),
    }
    # While the text run is under way, its /metrics page shows the pool.
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and started["text"].proc.poll() is None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as page:
                text = page.read().decode()
            if re.search(r'poolwatch_pool_requests_total\{[^}]*connection_reused="true"', text):
                started["text"].scraped = text
                break
        except OSError:
            pass
        time.sleep(0.2)
    yield started
    for run in started.values():
        if run.proc.poll() is None:
            run.proc.kill()
        run.result()


def test_the_demo_json_report_is_one_object_whose_counts_match_the_server(
    runs: dict[str, Run],
) -> None:
    r = runs["http1"].report()
    for key in (
        "requests",
        "peak_utilization",
        "queue_wait_p50_s",
        "queue_wait_p99_s",
        "pool_timeouts",
        "reuse_ratio",
        "leaked_responses",
        "connections_created",
        "server_accepted_connections",
        "server_requests",
        "errors_by_type",
        "duration_s",
        "concurrency",
        "max_connections",
        "http2",
    ):
        assert key in r, key
    assert (r["concurrency"], r["max_connections"], r["http2"]) == (16, 4, False)
    # poolwatch's figures against the server's own counters.
    assert r["requests"] == r["server_requests"] > 0
    assert r["connections_created"] == r["server_accepted_connections"] >= 1
    assert r["cancelled_in_flight"] == 0
    # ... and against the driver's.
    errors = r["errors_by_type"]
    assert set(errors) <= {"PoolTimeout"}, errors
    assert errors.get("PoolTimeout", 0) == r["pool_timeouts"]
    assert r["requests"] == r["completed"] + r["leaked_responses"]
    assert r["attempts"] == r["completed"] + r["leaked_responses"] + r["pool_timeouts"]
    # The pool saturated, requests queued, and the leak was caught.
    assert r["peak_utilization"] == 1.0
    assert r["queue_wait_p99_s"] > 0
    assert r["queue_wait_max_seen_s"] > 0
    assert r["leaked_responses"] >= 1
    assert 0 < r["reuse_ratio"] <= 1
    assert r["findings"], "the report explains what it saw"


def test_the_http2_demo_multiplexes_one_connection_and_queues_on_stream_slots(
    runs: dict[str, Run],
) -> None:
    r = runs["http2"].report()
    assert r["http2"] is True
    assert r["requests"] == r["server_requests"] > 0
    assert r["connections_created"] == r["server_accepted_connections"] == 1
    # One connection of four: the pool's limit never binds on HTTP/2, the server's streams do.
    assert r["peak_utilization"] == pytest.approx(1 / 4)
    assert r["server_h2_max_concurrent_streams"] == 4
    assert r["queue_wait_p99_s"] > 0
    assert r["leaked_responses"] >= 1
    # The pool timeout does not cover the wait for a stream slot.
    assert r["pool_timeouts"] == 0
    assert r["errors_by_type"] == {}
    assert r["requests"] == r["completed"] + r["leaked_responses"]
    assert any("stream" in line for line in r["findings"])


def test_without_a_terminal_the_demo_prints_a_plain_report_and_no_escape_codes(
    runs: dict[str, Run],
) -> None:
    code, out, err = runs["text"].result()
    assert code == 0, err
    assert not ANSI.search(out), out
    assert not ANSI.search(err), err
    assert "poolwatch demo report" in out
    for figure in (
        "peak utilization",
        "queue wait p50 / p99",
        "pool timeouts",
        "reuse ratio",
        "leaked responses",
        "server received",
        "server accepted",
    ):
        assert figure in out, figure
    assert "What it means" in out
    assert "dropped without being closed" in out
    assert "async with client.stream(...)" in out
    assert "raise max_connections to 16" in out
    assert not out.lstrip().startswith("{")


def test_the_demo_serves_metrics_while_it_runs(runs: dict[str, Run]) -> None:
    page = runs["text"].scraped
    assert page is not None, "no /metrics page with the demo's pool was served"
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(page)
        for s in family.samples
    }
    demo = (("pool_name", "demo-llm"),)
    assert 0 <= samples[("poolwatch_pool_utilization_ratio", demo)] <= 1
    assert samples[("poolwatch_pool_connection_max", demo)] == 4


def test_a_metrics_port_in_use_is_an_error_that_names_the_flag() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = _poolwatch("demo", "--duration", "1", "--metrics-port", str(port))
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 1
    assert "--metrics-port" in err
    assert str(port) in err
    assert out == ""


def test_ctrl_c_stops_the_demo_prints_the_report_so_far_and_exits_130() -> None:
    proc = _poolwatch("demo", "--metrics-port", "0", "--duration", "60")
    assert proc.stderr is not None
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stderr, selectors.EVENT_READ)
        assert sel.select(timeout=20), "the demo never said it was running"
        first = proc.stderr.readline()
    assert "fake LLM API on http://127.0.0.1:" in first
    time.sleep(1.5)  # let traffic flow
    started = time.monotonic()
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=20)
    assert proc.returncode == 130, err
    assert time.monotonic() - started < 10
    assert "poolwatch demo report" in out
    assert "Interrupted after" in out
    assert "Traceback" not in err


# --------------------------------------------------------------------------------------------
# The command line itself
# --------------------------------------------------------------------------------------------


def test_version_prints_the_package_version() -> None:
    proc = _poolwatch("--version")
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0
    assert out.strip() == f"poolwatch {poolwatch.__version__}"


def test_demo_help_exits_0_and_names_every_flag(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--help"]) == 0
    out = capsys.readouterr().out
    for flag in (
        "--duration",
        "--concurrency",
        "--max-connections",
        "--http2",
        "--metrics-port",
        "--json",
        "--seed",
    ):
        assert flag in out


@pytest.mark.parametrize(
    "argv",
    [
        ["demo", "--bogus"],
        ["demo", "--concurrency", "0"],
        ["demo", "--duration", "-1"],
        ["demo", "--metrics-port", "70000"],
        ["top"],
        ["top", "http://127.0.0.1:1/metrics", "--interval", "0"],
        ["frobnicate"],
        [],
    ],
)
def test_a_bad_command_line_exits_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    assert "error" in capsys.readouterr().err
