"""The Prometheus exposition, read back with prometheus_client's own parser and promtool,
compared with the snapshot after real traffic.

Every scrape here reads both pages: the registry as prometheus_client writes it (through
poolwatch's collector) and as ``poolwatch.prometheus.generate_latest`` writes it (the pools
written by poolwatch), and requires them to hold the same samples."""

from __future__ import annotations

import contextlib
import gc
import shutil
import subprocess
import urllib.request
from typing import Any

import anyio
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

import poolwatch
import poolwatch.prometheus
from poolwatch._catalogue import CATALOGUE, TLS_TIME
from poolwatch._loopback import LoopbackServer


@pytest.fixture
def registry() -> CollectorRegistry:
    """A private registry with poolwatch on it."""
    registry = CollectorRegistry()
    poolwatch.prometheus.enable(registry)
    return registry


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(text: bytes) -> Samples:
    """Every sample of a page: (name, sorted labels) -> value."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text.decode())
        for s in family.samples
    }


def scrape(registry: CollectorRegistry) -> Samples:
    """Every sample of the exposition, the same from both writers."""
    by_prometheus_client = parse(generate_latest(registry))
    by_poolwatch = parse(poolwatch.prometheus.generate_latest(registry))
    assert by_poolwatch == by_prometheus_client
    return by_poolwatch


def value(samples: dict[Any, float], name: str, **labels: str) -> float:
    matches = [
        v for (n, ls), v in samples.items() if n == name and labels.items() <= dict(ls).items()
    ]
    assert matches, f"no sample {name}{labels}"
    return sum(matches)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.mark.anyio
async def test_the_exposition_agrees_with_the_snapshot_after_queueing_timeouts_and_a_leak(
    hx: Any, loopback_server: LoopbackServer, registry: CollectorRegistry
) -> None:
    timeout = hx.Timeout(5.0, pool=0.15)
    async with hx.AsyncClient(limits=hx.Limits(max_connections=2), timeout=timeout) as client:
        poolwatch.instrument(client, name="llm")

        async def call() -> None:
            with contextlib.suppress(hx.PoolTimeout):
                await client.get(f"{loopback_server.url}/delay?s=0.4")

        async with anyio.create_task_group() as tg:
            for _ in range(6):
                tg.start_soon(call)
        leaked = await client.send(
            client.build_request("GET", f"{loopback_server.url}/ok"), stream=True
        )
        del leaked
        gc.collect()
        snap = poolwatch.snapshot(client)
        samples = scrape(registry)
    port = str(int(loopback_server.url.rsplit(":", 1)[1]))
    origin = {
        "pool_name": "llm",
        "server_address": "127.0.0.1",
        "server_port": port,
        "url_scheme": "http",
    }
    assert value(samples, "poolwatch_pool_requests_total", **origin, connection_reused="true") == (
        snap.reused_requests_total
    )
    assert value(samples, "poolwatch_pool_requests_total", **origin) == snap.requests_total
    assert (
        value(samples, "poolwatch_pool_connections_created_total", **origin)
        == (snap.connections_created_total)
        == loopback_server.stats.accepted_connections
    )
    assert value(samples, "poolwatch_pool_timeouts_total", **origin) == snap.pool_timeouts_total > 0
    assert value(samples, "poolwatch_pool_leaked_responses_total", pool_name="llm") == 1
    assert value(samples, "poolwatch_pool_connection_max", pool_name="llm") == 2
    assert (
        value(samples, "poolwatch_pool_utilization_ratio", pool_name="llm")
        == snap.utilization
        == 0.5
    )
    assert (
        value(samples, "http_client_open_connections", **origin, http_connection_state="active")
        == 1
    )
    assert value(
        samples, "http_client_open_connections", **origin, http_connection_state="idle"
    ) == (snap.idle_connections)
    assert value(samples, "http_client_active_requests", **origin) == 0
    assert value(samples, "poolwatch_pool_pending_requests", pool_name="llm") == 0
    (o,) = snap.origins
    assert (
        value(samples, "http_client_request_time_in_queue_seconds_count", **origin)
        == o.time_in_queue.count
    )
    assert value(
        samples, "http_client_request_time_in_queue_seconds_bucket", **origin, le="+Inf"
    ) == (o.time_in_queue.count)
    assert value(
        samples, "http_client_request_time_in_queue_seconds_bucket", **origin, le="600.0"
    ) == (o.time_in_queue.count)
    assert value(
        samples, "poolwatch_pool_request_errors_total", **origin, error_type="PoolTimeout"
    ) == (snap.pool_timeouts_total)


def test_every_catalogue_metric_is_exposed_with_its_help_and_type(
    hx: Any, loopback_server: LoopbackServer, registry: CollectorRegistry
) -> None:
    with hx.Client() as client:
        poolwatch.instrument(client)
        client.get(f"{loopback_server.url}/ok")
        with pytest.raises(hx.RemoteProtocolError):  # error series exist once an error happened
            client.get(f"{loopback_server.url}/drop")
        families = {
            f.name: f
            for f in text_string_to_metric_families(
                poolwatch.prometheus.generate_latest(registry).decode()
            )
        }
    assert parse(generate_latest(registry)) == parse(poolwatch.prometheus.generate_latest(registry))
    for spec in CATALOGUE:
        family = families[spec.exposition_name]
        assert family.type == spec.kind
        assert family.documentation == spec.help
        names = {s.name for s in family.samples}
        if spec is TLS_TIME:
            assert names == set()  # plain HTTP: no handshake, no series
        elif spec.kind == "counter":
            assert spec.prometheus_name in names
        elif spec.kind == "histogram":
            assert f"{spec.prometheus_name}_bucket" in names
        else:
            assert spec.prometheus_name in names


def test_promtool_finds_nothing_to_lint_in_the_exposition(
    hx: Any, loopback_server: LoopbackServer, registry: CollectorRegistry
) -> None:
    promtool = shutil.which("promtool")
    assert promtool, "promtool is missing: apt-get install -y --no-install-recommends prometheus"
    with hx.Client() as client:
        poolwatch.instrument(client)
        client.get(f"{loopback_server.url}/ok")
        pages = [generate_latest(registry), poolwatch.prometheus.generate_latest(registry)]
    for text in pages:
        result = subprocess.run(
            [promtool, "check", "metrics"], input=text, capture_output=True, check=False
        )
        assert result.returncode == 0, result.stderr.decode() + result.stdout.decode()


def test_pool_wide_series_exist_at_zero_before_the_first_request(
    hx: Any, registry: CollectorRegistry
) -> None:
    with hx.Client(limits=hx.Limits(max_connections=4)) as client:
        poolwatch.instrument(client, name="fresh")
        samples = scrape(registry)
    for name in (
        "poolwatch_pool_pending_requests",
        "poolwatch_pool_utilization_ratio",
        "poolwatch_pool_leaked_responses_total",
        "poolwatch_pool_pending_requests_max_age_seconds",
    ):
        assert value(samples, name, pool_name="fresh") == 0
    assert value(samples, "poolwatch_pool_connection_max", pool_name="fresh") == 4
    assert not any(
        n == "poolwatch_pool_requests_total" and ("pool_name", "fresh") in ls for n, ls in samples
    )


def test_per_origin_counters_start_at_zero_with_the_first_request(
    hx: Any, loopback_server: LoopbackServer, registry: CollectorRegistry
) -> None:
    with hx.Client() as client:
        poolwatch.instrument(client, name="first")
        client.get(f"{loopback_server.url}/ok")
        samples = scrape(registry)
    assert value(samples, "poolwatch_pool_timeouts_total", pool_name="first") == 0
    assert (
        value(samples, "poolwatch_pool_requests_total", pool_name="first", connection_reused="true")
        == 0
    )
    assert (
        value(
            samples, "poolwatch_pool_requests_total", pool_name="first", connection_reused="false"
        )
        == 1
    )


def test_enabling_twice_registers_once_and_later_pools_appear(hx: Any) -> None:
    registry = CollectorRegistry()
    poolwatch.prometheus.enable(registry)
    poolwatch.prometheus.enable(registry)  # would raise "Duplicated timeseries" if registered twice
    with hx.Client() as client:
        poolwatch.instrument(client, name="later")
        assert value(scrape(registry), "poolwatch_pool_pending_requests", pool_name="later") == 0


def test_a_pool_that_fails_to_read_never_fails_the_scrape(
    hx: Any,
    registry: CollectorRegistry,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    from poolwatch import _api

    with hx.Client() as good, hx.Client() as bad:
        poolwatch.instrument(good, name="good")
        poolwatch.instrument(bad, name="bad")
        broken = _api._lookup(bad)
        assert broken is not None

        def explode() -> poolwatch.PoolSnapshot:
            raise RuntimeError("cannot read")

        monkeypatch.setattr(broken, "snapshot", explode)
        for _ in range(2):
            samples = scrape(registry)
        assert value(samples, "poolwatch_pool_pending_requests", pool_name="good") == 0
        assert not any(("pool_name", "bad") in ls for _, ls in samples)
    assert [r.getMessage().split(":")[0] for r in caplog.records if r.name == "poolwatch"] == [
        "poolwatch internal error in prometheus collect (the request was not affected; further "
        "errors at this site are not logged)"
    ]


def test_the_http_server_binds_loopback_and_serves_the_pools(
    hx: Any, loopback_server: LoopbackServer
) -> None:
    registry = CollectorRegistry()
    server, thread = poolwatch.prometheus.start_http_server(0, registry=registry)
    try:
        host, port = server.server_address[:2]
        assert host == "127.0.0.1"
        with hx.Client() as client:
            poolwatch.instrument(client, name="served")
            client.get(f"{loopback_server.url}/ok")
            body = (
                urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5)
                .read()
                .decode()
            )
        requests = parse(body.encode())[
            (
                "poolwatch_pool_requests_total",
                (
                    ("connection_reused", "false"),
                    ("pool_name", "served"),
                    ("server_address", "127.0.0.1"),
                    ("server_port", str(loopback_server.port)),
                    ("url_scheme", "http"),
                ),
            )
        ]
        assert requests == 1
    finally:
        server.shutdown()
        thread.join(5)
