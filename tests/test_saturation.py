"""Saturation warnings: when they fire, how often they repeat, and what they say."""

from __future__ import annotations

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


@pytest.mark.anyio
async def test_the_samplers_light_reading_agrees_with_a_full_snapshot_and_the_server(
    hx: Any, loopback_server: LoopbackServer
) -> None:
    async with hx.AsyncClient(limits=hx.Limits(max_connections=2)) as client:
        poolwatch.instrument(client, name="pressed")
        [watch] = [w for w in poolwatch._api.watches() if w.name == "pressed"]
        async with anyio.create_task_group() as tg:
            for _ in range(5):
                tg.start_soon(client.get, f"{loopback_server.url}/delay?s=0.5")
            await await_until(lambda: loopback_server.stats.in_flight_requests == 2)
            await anyio.sleep(0.05)  # the three others wait a little while
            pressure, snap = watch.pressure(), watch.snapshot()
        at_rest = watch.pressure()
    figures = ("active_connections", "max_connections", "utilization", "pending_requests")
    assert [getattr(pressure, f) for f in figures] == [getattr(snap, f) for f in figures]
    assert (pressure.active_connections, pressure.pending_requests) == (2, 3)  # the server's 2
    assert 0.05 <= pressure.pending_max_age <= snap.pending_max_age
    assert (at_rest.active_connections, at_rest.pending_requests, at_rest.utilization) == (
        0,
        0,
        0.0,
    )
