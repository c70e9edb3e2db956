"""Saturation warnings: when they fire, how often they repeat, and what they say."""

from __future__ import annotations

import gc
import logging
from dataclasses import replace
from typing import Any

import anyio
import pytest
from truth import await_until, wait_until

import poolwatch
from poolwatch._loopback import LoopbackServer
from poolwatch._saturation import SaturationMonitor, check_all

CALM = poolwatch.PoolSnapshot(
    name="llm",
    max_connections=20,
    active_connections=5,
    idle_connections=2,
    pending_requests=0,
    active_requests=5,
    utilization=0.25,
    requests_total=100,
    reused_requests_total=90,
    connections_created_total=10,
    pool_timeouts_total=0,
    leaked_responses_total=0,
    reuse_ratio=0.9,
)
BUSY = replace(
    CALM, active_connections=17, utilization=0.85, pending_requests=4, pending_max_age=0.4
)
EDGE = replace(CALM, active_connections=15, utilization=0.75, pending_requests=0)


def test_crossing_the_threshold_warns_once_with_the_figures_and_what_to_do() -> None:
    monitor = SaturationMonitor(threshold=0.8, interval=60)
    assert monitor.evaluate(CALM, now=0) is None
    event = monitor.evaluate(BUSY, now=1)
    assert event is not None
    assert event.kind == "saturated"
    assert "pool 'llm' is saturated: 17/20 connections, 4 waiting (oldest 0.4 s)" in event.message
    assert "raise max_connections" in event.message
    assert monitor.evaluate(BUSY, now=30) is None  # at most once per interval


def test_a_pool_that_stays_saturated_is_reported_again_each_interval() -> None:
    monitor = SaturationMonitor(threshold=0.8, interval=60)
    monitor.evaluate(BUSY, now=0)
    assert monitor.evaluate(BUSY, now=59) is None
    again = monitor.evaluate(BUSY, now=60)
    assert again is not None
    assert again.kind == "still_saturated"
    assert again.saturated_for == 60
    assert "still saturated for 60 s" in again.message


def test_recovery_needs_to_fall_below_the_hysteresis_and_nobody_waiting() -> None:
    monitor = SaturationMonitor(threshold=0.8, hysteresis=0.1, interval=600)
    monitor.evaluate(BUSY, now=0)
    assert monitor.evaluate(EDGE, now=5) is None  # 0.75: below the threshold, not below 0.7
    assert monitor.evaluate(replace(CALM, pending_requests=1), now=6) is None  # someone waits
    event = monitor.evaluate(CALM, now=10)
    assert event is not None
    assert event.kind == "recovered"
    assert event.message == (
        "poolwatch: pool 'llm' recovered: 5/20 connections, 0 waiting (saturated for 10 s)"
    )
    assert not monitor.saturated


def test_a_request_waiting_a_second_is_saturation_even_with_connections_to_spare() -> None:
    # HTTP/2: one connection, all its stream slots taken.
    h2 = replace(
        CALM, active_connections=1, utilization=0.05, pending_requests=30, pending_max_age=1.5
    )
    event = SaturationMonitor().evaluate(h2, now=0)
    assert event is not None
    assert event.kind == "saturated"
    assert "stream slot" in event.message
    assert "raise max_connections" not in event.message


def test_an_unlimited_pool_says_so_in_the_figures() -> None:
    waiting = replace(
        CALM, max_connections=None, utilization=0.0, pending_requests=2, pending_max_age=3.0
    )
    event = SaturationMonitor().evaluate(waiting, now=0)
    assert event is not None
    assert "5/unlimited connections, 2 waiting (oldest 3.0 s)" in event.message


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.mark.anyio
async def test_a_real_saturated_pool_logs_a_warning_and_calls_back_then_recovers(
    hx: Any, loopback_server: LoopbackServer, caplog: pytest.LogCaptureFixture
) -> None:
    events: list[poolwatch.SaturationEvent] = []
    caplog.set_level(logging.INFO, logger="poolwatch")
    async with hx.AsyncClient(limits=hx.Limits(max_connections=2)) as client:
        poolwatch.instrument(client, name="saturating", on_saturation=events.append)
        async with anyio.create_task_group() as tg:
            for _ in range(5):
                tg.start_soon(client.get, f"{loopback_server.url}/delay?s=0.3")
            await await_until(lambda: loopback_server.stats.in_flight_requests == 2)
            check_all(now=1000.0)
        check_all(now=1001.0)
    assert [e.kind for e in events if e.pool_name == "saturating"] == ["saturated", "recovered"]
    warning = next(r for r in caplog.records if r.levelno == logging.WARNING)
    assert "pool 'saturating' is saturated: 2/2 connections, 3 waiting" in warning.getMessage()
    info = next(
        r for r in caplog.records if r.levelno == logging.INFO and "recovered" in r.getMessage()
    )
    assert "pool 'saturating' recovered: 0/2 connections, 0 waiting" in info.getMessage()


def test_a_failing_callback_is_logged_once_and_does_not_stop_the_warnings(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from poolwatch._saturation import emit

    def broken(event: poolwatch.SaturationEvent) -> None:
        raise RuntimeError("callback bug")

    monitor = SaturationMonitor(interval=1)
    for now in (0, 1, 2):
        event = monitor.evaluate(BUSY, now=now)
        assert event is not None
        emit(event, broken)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(warnings) == 3
    assert len(errors) == 1
    assert "on_saturation callback" in errors[0].getMessage()


def test_the_sampler_thread_checks_every_pool_by_itself(
    hx: Any, loopback_server: LoopbackServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    import poolwatch._saturation as saturation

    events: list[poolwatch.SaturationEvent] = []
    with hx.Client(limits=hx.Limits(max_connections=1)) as client:
        poolwatch.instrument(client, name="sampled", on_saturation=events.append)
        stream = client.stream("GET", f"{loopback_server.url}/stream?chunks=2&delay=1")
        with stream:
            monkeypatch.setattr(saturation, "SAMPLE_INTERVAL", 0.02)
            saturation.sampler.wake()
            wait_until(lambda: any(e.pool_name == "sampled" for e in events), what="a warning")
        monkeypatch.setattr(saturation, "SAMPLE_INTERVAL", 3600.0)
        saturation.sampler.wake()
    assert events[0].kind == "saturated"
    assert events[0].active_connections == 1


def assert_light_reading_agrees(watch: Any) -> Any:
    """The sampler's reading against a full snapshot taken right after it."""
    pressure, snap = watch.pressure(), watch.snapshot()
    figures = ("active_connections", "max_connections", "utilization", "pending_requests")
    assert [getattr(pressure, f) for f in figures] == [getattr(snap, f) for f in figures]
    assert pressure.pending_max_age <= snap.pending_max_age < pressure.pending_max_age + 0.5
    return pressure


def watch_named(name: str) -> Any:
    [watch] = [w for w in poolwatch._api.watches() if w.name == name]
    return watch


@pytest.mark.anyio
async def test_the_samplers_light_reading_agrees_with_a_full_snapshot_and_the_server(
    hx: Any, loopback_server: LoopbackServer
) -> None:
    async with hx.AsyncClient(limits=hx.Limits(max_connections=2)) as client:
        poolwatch.instrument(client, name="pressed")
        watch = watch_named("pressed")
        async with anyio.create_task_group() as tg:
            for _ in range(5):
                tg.start_soon(client.get, f"{loopback_server.url}/delay?s=0.5")
            await await_until(lambda: loopback_server.stats.in_flight_requests == 2)
            await anyio.sleep(0.05)  # the three others wait a little while
            pressure = assert_light_reading_agrees(watch)
            assert (pressure.active_connections, pressure.pending_requests) == (2, 3)
            assert pressure.pending_max_age >= 0.05
        at_rest = assert_light_reading_agrees(watch)
    assert (at_rest.active_connections, at_rest.pending_requests, at_rest.utilization) == (
        0,
        0,
        0.0,
    )


@pytest.mark.anyio
async def test_the_light_reading_counts_connections_not_requests_on_http2(
    hx: Any, loopback_server_factory: Any
) -> None:
    """One HTTP/2 connection carries two streams (the server's limit) while three requests
    wait for a slot: one busy connection, not two, and three waiting."""
    server = loopback_server_factory(h2_max_concurrent_streams=2)
    limits = hx.Limits(max_connections=1)
    async with hx.AsyncClient(http1=False, http2=True, limits=limits) as client:
        poolwatch.instrument(client, name="streams")
        watch = watch_named("streams")
        await client.get(f"{server.url}/ok")
        async with anyio.create_task_group() as tg:
            for _ in range(5):
                tg.start_soon(client.get, f"{server.url}/delay?s=0.5")
            await await_until(lambda: server.stats.in_flight_requests == 2)
            await anyio.sleep(0.05)
            pressure = assert_light_reading_agrees(watch)
        assert (pressure.active_connections, pressure.pending_requests) == (1, 3)
        assert server.stats.accepted_connections == 1


@pytest.mark.anyio
async def test_the_light_reading_counts_a_leaked_responses_connection_as_busy(
    hx: Any, loopback_server: LoopbackServer
) -> None:
    """A response garbage-collected unclosed keeps its connection held, with no request in
    flight; found while the core's lock was held, it is counted on the sampler's next look."""
    async with hx.AsyncClient(limits=hx.Limits(max_connections=3)) as client:
        poolwatch.instrument(client, name="leaky")
        watch = watch_named("leaky")
        response = await client.send(
            client.build_request("GET", f"{loopback_server.url}/stream?chunks=3"), stream=True
        )
        with watch.core._lock:  # the collector runs inside a locked section: deferred
            del response
            gc.collect()
        assert watch.core.deferred
        assert watch.core.leaked_count == 0
        check_all()  # the sampler's step, before any full snapshot
        assert not watch.core.deferred
        assert watch.core.leaked_count == 1
        pressure = assert_light_reading_agrees(watch)
        assert (pressure.active_connections, pressure.pending_requests) == (1, 0)
        assert watch.core.active == 0


@pytest.mark.anyio
async def test_the_light_reading_agrees_on_connections_poolwatch_lost_track_of(
    hx: Any, loopback_server: LoopbackServer
) -> None:
    """Connections whose records are gone (their watch failed) are read from httpcore."""
    async with hx.AsyncClient(limits=hx.Limits(max_connections=3)) as client:
        poolwatch.instrument(client, name="untracked")
        watch = watch_named("untracked")
        await client.get(f"{loopback_server.url}/ok")
        async with anyio.create_task_group() as tg:
            for _ in range(2):
                tg.start_soon(client.get, f"{loopback_server.url}/delay?s=0.5")
            await await_until(lambda: loopback_server.stats.in_flight_requests == 2)
            watch.core.conns.clear()
            pressure = assert_light_reading_agrees(watch)
            assert pressure.active_connections == 2
        assert assert_light_reading_agrees(watch).active_connections == 0
