"""``PoolSnapshot``: what a watched client's pools look like at one instant."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from ._core import OriginSnapshot
from ._frozen import TWINS, writable_twin
from ._histogram import HistogramSnapshot

#: The default of a histogram field: nothing observed (one +Inf bucket).
NO_OBSERVATIONS = HistogramSnapshot((), (0,), 0, 0.0)


@dataclass(frozen=True, slots=True)
class ConnectionGroup:
    """Open connections to one origin, in one state, over one protocol version."""

    scheme: str
    address: str
    port: int
    #: ``active`` (serving a request), ``idle`` (kept alive), or ``connecting`` (a slot taken
    #: by a connection no request is using yet: being set up, or orphaned by httpcore#1093).
    state: str
    #: ``1.1``, ``2``, or ``""`` while connecting.
    http_version: str
    count: int


@dataclass(frozen=True, slots=True)
class PoolSnapshot:
    """A watched client's pools at one instant, summed over all its pools and origins.

    Counters (``*_total``) only grow; gauges return to 0 when the client is at rest.
    """

    name: str
    #: The pool's limit (summed over the client's pools), ``None`` when any is unlimited.
    max_connections: int | None
    active_connections: int
    idle_connections: int
    pending_requests: int
    active_requests: int
    utilization: float
    requests_total: int
    reused_requests_total: int
    connections_created_total: int
    pool_timeouts_total: int
    leaked_responses_total: int
    reuse_ratio: float | None
    #: Slots held by connections no request is using yet (see ``ConnectionGroup.state``).
    connecting_connections: int = 0
    #: How long the oldest request still waiting has waited, in seconds (0.0 when none).
    pending_max_age: float = 0.0
    #: Age of the oldest request in flight, in seconds (0.0 when none).
    active_max_age: float = 0.0
    #: Requests that ended in an exception, by ``error.type``.
    errors: Mapping[str, int] | None = None  # read-only: a snapshot is shared by its readers
    connections: tuple[ConnectionGroup, ...] = ()
    origins: tuple[OriginSnapshot, ...] = ()
    #: Pools poolwatch could not read this time (their figures are missing, not zero).
    unreadable_pools: int = 0
    #: Request phases over the whole pool (queue wait is per origin, in ``origins``):
    #: TCP connect and TLS handshake of new connections, time to first byte, whole requests.
    connect_time: HistogramSnapshot = NO_OBSERVATIONS
    tls_time: HistogramSnapshot = NO_OBSERVATIONS
    time_to_first_byte: HistogramSnapshot = NO_OBSERVATIONS
    request_duration: HistogramSnapshot = NO_OBSERVATIONS


_WritableConnectionGroup = writable_twin(ConnectionGroup)


def _group_from_twin(
    scheme: str, address: str, port: int, state: str, http_version: str, count: int
) -> ConnectionGroup:
    g = _WritableConnectionGroup()
    g.scheme = scheme
    g.address = address
    g.port = port
    g.state = state
    g.http_version = http_version
    g.count = count
    g.__class__ = ConnectionGroup
    return g  # type: ignore[no-any-return]  # a call to typing.cast costs a frame


#: ``ConnectionGroup(...)`` by position, at a third of the cost (``_frozen``): a busy pool's
#: groups change at most readings.
new_connection_group: Callable[[str, str, int, str, str, int], ConnectionGroup] = (
    _group_from_twin if TWINS else ConnectionGroup
)

_WritablePoolSnapshot = writable_twin(PoolSnapshot)


def _built_from_twin(
    *,
    name: str,
    max_connections: int | None,
    active_connections: int,
    idle_connections: int,
    pending_requests: int,
    active_requests: int,
    utilization: float,
    requests_total: int,
    reused_requests_total: int,
    connections_created_total: int,
    pool_timeouts_total: int,
    leaked_responses_total: int,
    reuse_ratio: float | None,
    connecting_connections: int,
    pending_max_age: float,
    active_max_age: float,
    errors: Mapping[str, int],
    connections: tuple[ConnectionGroup, ...],
    origins: tuple[OriginSnapshot, ...],
    unreadable_pools: int,
    connect_time: HistogramSnapshot,
    tls_time: HistogramSnapshot,
    time_to_first_byte: HistogramSnapshot,
    request_duration: HistogramSnapshot,
) -> PoolSnapshot:
    s = _WritablePoolSnapshot()
    s.name = name
    s.max_connections = max_connections
    s.active_connections = active_connections
    s.idle_connections = idle_connections
    s.pending_requests = pending_requests
    s.active_requests = active_requests
    s.utilization = utilization
    s.requests_total = requests_total
    s.reused_requests_total = reused_requests_total
    s.connections_created_total = connections_created_total
    s.pool_timeouts_total = pool_timeouts_total
    s.leaked_responses_total = leaked_responses_total
    s.reuse_ratio = reuse_ratio
    s.connecting_connections = connecting_connections
    s.pending_max_age = pending_max_age
    s.active_max_age = active_max_age
    s.errors = errors
    s.connections = connections
    s.origins = origins
    s.unreadable_pools = unreadable_pools
    s.connect_time = connect_time
    s.tls_time = tls_time
    s.time_to_first_byte = time_to_first_byte
    s.request_duration = request_duration
    s.__class__ = PoolSnapshot
    return s  # type: ignore[no-any-return]  # a call to typing.cast costs a frame


#: ``PoolSnapshot(...)`` with every field given by keyword, at a third of the cost (``_frozen``).
new_pool_snapshot = _built_from_twin if TWINS else PoolSnapshot
