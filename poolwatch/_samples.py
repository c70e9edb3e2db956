"""A snapshot as samples of the catalogue's metrics: what every exporter exports.

The Prometheus collector, the multiprocess pusher and the OpenTelemetry observable callbacks
all iterate ``samples()``; none of them decides on its own which series exist.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TypeAlias

from . import _api
from . import _catalogue as c
from ._histogram import HistogramSnapshot
from ._safety import report_internal_error
from ._snapshot import PoolSnapshot

#: One series' value: ``(spec, label values aligned with spec.attributes, value)``. A plain
#: tuple: a scrape of 100 pools makes thousands, and a named tuple costs twice as much.
Sample: TypeAlias = tuple[c.MetricSpec, tuple[str, ...], "float | HistogramSnapshot"]


def every_snapshot(site: str) -> Iterator[PoolSnapshot]:
    """A snapshot of every watched pool; a pool that fails to read is left out (and logged
    once under ``site``), never the others."""
    for watch in _api.watches():
        try:
            snap = watch.snapshot()
        except Exception as exc:
            report_internal_error(site, exc)
            continue
        yield snap


def every_pool(site: str) -> Iterator[Sample]:
    """The samples of every watched pool, with ``every_snapshot``'s care."""
    for snap in every_snapshot(site):
        try:
            pool = list(samples(snap))
        except Exception as exc:
            report_internal_error(site, exc)
            continue
        yield from pool


def samples(snap: PoolSnapshot) -> Iterator[Sample]:
    """Every series of one pool, zeros included, so ``rate()`` works from the first scrape.

    Pool-wide series always exist; per-origin ones from the first request to that origin.
    """
    pool = (snap.name,)
    yield (c.PENDING_REQUESTS, pool, snap.pending_requests)
    yield (c.PENDING_MAX_AGE, pool, snap.pending_max_age)
    yield (c.ACTIVE_MAX_AGE, pool, snap.active_max_age)
    if snap.max_connections is not None:
        yield (c.CONNECTION_MAX, pool, snap.max_connections)
    yield (c.UTILIZATION, pool, snap.utilization)
    yield (c.LEAKED_RESPONSES, pool, snap.leaked_responses_total)
    for spec, histogram in (
        (c.CONNECT_TIME, snap.connect_time),
        (c.TLS_TIME, snap.tls_time),
        (c.TIME_TO_FIRST_BYTE, snap.time_to_first_byte),
        (c.REQUEST_DURATION, snap.request_duration),
    ):
        if (
            spec is c.TLS_TIME
            and not histogram.count
            and all(o.scheme == "http" for o in snap.origins)
        ):
            continue  # plain HTTP only (so far): no handshake to time
        yield (spec, pool, histogram)

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
        yield (c.ACTIVE_REQUESTS, origin, o.active_requests)
        yield (c.REQUESTS, (*origin, "true"), o.requests_reused)
        yield (c.REQUESTS, (*origin, "false"), o.requests_new)
        yield (c.CONNECTIONS_CREATED, origin, o.connections_created)
        yield (c.TIMEOUTS, origin, o.timeouts)
        for error_type, n in sorted(o.errors.items()):
            yield (c.REQUEST_ERRORS, (*origin, error_type), n)
        yield (c.TIME_IN_QUEUE, origin, o.time_in_queue)
        yield (c.CONNECTION_DURATION, origin, o.connection_duration)
    for (address, port, scheme, state, version), n in sorted(open_conns.items()):
        yield (c.OPEN_CONNECTIONS, (snap.name, address, port, scheme, state, version), n)
