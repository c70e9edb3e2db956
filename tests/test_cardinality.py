"""Cardinality: a client that calls thousands of distinct hosts keeps a bounded number of
series per pool. The first ``max_origins`` (default 50) origins get their own series; every
further one is counted under ``server_address="_other"``, and the overflow is logged once.

Real traffic to thousands of hosts without DNS: the loopback server is also a forward proxy
(it answers absolute-form targets itself), so ``http://h123.test/ok`` through
``proxy=server.url`` is a distinct origin for httpcore and for poolwatch, and the server's
counters stay ground truth. httpcore opens one proxy connection per origin, so each host
costs a TCP connection; a direct ``PoolCore`` run covers a hundred thousand origins.
"""

from __future__ import annotations

import logging
import tracemalloc
from collections import Counter
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from truth import wait_until

import poolwatch
import poolwatch.prometheus
from poolwatch._core import OVERFLOW_ADDRESS, OriginSnapshot, PoolCore
from poolwatch._exposition import Exposition
from poolwatch._histogram import HistogramSnapshot
from poolwatch._loopback import LoopbackServer
from poolwatch._snapshot import PoolSnapshot

HOSTS = 1000


@pytest.fixture
def registry() -> CollectorRegistry:
    registry = CollectorRegistry()
    poolwatch.prometheus.enable(registry)
    return registry


def overflow_records(caplog: pytest.LogCaptureFixture, pool: str) -> list[logging.LogRecord]:
    return [
        r
        for r in caplog.records
        if r.name == "poolwatch" and "distinct origins" in r.getMessage() and r.args[0] == pool  # type: ignore[index]
    ]


def series(registry: CollectorRegistry, pool: str) -> list[tuple[str, dict[str, str], float]]:
    """Every sample of the pool in the exposition, as (name, labels, value)."""
    text = generate_latest(registry).decode()
    return [
        (s.name, dict(s.labels), s.value)
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.labels.get("pool_name") == pool
    ]


def call_hosts(client: Any, hosts: range) -> None:
    for i in hosts:
        response = client.get(f"http://h{i}.test/ok")
        assert response.json()["path"] == "/ok"


def test_a_thousand_hosts_make_fifty_origins_and_one_other_with_every_request_counted(
    hx: Any,
    loopback_server: LoopbackServer,
    registry: CollectorRegistry,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="poolwatch")
    proxy = loopback_server
    with hx.Client(proxy=proxy.url, limits=hx.Limits(max_connections=8)) as client:
        poolwatch.instrument(client, name="many-hosts")
        call_hosts(client, range(60))
        after_sixty = series(registry, "many-hosts")
        call_hosts(client, range(60, HOSTS))
        after_all = series(registry, "many-hosts")
        snap = poolwatch.snapshot(client)
        wait_until(lambda: proxy.stats.open_connections == snap.idle_connections)

    # 50 origins of their own, in the order they were first called, and the rest together.
    addresses = [o.address for o in snap.origins]
    assert addresses == [f"h{i}.test" for i in range(50)] + [OVERFLOW_ADDRESS]
    per_origin = {o.address: o.requests_new + o.requests_reused for o in snap.origins}
    assert per_origin[OVERFLOW_ADDRESS] == HOSTS - 50
    assert all(per_origin[f"h{i}.test"] == 1 for i in range(50))
    # Nothing is lost to the bound: the totals are the server's.
    assert snap.requests_total == HOSTS == proxy.stats.requests
    assert snap.connections_created_total == HOSTS == proxy.stats.accepted_connections
    assert snap.request_duration.count == HOSTS

    # The exposition stops growing at the bound: 940 more hosts, not one more series.
    assert len(after_all) == len(after_sixty)
    assert Counter(s[0] for s in after_all) == Counter(s[0] for s in after_sixty)
    exported = {
        labels["server_address"] for _, labels, _ in after_all if "server_address" in labels
    }
    assert exported == {f"h{i}.test" for i in range(50)} | {OVERFLOW_ADDRESS}
    other = [
        value
        for name, labels, value in after_all
        if name == "poolwatch_pool_requests_total"
        and labels.get("server_address") == OVERFLOW_ADDRESS
    ]
    assert sum(other) == HOSTS - 50

    # Said once, however many origins overflowed.
    (warning,) = overflow_records(caplog, "many-hosts")
    assert warning.levelno == logging.WARNING
    assert "max_origins" in warning.getMessage()


def test_a_lower_max_origins_bounds_the_series_at_that_limit_and_warns_once(
    hx: Any,
    loopback_server: LoopbackServer,
    registry: CollectorRegistry,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="poolwatch")
    with hx.Client(proxy=loopback_server.url) as client:
        poolwatch.instrument(client, name="five-origins", max_origins=5)
        call_hosts(client, range(40))
        call_hosts(client, range(40))  # the same hosts again: no new series, no new warning
        snap = poolwatch.snapshot(client)
        exported = series(registry, "five-origins")
    assert [o.address for o in snap.origins] == [f"h{i}.test" for i in range(5)] + ["_other"]
    assert snap.requests_total == 80 == loopback_server.stats.requests
    assert {labels.get("server_address") for _, labels, _ in exported} - {None} == {
        *(f"h{i}.test" for i in range(5)),
        OVERFLOW_ADDRESS,
    }
    assert len(overflow_records(caplog, "five-origins")) == 1


def test_each_pool_has_its_own_bound_and_its_own_warning(
    hx: Any, loopback_server: LoopbackServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="poolwatch")
    with (
        hx.Client(proxy=loopback_server.url) as a,
        hx.Client(proxy=loopback_server.url) as b,
    ):
        poolwatch.instrument(a, name="pool-a", max_origins=3)
        poolwatch.instrument(b, name="pool-b", max_origins=3)
        call_hosts(a, range(10))
        call_hosts(b, range(100, 110))
        snap_a, snap_b = poolwatch.snapshot(a), poolwatch.snapshot(b)
    assert [o.address for o in snap_a.origins] == ["h0.test", "h1.test", "h2.test", "_other"]
    assert [o.address for o in snap_b.origins] == ["h100.test", "h101.test", "h102.test", "_other"]
    assert len(overflow_records(caplog, "pool-a")) == 1
    assert len(overflow_records(caplog, "pool-b")) == 1


def test_the_core_keeps_its_bound_over_a_hundred_thousand_origins() -> None:
    overflowed: list[PoolCore] = []
    core = PoolCore("core", max_origins=50, on_origin_overflow=overflowed.append)
    for i in range(100_000):
        origin = core.origin((b"https", f"h{i}.test".encode(), 443))
        rec = core.start(origin)
        core.finish(rec)
    snap = core.snapshot()
    assert len(snap.origins) == 51
    assert snap.origins[-1].address == OVERFLOW_ADDRESS
    # Each request waited in the queue until it finished (none got a connection).
    assert snap.origins[-1].time_in_queue.count == 100_000 - 50
    assert sum(o.time_in_queue.count for o in snap.origins) == 100_000
    assert snap.request_duration.count == 100_000
    assert (snap.active_requests, snap.pending_requests) == (0, 0)
    assert overflowed == [core]  # the overflow callback ran once
    # An origin that already has its series keeps it after the overflow.
    assert core.origin((b"https", b"h7.test", 443)).address == "h7.test"
    assert core.origin((b"https", b"h7.test", None)).address == "h7.test"  # default port


def test_the_core_holds_no_memory_for_hosts_past_its_bound() -> None:
    core = PoolCore("core", max_origins=50)

    def call(hosts: range) -> None:
        for i in hosts:
            core.finish(core.start(core.origin((b"https", f"h{i}.test".encode(), None))))

    call(range(1_000))  # the 50 origins exist, and the overflow series
    tracemalloc.start()
    try:
        call(range(1_000, 6_000))
        before = tracemalloc.get_traced_memory()[0]
        call(range(6_000, 46_000))
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    # Remembering each of the 40,000 further hosts would take megabytes.
    assert grown < 64 * 1024, grown


def test_the_page_writer_keeps_no_text_for_origins_its_pools_no_longer_have() -> None:
    """A pool name whose origins keep changing (clients that come and go under one name)
    leaves the page writer's caches bounded, and the page shows only the origins of now."""
    exposition = Exposition()
    empty = HistogramSnapshot((1.0,), (0, 0), 0, 0.0)
    for round_ in range(60):
        hosts = [f"h{round_}-{i}.test" for i in range(5)]
        origins = tuple(
            OriginSnapshot(
                "https", host, 443, 0, round_, 1, 1, 0, {"timeout": 1}, ("1.1",), empty, empty
            )
            for host in hosts
        )
        snap = PoolSnapshot(
            name="churn", max_connections=10, active_connections=0, idle_connections=0,
            pending_requests=0, active_requests=0, utilization=0.0, requests_total=0,
            reused_requests_total=0, connections_created_total=0, pool_timeouts_total=0,
            leaked_responses_total=0, reuse_ratio=None, origins=origins,
        )  # fmt: skip
        page = exposition.render([snap]).decode()
        addresses = {
            s.labels["server_address"]
            for family in text_string_to_metric_families(page)
            for s in family.samples
            if "server_address" in s.labels
        }
        assert addresses == set(hosts)
        text = exposition._pools["churn"]
        assert text.origins is not None
        assert len(text.origins.shape) == 5
        assert len(text.open_keys) == 2 * 5  # active and idle of each origin now
        assert len(text.errors) <= 2 * 5 + 64
