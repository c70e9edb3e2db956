"""Saturation warnings: a WARNING on the ``poolwatch`` logger when a pool runs out of room.

A pool is saturated when its utilization reaches the threshold (default 0.8), or when a
request has waited a whole second for a connection (an HTTP/2 pool saturates its stream
slots long before its connection limit). The warning names the pool, the figures and what
to do; it repeats at most once per interval while the pool stays saturated, and an INFO line
says when it recovered (utilization below the threshold minus the hysteresis, nobody
waiting). The same moments reach ``on_saturation`` callbacks as ``SaturationEvent``s.

``SaturationMonitor`` is pure (a reading and the time in, event out); a daemon thread samples
every watched pool once a second, off the request path. The sampler's reading is a light one
(``ClientWatch.pressure``: busy connections, the limit, the waiting requests), a fraction of
a full snapshot's cost: a full read of every busy pool each second took ~1.3 % of a core
for 100 busy pools.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, NamedTuple, Protocol

from ._safety import logger, report_internal_error

#: A request waiting this long means saturation whatever the utilization says.
WAIT_THRESHOLD = 1.0
#: How often the sampler thread looks at every pool.
SAMPLE_INTERVAL = 1.0


@dataclass(frozen=True, slots=True)
class SaturationEvent:
    """A saturation moment of one pool, as logged."""

    kind: Literal["saturated", "still_saturated", "recovered"]
    pool_name: str
    utilization: float
    active_connections: int
    max_connections: int | None
    pending_requests: int
    #: How long the oldest waiting request has waited, in seconds.
    pending_max_age: float
    #: Seconds since the pool became saturated (for ``recovered``: how long it was).
    saturated_for: float
    message: str


SaturationCallback = Callable[[SaturationEvent], None]


class Reading(Protocol):
    """The figures a saturation check reads: a ``PoolSnapshot`` has them, and so has the
    sampler's lighter ``Pressure``."""

    @property
    def name(self) -> str: ...
    @property
    def max_connections(self) -> int | None: ...
    @property
    def active_connections(self) -> int: ...
    @property
    def utilization(self) -> float: ...
    @property
    def pending_requests(self) -> int: ...
    @property
    def pending_max_age(self) -> float: ...


class Pressure(NamedTuple):
    """A pool's ``Reading`` without the rest of a snapshot (``ClientWatch.pressure``)."""

    name: str
    max_connections: int | None
    active_connections: int
    utilization: float
    pending_requests: int
    pending_max_age: float


class SaturationMonitor:
    """Hysteresis and rate limiting for one pool's saturation warnings."""

    def __init__(
        self,
        *,
        threshold: float = 0.8,
        hysteresis: float = 0.1,
        interval: float = 60.0,
        wait_threshold: float = WAIT_THRESHOLD,
    ) -> None:
        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"saturation_threshold must be in (0, 1], got {threshold!r}")
        if not 0.0 <= hysteresis < threshold:
            raise ValueError(f"hysteresis must be in [0, threshold), got {hysteresis!r}")
        if interval <= 0:
            raise ValueError(f"warning_interval must be positive, got {interval!r}")
        self.threshold = threshold
        self.recovery = threshold - hysteresis
        self.interval = interval
        self.wait_threshold = wait_threshold
        self._since: float | None = None
        self._last_warning = 0.0

    @property
    def saturated(self) -> bool:
        return self._since is not None

    def evaluate(self, snap: Reading, now: float) -> SaturationEvent | None:
        """The event this reading calls for, if any."""
        hot = snap.utilization >= self.threshold or snap.pending_max_age >= self.wait_threshold
        if self._since is None:
            if not hot:
                return None
            self._since = self._last_warning = now
            return _event("saturated", snap, 0.0, self.threshold)
        if hot or snap.utilization >= self.recovery or snap.pending_requests > 0:
            if now - self._last_warning >= self.interval:
                self._last_warning = now
                return _event("still_saturated", snap, now - self._since, self.threshold)
            return None
        lasted = now - self._since
        self._since = None
        return _event("recovered", snap, lasted, self.threshold)


def _figures(snap: Reading) -> str:
    limit = "unlimited" if snap.max_connections is None else str(snap.max_connections)
    waiting = f"{snap.pending_requests} waiting"
    if snap.pending_requests:
        waiting += f" (oldest {snap.pending_max_age:.1f} s)"
    return f"{snap.active_connections}/{limit} connections, {waiting}"


def _event(
    kind: Literal["saturated", "still_saturated", "recovered"],
    snap: Reading,
    lasted: float,
    threshold: float,
) -> SaturationEvent:
    figures = _figures(snap)
    if kind == "recovered":
        message = (
            f"poolwatch: pool {snap.name!r} recovered: {figures} (saturated for {lasted:.0f} s)"
        )
    else:
        still = "still " if kind == "still_saturated" else ""
        since = f" for {lasted:.0f} s" if kind == "still_saturated" else ""
        if snap.utilization < threshold:
            # Connections to spare, yet requests wait: HTTP/2 stream slots (httpx opens no
            # second connection while the first accepts streams), or an unlimited pool.
            advice = (
                "Requests wait with connections to spare: on HTTP/2 they queue for a stream "
                "slot of the one connection (the server's concurrent-stream limit); lower the "
                "concurrency, spread it over more clients, or use HTTP/1.1."
            )
        elif snap.pending_requests == 0:
            advice = (
                "Every connection is busy, so the next request will wait: raise "
                "max_connections (httpx.Limits) if the load grows."
            )
        else:
            advice = (
                "Requests queue for a connection: raise max_connections (httpx.Limits), lower "
                "the concurrency, or check that streamed responses are closed."
            )
        message = (
            f"poolwatch: pool {snap.name!r} is {still}saturated{since}: {figures}, "
            f"utilization {snap.utilization:.0%}. {advice}"
        )
    return SaturationEvent(
        kind=kind,
        pool_name=snap.name,
        utilization=snap.utilization,
        active_connections=snap.active_connections,
        max_connections=snap.max_connections,
        pending_requests=snap.pending_requests,
        pending_max_age=snap.pending_max_age,
        saturated_for=lasted,
        message=message,
    )


def emit(event: SaturationEvent, callback: SaturationCallback | None) -> None:
    """Log the event (WARNING, or INFO on recovery) and hand it to the callback."""
    if event.kind == "recovered":
        logger.info(event.message)
    else:
        logger.warning(event.message)
    if callback is not None:
        try:
            callback(event)
        except Exception as exc:
            report_internal_error("on_saturation callback", exc)


class _Sampler:
    """The daemon thread that evaluates every watch's monitor once a second."""

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._wake = threading.Event()

    def wake(self) -> None:
        """Check now instead of at the end of the current interval."""
        self._wake.set()

    def ensure_running(self) -> None:
        with self._lock:
            if self._thread is not None and self._thread.is_alive():
                return
            self._thread = threading.Thread(
                target=self._loop, name="poolwatch-saturation", daemon=True
            )
            self._thread.start()

    def _loop(self) -> None:
        while True:
            self._wake.wait(SAMPLE_INTERVAL)
            self._wake.clear()
            check_all()


sampler = _Sampler()


def check_all(now: float | None = None) -> None:
    """Evaluate every watched pool now (the sampler's step; tests call it directly)."""
    from . import _api  # noqa: PLC0415 - _api imports this module

    for watch in _api.watches():
        try:
            monitor = watch.saturation
            if monitor is None:
                continue
            event = monitor.evaluate(watch.pressure(), time.monotonic() if now is None else now)
            if event is not None:
                emit(event, watch.on_saturation)
        except Exception as exc:
            report_internal_error("saturation check", exc)
