"""The pure core: what one watched client's pools are doing, counted exactly.

No I/O, no httpx, no awaits: the sync and async shells (``_shells.py``) call these methods at
the moments a request passes through the pool, with a clock reading, and the exporters read
``PoolCore.snapshot()`` at scrape time. Everything that can wait until a scrape does.

A request's life, and the method that marks each step::

    start() ─ pending ─ acquire() ─ [connect, TLS: on_trace_event()] ─ headers() ── finish()
                 ▲          │                                        (headers)    (closed,
                 └─ requeue()  (httpcore handed the connection to another request)  failed or
                                                                                   leaked())

The request path only notes: each step writes times and flags on its own request's record
(a request is one task or thread at a time, so no lock), and the record moves into the
in-flight map and, at its end, into a list of finished ones. The gauges are derived from the
records in flight when someone reads (``snapshot()``, ``waiting()``, ``connection_load()``),
and the counters and histograms are counted from the records by ``snapshot()``, or by
``finish()`` once ``_COUNT_AT`` have finished unread: under the core's lock, in one warm loop,
cheaper than in each request's cold code. ``finish()`` and the rare steps (requeue, trace
events, failures, leaks) take the lock: the sync client calls them from many threads, and
readers run in others. A reader that finds a record half written sees it as it was a step
before: each step writes the field readers test (``pending``, ``t_headers``) last.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from ._catalogue import (
    CONNECT_TIME,
    CONNECTION_DURATION,
    REQUEST_DURATION,
    TIME_IN_QUEUE,
    TIME_TO_FIRST_BYTE,
    TLS_TIME,
)
from ._frozen import TWINS, writable_twin
from ._histogram import Histogram, HistogramSnapshot

Clock = Callable[[], float]
"""Seconds from an arbitrary origin, monotonic (``time.perf_counter`` by default)."""

OriginKey = tuple[bytes, bytes, int | None]
"""(scheme, host, port) as httpcore's URL holds them; port ``None`` means the default."""

#: Series label used once a pool has seen more origins than ``max_origins``.
OVERFLOW_ADDRESS = "_other"

_DEFAULT_PORTS = {b"http": 80, b"https": 443, b"ws": 80, b"wss": 443}


class OriginStats:
    """Counters and histograms for one (scheme, host, port) of one pool."""

    __slots__ = (
        "active_requests",
        "address",
        "connection_duration",
        "connections_created",
        "errors",
        "http_versions",
        "port",
        "read_versions",
        "requests_new",
        "requests_reused",
        "scheme",
        "time_in_queue",
        "timeouts",
    )

    def __init__(self, scheme: str, address: str, port: int) -> None:
        self.scheme = scheme
        self.address = address
        self.port = port
        self.active_requests = 0
        self.requests_new = 0
        self.requests_reused = 0
        self.connections_created = 0
        self.timeouts = 0
        self.errors: dict[str, int] = {}
        #: Protocol versions seen on this origin ("1.1", "2"): which series exist.
        self.http_versions: set[str] = set()
        #: ``http_versions`` as the last snapshot showed them, sorted (the set only grows).
        self.read_versions: tuple[str, ...] = ()
        self.time_in_queue = Histogram(TIME_IN_QUEUE.buckets)
        self.connection_duration = Histogram(CONNECTION_DURATION.buckets)


class ConnRecord:
    """What poolwatch knows of one pooled connection (the connection object is httpcore's)."""

    __slots__ = ("closed", "connected", "held", "http_version", "maybe_h2", "origin", "t_open")

    def __init__(self, origin: OriginStats, *, maybe_h2: bool, connected: bool = False) -> None:
        self.origin = origin
        #: The TCP connection is up (set by the request whose trace saw the connect complete).
        self.connected = connected
        #: Could negotiate HTTP/2, so stream-slot waits may hide inside the connection call.
        self.maybe_h2 = maybe_h2
        #: Leaked responses holding this connection for good (``PoolCore.connection_load()``
        #: counts the requests holding it now from the requests in flight).
        self.held = 0
        #: "1.1" or "2" once a response told.
        self.http_version: str | None = None
        self.t_open: float | None = None
        self.closed = False


class Opening:
    """How a traced request's own connection came up: connect and TLS, from trace events.

    Made at the first connect or TLS event only: a request on a connection already up (most
    of them) has none, and its record stays small.
    """

    __slots__ = ("connect_time", "opened", "t_step", "tls_time")

    def __init__(self) -> None:
        #: When the step under way (connect, a TLS handshake) started; they never overlap.
        self.t_step: float | None = None
        self.connect_time: float | None = None
        #: Summed over handshakes (a proxy's, then the origin's through it).
        self.tls_time: float | None = None
        #: This request's own connect opened the connection it ran on.
        self.opened = False


class RequestRecord:
    """One request's passage through the pool, with the times of each step."""

    __slots__ = (
        "conn",
        "counted",
        "done",
        "error_type",
        "extra",
        "http_version",
        "opening",
        "origin",
        "pending",
        "status",
        "stream_ref",
        "t_end",
        "t_headers",
        "t_queue_end",
        "t_ready",
        "t_start",
    )

    def __init__(self, origin: OriginStats, t_start: float) -> None:
        self.origin = origin
        self.t_start = t_start
        self.pending = True
        self.done = False
        #: The connection the pool handed over (dropped if it never did: see ``finish()``).
        self.conn: ConnRecord | None = None
        self.opening: Opening | None = None
        #: The end of the queue wait; ``None`` while waiting, or with no pool to wait for.
        self.t_queue_end: float | None = None
        #: When the connection was ready to send on (after connect and TLS, or at acquire).
        self.t_ready: float | None = None
        self.t_headers: float | None = None
        self.t_end: float | None = None
        #: Counted (new or reused, time to first byte, queue, connect, TLS): by the first read
        #: after its headers came, at its connection failure, or after its end.
        self.counted = False
        self.status: int | None = None
        self.http_version: str | None = None
        self.error_type: str | None = None
        #: The weak reference to the response stream that detects a leak, while in flight
        #: (its callback holds this record: ``finish()`` breaks the cycle).
        self.stream_ref: object = None
        #: Exporters' per-request state (an OTel span), opaque to the core.
        self.extra: dict[Any, Any] | None = None

    @property
    def reused(self) -> bool | None:
        """Whether the connection already existed; ``None`` before one was obtained."""
        opening = self.opening
        if opening is not None and opening.opened:
            return False
        conn = self.conn
        if conn is not None and conn.connected:
            return True
        return None

    @property
    def queue_time(self) -> float | None:
        """How long it waited for a connection; ``None`` while it waits, or without a pool."""
        if self.t_queue_end is None:
            return None
        return self.t_queue_end - self.t_start

    @property
    def connect_time(self) -> float | None:
        opening = self.opening
        return None if opening is None else opening.connect_time

    @property
    def tls_time(self) -> float | None:
        opening = self.opening
        return None if opening is None else opening.tls_time


@dataclass(frozen=True, slots=True)
class OriginSnapshot:
    """Per-origin figures at one instant."""

    scheme: str
    address: str
    port: int
    active_requests: int
    requests_new: int
    requests_reused: int
    connections_created: int
    timeouts: int
    errors: Mapping[str, int]  # read-only: a snapshot is shared by its readers
    http_versions: tuple[str, ...]
    time_in_queue: HistogramSnapshot
    connection_duration: HistogramSnapshot


@dataclass(slots=True)
class CoreSnapshot:
    """The core's own counters at one instant (the shells add the pools' connection state).

    Read by the watch alone, never handed out: not frozen, so built at a third of the cost.
    """

    pending_requests: int
    active_requests: int
    leaked_responses: int
    pending_max_age: float
    active_max_age: float
    origins: tuple[OriginSnapshot, ...]
    connect_time: HistogramSnapshot
    tls_time: HistogramSnapshot
    time_to_first_byte: HistogramSnapshot
    request_duration: HistogramSnapshot


class PoolCore:
    """Exact bookkeeping for the pools of one watched client."""

    def __init__(
        self,
        name: str,
        *,
        clock: Clock = time.perf_counter,
        max_origins: int = 50,
        on_origin_overflow: Callable[[PoolCore], None] | None = None,
    ) -> None:
        self.name = name
        self.clock = clock
        self.max_origins = max_origins
        self._on_origin_overflow = on_origin_overflow
        self._lock = threading.Lock()
        self.leaked_count = 0
        #: Counts the changes a snapshot can show that may happen while no request is in
        #: flight: a request starting, an origin appearing, a connection closing. (A request's
        #: own changes all happen between its ``start()`` and its ``finish()``.) While it stands
        #: still and nothing is in flight, the last snapshot is still true.
        self.changes = 0
        #: Counts the connections joining and leaving (a part of ``changes``): while it stands
        #: still, nothing is in flight and no response leaked, the pool's connections are in
        #: the states of the last reading, but for what the server or a direct close did.
        self.connection_changes = 0
        #: Work handed over while the lock was taken (see ``when_unlocked``).
        self.deferred: list[Callable[[], None]] = []
        #: Request phases, pool-wide (the dashboard reads them by pool; per origin they were
        #: two thirds of a scrape).
        self.connect_time = Histogram(CONNECT_TIME.buckets)
        self.tls_time = Histogram(TLS_TIME.buckets)
        self.ttfb = Histogram(TIME_TO_FIRST_BYTE.buckets)
        self.request_duration = Histogram(REQUEST_DURATION.buckets)
        #: The request durations not yet in buckets: ``finish()`` appends to it directly.
        self._durations = self.request_duration.waiting
        self._origins: dict[OriginKey, OriginStats] = {}
        #: ``_origins`` by the keys requests come with (a default port as ``None`` too): one
        #: lookup per request. Overflowing keys stay out, so it holds at most two per origin.
        self._by_key: dict[OriginKey, OriginStats] = {}
        #: ``_by_key``, read-only, for the shells' lookup without a call (``origin()`` adds).
        self.known_origins: Mapping[OriginKey, OriginStats] = self._by_key
        self._overflow: OriginStats | None = None
        self._inflight: dict[int, RequestRecord] = {}
        #: Requests over, not yet counted (``_count_finished()``).
        self._finished: list[RequestRecord] = []
        #: Connections by ``id()``; the shells drop entries when a connection closes.
        self.conns: dict[int, ConnRecord] = {}

    # -- origins ---------------------------------------------------------------------------

    def origin(self, key: OriginKey) -> OriginStats:
        """The stats for an origin, created on first use; bounded by ``max_origins``."""
        stats = self._by_key.get(key)
        if stats is not None:
            return stats
        with self._lock:
            stats = self._by_key.get(key)
            if stats is None:
                stats = self._new_origin(key)
                if stats is not self._overflow:
                    self._by_key[key] = stats
            return stats

    def _new_origin(self, key: OriginKey) -> OriginStats:
        """The stats for a key not seen before (caller holds the lock)."""
        scheme, host, port = key
        if port is None:  # a URL's default port and a connection's explicit one are one origin
            port = _DEFAULT_PORTS.get(scheme, 0)
        stats = self._origins.get((scheme, host, port))
        if stats is not None:
            return stats
        if len(self._origins) >= self.max_origins:
            overflow = self._overflow
            if overflow is None:
                overflow = self._overflow = OriginStats("", OVERFLOW_ADDRESS, 0)
                self.changes += 1
                if self._on_origin_overflow is not None:
                    self._on_origin_overflow(self)
            return overflow
        stats = OriginStats(scheme.decode("ascii"), host.decode("ascii"), port)
        self._origins[(scheme, host, port)] = stats
        self.changes += 1
        return stats

    # -- work from the garbage collector ---------------------------------------------------

    def when_unlocked(self, work: Callable[[], None]) -> None:
        """Run ``work`` (which takes the lock) now, or later if the lock is taken.

        A weak reference's callback (a leaked response, found by the cyclic garbage
        collector) runs wherever an allocation set the collector off: inside this core's own
        locked sections too, in the thread that holds the lock, where waiting for it would
        never end. Deferred work runs at the next request's start or the next snapshot.
        """
        if self._lock.acquire(blocking=False):
            self._lock.release()
            work()  # if another thread takes the lock meanwhile, this one just waits
        else:
            self.deferred.append(work)

    def run_deferred(self) -> None:
        """Run the work handed over while the lock was taken (call without the lock)."""
        deferred = self.deferred
        while deferred:
            try:
                work = deferred.pop(0)
            except IndexError:  # another thread took the last one
                return
            work()

    # -- a request's steps -----------------------------------------------------------------

    def start(self, origin: OriginStats, *, pending: bool = True) -> RequestRecord:
        """A request entered the pool; it waits for a connection until ``acquire()``.

        ``pending=False`` is for transports without a pool: nothing to wait for.
        """
        if self.deferred:
            self.run_deferred()
        rec = RequestRecord(origin, self.clock())
        if not pending:  # no pool: no queue wait, connect or TLS to observe
            rec.t_ready = rec.t_start
            rec.pending = False
        self._inflight[id(rec)] = rec  # whole before a reader can see it
        self.changes += 1  # two starts at once may count one: a change all the same
        return rec

    def acquire(self, rec: RequestRecord, conn: ConnRecord, end_queue: bool) -> None:
        """The pool handed ``conn`` to the request (it may still be connecting).

        With ``end_queue=False`` the wait goes on until the first trace event: on a connection
        that may speak HTTP/2 the request can still wait for the connect of another request
        or for a stream slot inside the connection.
        """
        now = self.clock()
        rec.conn = conn
        if end_queue and rec.pending:
            rec.t_queue_end = now
            if conn.connected:
                rec.t_ready = now
            rec.pending = False  # last: a reader that sees it sees the times

    def requeue(self, rec: RequestRecord) -> None:
        """httpcore gave the connection to another request first; back to the queue.

        httpcore 1.0.9 does that to most requests at high concurrency (3.5 times per request
        at C=32 in ``bench/attempts.py``). A request whose own connect opened the connection
        may lose it so too (HTTP/2 offered, HTTP/1.1 negotiated, another request first on
        it): its connect and TLS times stay its own, but the connection it obtains in the end
        decides whether it ran on a new one.
        """
        with self._lock:
            rec.conn = None
            rec.t_queue_end = None
            rec.t_ready = None
            if rec.opening is not None:
                rec.opening.opened = False
            if not rec.done:
                rec.pending = True

    def on_trace_event(self, rec: RequestRecord, name: str) -> None:
        """An httpcore trace event of a traced request (new connections, and HTTP/2)."""
        now = self.clock()
        with self._lock:
            if rec.pending and not rec.done:
                rec.t_queue_end = now
                rec.pending = False
            head, _, phase = name.rpartition(".")
            step = _TRACE_STEPS.get(head.rpartition(".")[2])
            if step is None:
                if rec.t_ready is None and rec.conn is not None and rec.conn.connected:
                    rec.t_ready = now
                return
            opening = rec.opening
            if opening is None:
                opening = rec.opening = Opening()
            if phase == "started":
                opening.t_step = now
                return
            if phase != "complete":
                return
            elapsed = None if opening.t_step is None else now - opening.t_step
            opening.t_step = None
            rec.t_ready = now
            if step == _CONNECT:
                opening.connect_time = elapsed
                opening.opened = True
                conn = rec.conn
                if conn is not None and not conn.connected:
                    conn.connected = True
                    conn.t_open = now
                rec.origin.connections_created += 1
            elif elapsed is not None:
                opening.tls_time = (opening.tls_time or 0.0) + elapsed

    def headers(
        self,
        rec: RequestRecord,
        status: int,
        http_version: str | None,
        leak_ref: object = None,
    ) -> None:
        """The connection call returned the response headers.

        ``leak_ref``: see ``watch_for_leak()``. The request is counted on its connection, and
        its queue wait, connect, TLS and time to first byte observed, by the next read
        (``snapshot()``): known now, so exported then, while an LLM stream may stay open for
        minutes more.
        """
        now = self.clock()
        if not rec.done:
            if leak_ref is not None:
                rec.stream_ref = leak_ref
            if rec.pending:
                # A traced request that saw no event at all (cannot happen with httpcore's
                # events, but a foreign connection class might emit none): it waited until now.
                rec.t_queue_end = now
                rec.pending = False
        rec.status = status
        if http_version is not None:
            rec.http_version = http_version
            conn = rec.conn
            if conn is None:  # a transport without a pool
                if http_version not in rec.origin.http_versions:
                    with self._lock:  # readers sort the versions
                        rec.origin.http_versions.add(http_version)
            elif conn.http_version is None:  # the connection's first response
                with self._lock:
                    rec.origin.http_versions.add(http_version)
                    conn.http_version = http_version
                    if http_version != "2":
                        conn.maybe_h2 = False
        rec.t_headers = now  # last: a reader that sees it sees the rest

    def call_failed(self, rec: RequestRecord) -> None:
        """The connection call raised after ``acquire()``."""
        with self._lock:
            if rec.pending:
                # It never got past the queue (HTTP/2: cancelled while waiting for a stream
                # slot or another request's connect): not a request on a connection, and its
                # wait is observed when it finishes.
                return
            self._count((rec,))

    def finish(
        self,
        rec: RequestRecord,
        error_type: str | None = None,
        pool_timeout: bool = False,
    ) -> bool:
        """The request is over: response closed, or an exception left the pool.

        Returns False when it was already finished (finishing is idempotent).
        """
        now = self.clock()
        lock = self._lock
        lock.acquire()  # not `with`: ~190 ns against ~480
        try:
            if rec.done:
                return False
            rec.done = True
            rec.t_end = now
            rec.stream_ref = None  # its callback holds the record
            if rec.pending:
                # It never got a connection (PoolTimeout, cancelled; HTTP/2: one handed over,
                # but no stream on it yet): the whole wait counts, and no request on one.
                rec.t_queue_end = now
                rec.conn = None
                rec.pending = False
            if error_type is not None:
                rec.error_type = error_type
                errors = rec.origin.errors
                errors[error_type] = errors.get(error_type, 0) + 1
            if pool_timeout:
                rec.origin.timeouts += 1
            self._inflight.pop(id(rec), None)  # None: another watch's record, see _shells
            finished = self._finished
            finished.append(rec)
            if len(finished) >= _COUNT_AT:
                self._count_finished()
            return True
        finally:
            lock.release()

    def _count(self, recs: Iterable[RequestRecord]) -> None:
        """Count the requests not counted yet, once each (caller holds the lock): on a new
        connection or a reused one (if one was obtained), their queue wait, connect, TLS and
        time to first byte (those known)."""
        ttfb = self.ttfb.observe
        for rec in recs:
            if rec.counted:
                continue
            rec.counted = True
            origin = rec.origin
            opening = rec.opening
            # New or reused as ``rec.reused`` tells (inline: a property call a request).
            if opening is not None and opening.opened:
                origin.requests_new += 1
            else:
                conn = rec.conn
                if conn is not None and conn.connected:
                    origin.requests_reused += 1
            if rec.t_queue_end is not None:
                origin.time_in_queue.observe(rec.t_queue_end - rec.t_start)
            if rec.t_headers is not None and rec.t_ready is not None:
                ttfb(rec.t_headers - rec.t_ready)
            if opening is not None:
                if opening.connect_time is not None:
                    self.connect_time.observe(opening.connect_time)
                if opening.tls_time is not None:
                    self.tls_time.observe(opening.tls_time)

    def _count_finished(self) -> None:
        """Count the requests over since the last time (caller holds the lock)."""
        finished = self._finished
        self._count(finished)
        durations = self._durations
        durations += [rec.t_end - rec.t_start for rec in finished]  # type: ignore[operator]
        finished.clear()
        if len(durations) >= _FOLD_AT:
            self._fold()

    def _fold(self) -> None:
        """Sort every histogram's waiting values into buckets (caller holds the lock).

        Every request adds at most one value to each histogram, and the request duration gets
        one from every request: when it has ``_FOLD_AT`` waiting, none has more.
        """
        for h in (self.connect_time, self.tls_time, self.ttfb, self.request_duration):
            h.fold()
        for o in self._origins.values():
            o.time_in_queue.fold()
            o.connection_duration.fold()
        if self._overflow is not None:
            self._overflow.time_in_queue.fold()
            self._overflow.connection_duration.fold()

    def watch_for_leak(self, rec: RequestRecord, ref: object) -> None:
        """Keep ``ref`` (a weak reference to the response stream) while the request lasts."""
        with self._lock:
            if not rec.done:
                rec.stream_ref = ref

    def leaked(self, rec: RequestRecord) -> None:
        """The response was garbage-collected without being closed.

        The request is over for the application, so it leaves the active count, but httpcore
        never gets the connection back: it stays counted as held (active).
        """
        with self._lock:
            if rec.done:
                return
            self.leaked_count += 1
            if rec.conn is not None:
                rec.conn.held += 1
        self.finish(rec)

    # -- connections -----------------------------------------------------------------------

    def add_connection(self, key: int, conn: ConnRecord) -> None:
        """A connection joined the pool (``key``: its ``id()``)."""
        with self._lock:
            self.conns[key] = conn
            self.changes += 1
            self.connection_changes += 1

    def connection_closed(self, conn: ConnRecord, key: int) -> float | None:
        """A connection left the pool (closed by the pool, the server, or an error).

        Returns its lifetime, the first time only, if it had been connected.
        """
        now = self.clock()
        with self._lock:
            self.changes += 1
            self.connection_changes += 1
            if self.conns.get(key) is conn:  # the id may be a newer connection's by now
                del self.conns[key]
            if conn.closed:
                return None
            conn.closed = True
            if conn.t_open is None:
                return None
            lifetime = now - conn.t_open
            conn.origin.connection_duration.observe(lifetime)
            return lifetime

    # -- reading ---------------------------------------------------------------------------

    @property
    def active(self) -> int:
        """Requests in flight now."""
        return len(self._inflight)

    def waiting(self) -> tuple[int, float]:
        """Requests waiting for a connection now, and how long the oldest has waited: what a
        saturation check needs, without the histograms and origins of a ``snapshot()``."""
        now = self.clock()
        with self._lock:
            pending = 0
            oldest = 0.0
            for rec in list(self._inflight.values()):
                if rec.pending:
                    pending += 1
                    oldest = max(oldest, now - rec.t_start)
            return pending, oldest

    def connection_load(self) -> dict[ConnRecord, int]:
        """Requests holding each connection now (HTTP/2: open streams, and those connecting),
        and the leaked responses that hold it for good; a connection not in it holds none."""
        with self._lock:
            load = {conn: conn.held for conn in self.conns.values() if conn.held}
            for rec in list(self._inflight.values()):
                conn = rec.conn
                if conn is not None:
                    load[conn] = load.get(conn, 0) + 1
            return load

    def snapshot(self) -> CoreSnapshot:
        now = self.clock()
        with self._lock:
            self._count_finished()
            origins = list(self._origins.values())
            if self._overflow is not None:
                origins.append(self._overflow)
            for o in origins:
                o.active_requests = 0
            pending = 0
            pending_age = active_age = 0.0
            inflight = list(self._inflight.values())
            responded = []  # counted now: an LLM stream may stay open for minutes more
            for rec in inflight:
                rec.origin.active_requests += 1
                age = now - rec.t_start
                active_age = max(active_age, age)
                if rec.pending:
                    pending += 1
                    pending_age = max(pending_age, age)
                elif rec.t_headers is not None:
                    responded.append(rec)
            self._count(responded)
            return CoreSnapshot(
                pending_requests=pending,
                active_requests=len(inflight),
                leaked_responses=self.leaked_count,
                pending_max_age=pending_age,
                active_max_age=active_age,
                origins=tuple(_snapshot_origin(o) for o in origins),
                connect_time=self.connect_time.snapshot(),
                tls_time=self.tls_time.snapshot(),
                time_to_first_byte=self.ttfb.snapshot(),
                request_duration=self.request_duration.snapshot(),
            )


def _snapshot_origin(o: OriginStats) -> OriginSnapshot:
    versions = o.read_versions
    if len(versions) != len(o.http_versions):
        versions = o.read_versions = tuple(sorted(o.http_versions))
    return _new_origin_snapshot(
        o.scheme,
        o.address,
        o.port,
        o.active_requests,
        o.requests_new,
        o.requests_reused,
        o.connections_created,
        o.timeouts,
        MappingProxyType(dict(o.errors)) if o.errors else NO_ERRORS,
        versions,
        o.time_in_queue.snapshot(),
        o.connection_duration.snapshot(),
    )


_WritableOriginSnapshot = writable_twin(OriginSnapshot)


def _built_from_twin(
    scheme: str,
    address: str,
    port: int,
    active_requests: int,
    requests_new: int,
    requests_reused: int,
    connections_created: int,
    timeouts: int,
    errors: Mapping[str, int],
    http_versions: tuple[str, ...],
    time_in_queue: HistogramSnapshot,
    connection_duration: HistogramSnapshot,
) -> OriginSnapshot:
    s = _WritableOriginSnapshot()
    s.scheme = scheme
    s.address = address
    s.port = port
    s.active_requests = active_requests
    s.requests_new = requests_new
    s.requests_reused = requests_reused
    s.connections_created = connections_created
    s.timeouts = timeouts
    s.errors = errors
    s.http_versions = http_versions
    s.time_in_queue = time_in_queue
    s.connection_duration = connection_duration
    s.__class__ = OriginSnapshot
    return s  # type: ignore[no-any-return]  # a call to typing.cast costs a frame


#: ``OriginSnapshot(...)`` by position, at a third of the cost (``_frozen``).
_new_origin_snapshot = _built_from_twin if TWINS else OriginSnapshot

NO_ERRORS: Mapping[str, int] = MappingProxyType({})

#: Waiting histogram values that make ``finish()`` fold them (bounds memory between reads).
_FOLD_AT = 1024
#: Finished requests that make ``finish()`` count them (each keeps its record until then).
_COUNT_AT = 256

_CONNECT = 1
_TLS = 2
#: httpcore trace steps that matter, by their middle name ("connection.connect_tcp.started").
#: SOCKS and proxy connections emit the same steps under another prefix.
_TRACE_STEPS = {
    "connect_tcp": _CONNECT,
    "connect_unix_socket": _CONNECT,
    "start_tls": _TLS,
}
