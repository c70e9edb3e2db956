"""The dashboard and the alert rules, proven on a real Prometheus scraping a real exhausted pool.

One Prometheus 2.42 (Debian's binary) for the whole module scrapes poolwatch's own exporter
once a second and evaluates a test copy of dashboards/alerts.yml in which every ``for:`` is
1 s (thresholds and range windows stay as shipped). The exporter serves a private registry in
this process. The workload is one instrumented ``httpx.Client`` with ``max_connections=2``,
driven by threads against two loopback origins, plain HTTP and TLS (trustme certificates),
in three phases:

1. warm-up, before Prometheus's first scrape: one request per origin, so every per-origin
   counter is first scraped at 0 and ``increase()`` sees what follows;
2. churn, after the first scrape: ~900 requests to ``/goaway`` (the server answers
   ``Connection: close``), some over TLS, from more threads than connections, so that
   connections are opened, handshaken and closed, requests queue, and almost none reuse a
   connection: every histogram of the "Request phases" and "Reuse and churn" panels moves;
3. exhaustion: one response is leaked (garbage-collected unclosed: it keeps its connection),
   one ``/stall`` stream holds the other connection, and waiter threads queue behind them
   until they fail with ``PoolTimeout`` after 1.1 s, over and over. Utilization is 1.0,
   requests wait, PoolTimeouts accumulate. ``release()`` ends it: the waiters stop and the
   stream is closed; the leaked response keeps its connection (utilization 0.5), as httpx does.

Tests that need a phase ask for it (``saturate()`` / ``release()`` are idempotent), so they
pass in any order. Prometheus's first scrape comes ~5.5 s after it starts (a fixed discovery
delay in 2.42), which is most of this module's wall time.

Without the ``prometheus`` binary every test here fails (never skips) with the apt-get line.
"""

from __future__ import annotations

import contextlib
import gc
import re
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trustme
from prometheus_client import CollectorRegistry
from prometheus_server import PrometheusServer, eventually, finite_values, with_short_for
from test_dashboards import ALERTS_YML, Query, alert_rules, dashboard_queries, data_panels

import poolwatch
import poolwatch.prometheus
from poolwatch._loopback import LoopbackServer, default_routes

MAX_CONNECTIONS = 2
#: More than 1 s, so the waiters' PoolTimeouts are also queue waits above
#: PoolwatchQueueWaitHigh's 1 s budget (poolwatch records the wait of a request that timed out).
WAITER_POOL_TIMEOUT = 1.1
WAITERS = 5
CHURN_THREADS = 4
#: Requests per churn thread. PoolwatchLowConnectionReuse needs more than 1 request/s over its
#: 10 m window: rate() divides by the whole window, so the module must make > 600 requests.
CHURN_REQUESTS = 225
#: Every this many churn requests, one goes to the TLS origin (a new TLS connection each time).
TLS_EVERY = 25

#: Grafana's ``$__rate_interval`` is at least 4 scrape intervals (4 s here). One minute keeps
#: the whole module's traffic inside every window, so a rate does not drop to zero (and a
#: quantile to NaN) when a test switches phases.
RATE_WINDOW = "1m"
#: ``$__range`` is the dashboard's time range (3 h by default); 5 m covers the whole module.
RANGE_WINDOW = "5m"

#: Dashboard queries not checked here, with the reason. Each must name a real query.
EXCLUDED_QUERIES: dict[str, str] = {}

#: Alerts this workload brings to ``firing``.
FIRING_UNDER_EXHAUSTION = frozenset(
    {
        "PoolwatchPoolNearlySaturated",
        "PoolwatchPoolSaturated",
        "PoolwatchRequestsQueuedContinuously",
        "PoolwatchQueueWaitHigh",
        "PoolwatchPoolTimeouts",
        "PoolwatchLeakedResponses",
        "PoolwatchLowConnectionReuse",
    }
)
#: Alerts this module cannot bring to ``firing``, with the reason.
NOT_SHOWN_FIRING = {
    "PoolwatchRequestWaitingTooLong": (
        "its 60 s threshold is in the expression (the oldest waiting request has waited more "
        "than 60 s), not in `for:`; shortening it would test a different rule, and waiting "
        "60 s would break the module's 40 s budget. promtool covers it in "
        "dashboards/tests/rules_test.yml."
    ),
}
#: The alerts that mean "the pool is exhausted right now": they must clear once it recovers.
SATURATION_ALERTS = frozenset(
    {
        "PoolwatchPoolNearlySaturated",
        "PoolwatchPoolSaturated",
        "PoolwatchRequestsQueuedContinuously",
    }
)


# --------------------------------------------------------------------------- the workload


class Workload:
    """The instrumented client and the threads that drive it (see the module docstring)."""

    def __init__(self, client: httpx.Client, plain: LoopbackServer, tls: LoopbackServer) -> None:
        self.client = client
        self.plain = plain
        self.tls = tls
        self.pool_timeouts: list[httpx.PoolTimeout] = []
        self.unexpected: list[BaseException] = []
        self._lock = threading.Lock()
        self._stalls: list[httpx.Response] = []
        self._waiters: list[threading.Thread] = []
        self._stop = threading.Event()

    def snapshot(self) -> poolwatch.PoolSnapshot:
        return poolwatch.snapshot(self.client)

    def warm_up(self) -> None:
        """One request per origin: every per-origin series now exists, counters at 0."""
        for server in (self.plain, self.tls):
            self.client.get(f"{server.url}/ok").raise_for_status()

    def churn(self) -> None:
        """Open, handshake and close connections, with requests queueing behind the pool."""
        patient = httpx.Timeout(10.0)

        def run() -> None:
            try:
                for i in range(CHURN_REQUESTS):
                    server = self.tls if i % TLS_EVERY == 0 else self.plain
                    self.client.get(f"{server.url}/goaway", timeout=patient).raise_for_status()
            except Exception as exc:
                with self._lock:
                    self.unexpected.append(exc)

        threads = [threading.Thread(target=run, name=f"churn-{i}") for i in range(CHURN_THREADS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert not self.unexpected, f"churn requests failed: {self.unexpected!r}"

    def leak(self) -> None:
        """A response dropped without being closed: poolwatch counts it, it keeps its connection."""
        response = self.client.send(
            self.client.build_request("GET", f"{self.plain.url}/ok"), stream=True
        )
        del response
        gc.collect()

    def saturate(self) -> None:
        """Hold every connection and queue waiters behind them. Idempotent."""
        if self._waiters:
            return
        while self.snapshot().active_connections < MAX_CONNECTIONS:
            request = self.client.build_request("GET", f"{self.tls.url}/stall")
            self._stalls.append(self.client.send(request, stream=True))
            assert len(self._stalls) <= MAX_CONNECTIONS, self.snapshot()
        self._stop.clear()
        self._waiters = [
            threading.Thread(target=self._wait_in_line, args=(i,), name=f"waiter-{i}", daemon=True)
            for i in range(WAITERS)
        ]
        for thread in self._waiters:
            thread.start()

    def _wait_in_line(self, index: int) -> None:
        # Staggered starts: the waiters time out one after another, never all at once, so
        # some request is always pending (a scrape never falls into a gap between retries).
        if self._stop.wait(index * WAITER_POOL_TIMEOUT / WAITERS):
            return
        url = f"{self.plain.url}/ok"
        while not self._stop.is_set():
            try:
                self.client.get(url, timeout=httpx.Timeout(5.0, pool=WAITER_POOL_TIMEOUT))
            except httpx.PoolTimeout as exc:
                with self._lock:
                    self.pool_timeouts.append(exc)
            except Exception as exc:
                with self._lock:
                    self.unexpected.append(exc)
                return

    def release(self) -> None:
        """Stop the waiters and close the held streams: the pool recovers. Idempotent."""
        self._stop.set()
        for response in self._stalls:
            response.close()
        self._stalls.clear()
        for thread in self._waiters:
            thread.join(WAITER_POOL_TIMEOUT + 10.0)
            assert not thread.is_alive(), f"{thread.name} did not stop"
        self._waiters.clear()

    def timeouts_caught(self) -> int:
        with self._lock:
            return len(self.pool_timeouts)


# --------------------------------------------------------------------------- the lab


class Lab:
    """Exporter, Prometheus, loopback servers and workload, started on first use.

    Started from inside the first test (``ready()``), not in the fixture, so that a missing
    ``prometheus`` binary makes the tests fail rather than error in setup. A failed start is
    remembered and re-raised by the next tests instead of being retried.
    """

    def __init__(
        self, workdir: Path, server_tls: ssl.SSLContext, client_tls: ssl.SSLContext
    ) -> None:
        self.workdir = workdir
        self.server_tls = server_tls
        self.client_tls = client_tls
        self.stack = contextlib.ExitStack()
        self.error: BaseException | None = None
        self.started = False
        self.timings: dict[str, float] = {}

    # Set by _start().
    prom: PrometheusServer
    workload: Workload
    instance: str
    pool_name: str

    def ready(self) -> Lab:
        if self.error is not None:
            raise self.error
        if not self.started:
            try:
                self._start()
            except BaseException as exc:  # pytest.fail() raises a BaseException
                self.error = exc
                raise
            self.started = True
        return self

    def _start(self) -> None:
        t0 = time.monotonic()
        registry = CollectorRegistry()
        httpd, thread = poolwatch.prometheus.start_http_server(0, registry=registry)

        def stop_exporter() -> None:
            httpd.shutdown()
            httpd.server_close()
            thread.join(5)

        self.stack.callback(stop_exporter)
        self.instance = f"127.0.0.1:{httpd.server_address[1]}"

        rules = self.workdir / "alerts.test.yml"
        rules.write_text(with_short_for(ALERTS_YML.read_text(encoding="utf-8")), encoding="utf-8")
        self.prom = PrometheusServer.start(
            self.workdir, targets=[self.instance], rule_files=[rules]
        )
        self.stack.callback(self.prom.stop)
        started = time.monotonic()

        plain = LoopbackServer(default_routes()).start()
        self.stack.callback(plain.stop)
        tls = LoopbackServer(default_routes(), tls=self.server_tls).start()
        self.stack.callback(tls.stop)
        client = httpx.Client(
            limits=httpx.Limits(max_connections=MAX_CONNECTIONS),
            timeout=httpx.Timeout(5.0, pool=WAITER_POOL_TIMEOUT),
            verify=self.client_tls,
        )
        self.stack.callback(client.close)
        poolwatch.instrument(client, name="e2e")
        self.workload = Workload(client, plain, tls)
        self.stack.callback(self.workload.release)
        self.pool_name = self.workload.snapshot().name
        assert re.fullmatch(r"[\w-]+", self.pool_name), self.pool_name  # safe in a PromQL regex
        self.workload.warm_up()

        eventually(
            lambda: self.query(f"poolwatch_pool_timeouts_total{self.selector()}"),
            lambda v: len(v) == 2,
            timeout=20,
            what="Prometheus scraped the warmed-up pool (a timeouts series per origin, at 0)",
        )
        self.timings["first scrape after prometheus start"] = time.monotonic() - started
        t1 = time.monotonic()
        self.workload.churn()
        self.timings["churn"] = time.monotonic() - t1
        self.workload.leak()
        assert self.workload.snapshot().leaked_responses_total == 1
        self.workload.saturate()
        self.timings["lab start"] = time.monotonic() - t0

    def close(self) -> None:
        self.stack.close()

    # -- queries ----------------------------------------------------------------------------

    def selector(self, extra: str = "") -> str:
        return (
            f'{{pool_name="{self.pool_name}", instance="{self.instance}"'
            + (f", {extra}" if extra else "")
            + "}"
        )

    def query(self, expr: str) -> list[dict[str, Any]]:
        return self.prom.query(expr)

    def scalar(self, expr: str) -> float | None:
        """The one value ``expr`` returns now, ``None`` when it returns nothing."""
        vector = self.query(expr)
        assert len(vector) <= 1, f"{expr} returned several series: {vector}"
        return float(vector[0]["value"][1]) if vector else None

    def our_alerts(self) -> dict[str, str]:
        """alertname -> state, for the alerts about this pool on this exporter."""
        return {
            a["labels"]["alertname"]: a["state"]
            for a in self.prom.alerts()
            if a["labels"].get("pool_name") == self.pool_name
            and a["labels"].get("instance") == self.instance
        }

    def templated(self, expr: str) -> str:
        """A dashboard expression as Grafana would send it, for this pool and exporter."""
        for name, value in (
            ("__rate_interval", RATE_WINDOW),
            ("__range", RANGE_WINDOW),
            ("pool_name", self.pool_name),
            ("instance", self.instance),
        ):
            expr = expr.replace(f"${{{name}}}", value).replace(f"${name}", value)
        assert "$" not in expr, f"a Grafana variable this test does not know: {expr}"
        return expr


@pytest.fixture(scope="module")
def lab_once(
    tmp_path_factory: pytest.TempPathFactory,
    trustme_ca: trustme.CA,
    server_ssl_context_factory: Any,
) -> Iterator[Lab]:
    client_tls = ssl.create_default_context()
    trustme_ca.configure_trust(client_tls)
    lab = Lab(
        tmp_path_factory.mktemp("prometheus-e2e"),
        server_ssl_context_factory(("http/1.1",)),
        client_tls,
    )
    yield lab
    lab.close()


@pytest.fixture
def lab(lab_once: Lab) -> Lab:
    """The module's lab, not started yet: tests call ``lab.ready()`` first."""
    return lab_once


# =========================================================================== tests


def test_every_alert_rule_loads_and_evaluates_without_error_on_a_real_prometheus(
    lab: Lab,
) -> None:
    lab = lab.ready()
    names = [rule["alert"] for rule in alert_rules()]

    def loaded() -> list[dict[str, Any]]:
        return [rule for rule in lab.prom.rules() if rule["type"] == "alerting"]

    rules = eventually(
        loaded,
        lambda rs: len(rs) == len(names) and all(r["health"] == "ok" for r in rs),
        timeout=10,
        what=f"all {len(names)} alert rules evaluated with health 'ok'",
    )
    assert sorted(r["name"] for r in rules) == sorted(names)
    assert all(r["duration"] in (0, 1) for r in rules), "the test copy shortens every for: to 1s"
    assert not [r for r in rules if r.get("lastError")], rules


def test_every_dashboard_panel_query_returns_data_from_a_real_prometheus(lab: Lab) -> None:
    lab = lab.ready()
    lab.workload.saturate()
    queries = [q for q in dashboard_queries() if q.where not in EXCLUDED_QUERIES]
    assert set(EXCLUDED_QUERIES) <= {q.where for q in dashboard_queries()}, "stale exclusion"
    checked_panels = {q.where.split(" query ")[0] for q in queries}
    assert len(checked_panels) == len(data_panels()), "every data panel has a query checked"

    def empty_ones() -> list[tuple[Query, str, list[dict[str, Any]]]]:
        out = []
        for query in queries:
            expr = lab.templated(query.expr)
            result = lab.query(expr)
            if not finite_values(result):
                out.append((query, expr, result))
        return out

    try:
        eventually(empty_ones, lambda empty: not empty, timeout=15, what="")
    except AssertionError:
        failing = empty_ones()
        report = "\n".join(
            f"- {q.where}:\n    {expr}\n    -> {result}" for q, expr, result in failing
        )
        raise AssertionError(
            f"{len(failing)} of {len(queries)} dashboard queries return no number from the "
            f"real Prometheus (empty, or only NaN):\n{report}"
        ) from None


def test_prometheus_reads_the_same_utilization_limit_and_connections_as_the_snapshot(
    lab: Lab,
) -> None:
    lab = lab.ready()
    lab.workload.saturate()
    snap = eventually(
        lab.workload.snapshot,
        lambda s: s.pending_requests > 0,
        timeout=5,
        what="requests waiting behind the exhausted pool",
    )
    assert snap.utilization == 1.0
    assert snap.max_connections == MAX_CONNECTIONS
    assert snap.active_connections == MAX_CONNECTIONS
    assert snap.idle_connections == 0
    sel = lab.selector()
    active = lab.selector('http_connection_state="active"')
    idle = lab.selector('http_connection_state="idle"')
    figures = {
        f"poolwatch_pool_utilization_ratio{sel}": snap.utilization,
        f"poolwatch_pool_connection_max{sel}": snap.max_connections,
        f"sum(http_client_open_connections{active})": snap.active_connections,
        f"sum(http_client_open_connections{idle})": snap.idle_connections,
        f"poolwatch_pool_leaked_responses_total{sel}": snap.leaked_responses_total,
    }
    seen = eventually(
        lambda: {expr: lab.scalar(expr) for expr in figures},
        lambda got: got == figures,
        timeout=10,
        what=f"Prometheus agrees with the snapshot {figures}",
    )
    assert seen == figures
    eventually(
        lambda: lab.scalar(f"poolwatch_pool_pending_requests{sel}"),
        lambda pending: pending is not None and pending > 0,
        timeout=5,
        what="Prometheus sees requests waiting",
    )
    assert lab.workload.snapshot().utilization == 1.0  # still saturated: the same state


def test_the_saturation_queue_timeout_reuse_and_leak_alerts_fire_on_a_real_prometheus(
    lab: Lab,
) -> None:
    lab = lab.ready()
    names = {rule["alert"] for rule in alert_rules()}
    assert FIRING_UNDER_EXHAUSTION | set(NOT_SHOWN_FIRING) == names, (
        "a new alert in alerts.yml: make this workload fire it, or say here why it cannot"
    )
    lab.workload.saturate()
    alerts = eventually(
        lab.our_alerts,
        lambda a: all(a.get(name) == "firing" for name in FIRING_UNDER_EXHAUSTION),
        timeout=20,
        what=f"{sorted(FIRING_UNDER_EXHAUSTION)} firing for pool {lab.pool_name}",
    )
    assert lab.workload.timeouts_caught() > 0
    assert not lab.workload.unexpected, lab.workload.unexpected
    full = {
        a["labels"]["alertname"]: a
        for a in lab.prom.alerts()
        if a["labels"].get("pool_name") == lab.pool_name
    }
    assert full["PoolwatchPoolSaturated"]["labels"]["severity"] == "critical"
    assert full["PoolwatchPoolTimeouts"]["labels"]["job"] == "poolwatch"
    assert "saturated" in full["PoolwatchPoolSaturated"]["annotations"]["summary"]
    assert set(alerts) >= FIRING_UNDER_EXHAUSTION


def test_the_saturation_alerts_stop_firing_once_the_pool_recovers(lab: Lab) -> None:
    lab = lab.ready()
    lab.workload.saturate()
    before = SATURATION_ALERTS | {"PoolwatchPoolTimeouts", "PoolwatchLeakedResponses"}
    eventually(
        lab.our_alerts,
        lambda a: all(a.get(name) == "firing" for name in before),
        timeout=20,
        what=f"{sorted(before)} firing before the pool recovers",
    )
    lab.workload.release()
    recovered = time.monotonic()
    # The leaked response still holds one connection of two: httpx never takes it back.
    assert lab.workload.snapshot().utilization == 0.5
    alerts = eventually(
        lab.our_alerts,
        lambda a: not SATURATION_ALERTS & set(a),
        timeout=10,
        what=f"{sorted(SATURATION_ALERTS)} gone from /api/v1/alerts after the pool recovered",
    )
    lab.timings["saturation alerts cleared"] = time.monotonic() - recovered
    # Failures already seen stay visible for their window: that is what their rules say.
    assert alerts.get("PoolwatchPoolTimeouts") == "firing"
    assert alerts.get("PoolwatchLeakedResponses") == "firing"


def test_after_the_workload_stops_prometheus_counts_exactly_the_pool_timeouts_caught(
    lab: Lab,
) -> None:
    lab = lab.ready()
    lab.workload.saturate()
    eventually(
        lab.workload.timeouts_caught,
        lambda n: n >= WAITERS,
        timeout=10,
        what="every waiter caught a PoolTimeout",
    )
    lab.workload.release()
    snap = lab.workload.snapshot()
    caught = lab.workload.timeouts_caught()
    assert not lab.workload.unexpected, lab.workload.unexpected
    assert snap.pool_timeouts_total == caught
    assert snap.active_requests == 0
    assert snap.pending_requests == 0
    sel = lab.selector()
    pool_timeout_errors = lab.selector('error_type="PoolTimeout"')
    figures = {
        f"sum(poolwatch_pool_timeouts_total{sel})": caught,
        f"sum(poolwatch_pool_request_errors_total{pool_timeout_errors})": caught,
        f"sum(poolwatch_pool_requests_total{sel})": snap.requests_total,
        f"sum(poolwatch_pool_connections_created_total{sel})": snap.connections_created_total,
        f"poolwatch_pool_leaked_responses_total{sel}": snap.leaked_responses_total,
        f"poolwatch_pool_utilization_ratio{sel}": snap.utilization,
        f"poolwatch_pool_pending_requests{sel}": 0,
    }
    eventually(
        lambda: {expr: lab.scalar(expr) for expr in figures},
        lambda got: got == figures,
        timeout=10,
        what=f"Prometheus agrees with the snapshot at rest {figures}",
    )
