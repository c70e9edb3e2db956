"""A snapshot as samples of the catalogue's metrics: what every exporter exports.

The Prometheus collector, the multiprocess pusher and the OpenTelemetry observable callbacks
all iterate ``samples()``; none of them decides on its own which series exist.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from . import _catalogue as c
from ._histogram import HistogramSnapshot
from ._snapshot import PoolSnapshot


@dataclass(frozen=True, slots=True)
class Sample:
    """One series' value: label values are aligned with ``spec.attributes``."""

    spec: c.MetricSpec
    labels: tuple[str, ...]
    value: float | HistogramSnapshot


def samples(snap: PoolSnapshot) -> Iterator[Sample]:
    """Every series of one pool, zeros included, so ``rate()`` works from the first scrape.

    Pool-wide series always exist; per-origin ones from the first request to that origin.
    """
    pool = (snap.name,)
    yield Sample(c.PENDING_REQUESTS, pool, snap.pending_requests)
    yield Sample(c.PENDING_MAX_AGE, pool, snap.pending_max_age)
    yield Sample(c.ACTIVE_MAX_AGE, pool, snap.active_max_age)
    if snap.max_connections is not None:
        yield Sample(c.CONNECTION_MAX, pool, snap.max_connections)
    yield Sample(c.UTILIZATION, pool, snap.utilization)
    yield Sample(c.LEAKED_RESPONSES, pool, snap.leaked_responses_total)

    open_conns: dict[tuple[str, str, str, str, str], int] = {}
    for g in snap.connections:
        if g.state in ("active", "idle"):
            key = (g.address, str(g.port), g.scheme, g.state, g.http_version)
            open_conns[key] = open_conns.get(key, 0) + g.count
    for o in snap.origins:
        origin = (snap.name, o.address, str(o.port), o.scheme)
        for version in o.http_versions or ("1.1",):
            for state in ("active", "idle"):
                key = (o.address, str(o.port), o.scheme, state, version)
                open_conns.setdefault(key, 0)
        yield Sample(c.ACTIVE_REQUESTS, origin, o.active_requests)
        yield Sample(c.REQUESTS, (*origin, "true"), o.requests_reused)
        yield Sample(c.REQUESTS, (*origin, "false"), o.requests_new)
        yield Sample(c.CONNECTIONS_CREATED, origin, o.connections_created)
        yield Sample(c.TIMEOUTS, origin, o.timeouts)
        for error_type, n in sorted(o.errors.items()):
            yield Sample(c.REQUEST_ERRORS, (*origin, error_type), n)
        yield Sample(c.TIME_IN_QUEUE, origin, o.time_in_queue)
        yield Sample(c.CONNECTION_DURATION, origin, o.connection_duration)
        yield Sample(c.CONNECT_TIME, origin, o.connect_time)
        if o.scheme != "http" or o.tls_time.count:  # plain HTTP has no handshake to time
            yield Sample(c.TLS_TIME, origin, o.tls_time)
        yield Sample(c.TIME_TO_FIRST_BYTE, origin, o.time_to_first_byte)
        yield Sample(c.REQUEST_DURATION, origin, o.request_duration)
    for (address, port, scheme, state, version), n in sorted(open_conns.items()):
        yield Sample(c.OPEN_CONNECTIONS, (snap.name, address, port, scheme, state, version), n)
