"""A real Prometheus server (Debian's ``prometheus`` binary) for tests, on loopback.

    prom = PrometheusServer.start(workdir, targets=["127.0.0.1:9464"], rule_files=[rules])
    prom.query('poolwatch_pool_utilization_ratio{pool_name="llm"}')   # the result vector
    prom.alerts()                                                     # /api/v1/alerts
    prom.stop()                                                       # SIGTERM, wait

Every server gets its own config, TSDB directory and log file under ``workdir``, listens on
``127.0.0.1`` on a free port, scrapes and evaluates once a second, and is stopped by PID.
Expect the first scrape of a target about 5-6 s after start: Prometheus 2.42 throttles
target discovery to one update every 5 s and has no flag for it. So start one server per
module (or session) and change the workload inside the tests.

Without the binary, ``require_prometheus()`` fails the calling test (never skips it) with
the line that installs it.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Self, TypeVar

import pytest
import yaml

__all__ = [
    "INSTALL_HINT",
    "PrometheusServer",
    "eventually",
    "finite_values",
    "require_prometheus",
    "with_short_for",
]

INSTALL_HINT = (
    "the prometheus server binary is not installed; the end-to-end dashboard and alert tests "
    "run a real Prometheus. On Debian/Ubuntu: "
    "apt-get update && apt-get install -y --no-install-recommends prometheus"
)

T = TypeVar("T")


def require_prometheus() -> str:
    """The path of the ``prometheus`` binary; fails the calling test when it is missing."""
    exe = shutil.which("prometheus")
    if exe is None:
        pytest.fail(INSTALL_HINT, pytrace=False)
    return exe


def with_short_for(rules_yaml: str, duration: str = "1s") -> str:
    """A copy of a Prometheus rules file in which every ``for:`` is ``duration``.

    Thresholds and range windows stay as written: only the time an alert must stay
    pending shrinks, so an end-to-end test sees ``firing`` within seconds.
    """
    doc = yaml.safe_load(rules_yaml)
    for group in doc["groups"]:
        for rule in group["rules"]:
            if "for" in rule:
                rule["for"] = duration
    return str(yaml.safe_dump(doc, sort_keys=False))


def eventually(
    probe: Callable[[], T],
    done: Callable[[T], bool],
    *,
    timeout: float,
    what: str,
    interval: float = 0.25,
) -> T:
    """Call ``probe()`` until ``done(result)``; fail naming ``what`` and the last result."""
    deadline = time.monotonic() + timeout
    while True:
        result = probe()
        if done(result):
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"after {timeout:.0f} s still not true: {what}\nlast: {result!r}")
        time.sleep(interval)


def finite_values(vector: Sequence[dict[str, Any]]) -> list[float]:
    """The numbers of an instant vector, NaN and infinities left out (Grafana draws none)."""
    values = [float(sample["value"][1]) for sample in vector]
    return [v for v in values if math.isfinite(v)]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class PrometheusServer:
    """One running ``prometheus`` process and a small client for its HTTP API."""

    def __init__(self, process: subprocess.Popen[bytes], port: int, log_path: Path) -> None:
        self.process = process
        self.port = port
        self.log_path = log_path
        self.url = f"http://127.0.0.1:{port}"

    # -- lifecycle --------------------------------------------------------------------------

    @classmethod
    def start(
        cls,
        workdir: Path,
        *,
        targets: Sequence[str],
        rule_files: Sequence[Path] = (),
        job: str = "poolwatch",
        interval: str = "1s",
        ready_timeout: float = 15.0,
        attempts: int = 3,
    ) -> Self:
        """Start Prometheus scraping ``targets`` and evaluating ``rule_files`` every ``interval``.

        Returns once ``/-/ready`` answers 200. The port is picked free just before the start;
        if another process takes it in between, the start is retried on a new port.
        """
        exe = require_prometheus()
        workdir.mkdir(parents=True, exist_ok=True)
        config = {
            "global": {
                "scrape_interval": interval,
                "scrape_timeout": interval,
                "evaluation_interval": interval,
            },
            "rule_files": [str(path) for path in rule_files],
            "scrape_configs": [{"job_name": job, "static_configs": [{"targets": list(targets)}]}],
        }
        config_path = workdir / "prometheus.yml"
        config_path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
        failures = []
        for attempt in range(attempts):
            port = _free_port()
            log_path = workdir / f"prometheus-{attempt}.log"
            with log_path.open("wb") as log:
                process = subprocess.Popen(
                    [
                        exe,
                        f"--config.file={config_path}",
                        f"--storage.tsdb.path={workdir / f'data-{attempt}'}",
                        f"--web.listen-address=127.0.0.1:{port}",
                        "--log.level=warn",
                    ],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            server = cls(process, port, log_path)
            if server._wait_ready(ready_timeout):
                return server
            server.stop()
            failures.append(f"attempt {attempt + 1} on port {port}:\n{server.log_tail()}")
        raise RuntimeError("prometheus did not become ready:\n" + "\n".join(failures))

    def _wait_ready(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                return False
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as response:
                    if response.status == 200:
                        return True
            except (OSError, urllib.error.URLError):
                pass  # not listening yet, or 503 while starting
            time.sleep(0.05)
        return False

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM the process and wait for it; SIGKILL if it does not exit. Idempotent."""
        if self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout)

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    # -- HTTP API ---------------------------------------------------------------------------

    def api(self, path: str, **params: str) -> Any:
        """GET ``/api/v1/<path>`` and return its ``data``; fail on an API error."""
        query = urllib.parse.urlencode(params)
        url = f"{self.url}/api/v1/{path}" + (f"?{query}" if query else "")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                body = json.load(response)
        except urllib.error.HTTPError as exc:  # 400 bad_data, 422 execution errors
            body = json.loads(exc.read() or b"{}")
        if body.get("status") != "success":
            raise AssertionError(f"Prometheus API {path} {params}: {body}")
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant query now: the result vector (``[{"metric": ..., "value": [t, "v"]}]``)."""
        data = self.api("query", query=expr)
        if data["resultType"] == "scalar":
            return [{"metric": {}, "value": data["result"]}]
        result: list[dict[str, Any]] = data["result"]
        return result

    def alerts(self) -> list[dict[str, Any]]:
        """Pending and firing alerts (``labels``, ``state``, ``value``, ``activeAt``)."""
        alerts: list[dict[str, Any]] = self.api("alerts")["alerts"]
        return alerts

    def rules(self) -> list[dict[str, Any]]:
        """Every loaded rule, with its group name added, its ``health`` and ``lastError``."""
        return [
            {**rule, "group": group["name"]}
            for group in self.api("rules")["groups"]
            for rule in group["rules"]
        ]

    def targets(self) -> list[dict[str, Any]]:
        active: list[dict[str, Any]] = self.api("targets")["activeTargets"]
        return active
