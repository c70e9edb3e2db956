"""A snapshot as samples of the catalogue's metrics: what every exporter exports.

The Prometheus collector, the multiprocess pusher and the OpenTelemetry observable callbacks
all iterate ``samples()``; none of them decides on its own which series exist. poolwatch's own
Prometheus page (``_exposition.py``) walks the same parts (``POOL_SERIES``,
``pool_histograms``, ``ORIGIN_SERIES``, ``error_samples``, ``open_connection_counts``) without
making a tuple per sample, the bulk of a scrape's work when every origin moved.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from operator import attrgetter
from typing import Any, TypeAlias

from . import _api
from . import _catalogue as c
from ._core import OriginSnapshot
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


#: The series every origin has, each as (metric, label values after the origin's, the field of
#: ``OriginSnapshot`` it reads). ``samples()`` and poolwatch's own Prometheus page both walk it.
ORIGIN_SERIES: tuple[tuple[c.MetricSpec, tuple[str, ...], str], ...] = (
    (c.ACTIVE_REQUESTS, (), "active_requests"),
    (c.REQUESTS, ("true",), "requests_reused"),
    (c.REQUESTS, ("false",), "requests_new"),
    (c.CONNECTIONS_CREATED, (), "connections_created"),
    (c.TIMEOUTS, (), "timeouts"),
    (c.TIME_IN_QUEUE, (), "time_in_queue"),
    (c.CONNECTION_DURATION, (), "connection_duration"),
)
#: An origin's values of ``ORIGIN_SERIES``, in that order, in one call.
origin_values: Callable[[OriginSnapshot], tuple[Any, ...]] = attrgetter(
    *(field for _, _, field in ORIGIN_SERIES)
)


def samples(snap: PoolSnapshot) -> Iterator[Sample]:
    """Every series of one pool, zeros included, so ``rate()`` works from the first scrape.

    Pool-wide series always exist; per-origin ones from the first request to that origin.
    A series added here must come from one of the parts below, which poolwatch's own page
    (``_exposition._PoolText.fragments``) walks as well.
    """
    yield from pool_samples(snap)
    for o in snap.origins:
        origin = origin_labels(snap.name, o)
        for (spec, extra, _), value in zip(ORIGIN_SERIES, origin_values(o), strict=True):
            yield (spec, (*origin, *extra), value)
        yield from error_samples(origin, o)
    yield from open_connection_samples(snap)


def origin_labels(pool_name: str, o: OriginSnapshot) -> tuple[str, str, str, str]:
    """The label values every per-origin series starts with."""
    return (pool_name, o.address, str(o.port), o.scheme)


#: The pool-wide series that are numbers, each as (metric, the field of ``PoolSnapshot`` it
#: reads); a pool with no limit has no ``CONNECTION_MAX`` (its field is ``None``).
POOL_SERIES: tuple[tuple[c.MetricSpec, str], ...] = (
    (c.PENDING_REQUESTS, "pending_requests"),
    (c.PENDING_MAX_AGE, "pending_max_age"),
    (c.ACTIVE_MAX_AGE, "active_max_age"),
    (c.CONNECTION_MAX, "max_connections"),
    (c.UTILIZATION, "utilization"),
    (c.LEAKED_RESPONSES, "leaked_responses_total"),
)
#: A pool's values of ``POOL_SERIES``, in that order, in one call.
pool_values: Callable[[PoolSnapshot], tuple[Any, ...]] = attrgetter(
    *(field for _, field in POOL_SERIES)
)


def pool_samples(snap: PoolSnapshot) -> Iterator[Sample]:
    """The pool-wide series."""
    pool = (snap.name,)
    for (spec, _), value in zip(POOL_SERIES, pool_values(snap), strict=True):
        if value is not None:
            yield (spec, pool, value)
    for spec, histogram in pool_histograms(snap):
        yield (spec, pool, histogram)


def pool_histograms(snap: PoolSnapshot) -> Iterator[tuple[c.MetricSpec, HistogramSnapshot]]:
    """The pool-wide histograms."""
    yield (c.CONNECT_TIME, snap.connect_time)
    tls = snap.tls_time
    if tls.count or any(o.scheme != "http" for o in snap.origins):
        yield (c.TLS_TIME, tls)  # (plain HTTP only, so far: no handshake to time)
    yield (c.TIME_TO_FIRST_BYTE, snap.time_to_first_byte)
    yield (c.REQUEST_DURATION, snap.request_duration)


def error_samples(
    origin: tuple[str, ...], o: OriginSnapshot
) -> Iterator[tuple[c.MetricSpec, tuple[str, ...], int]]:
    """An origin's failed requests, one series per ``error.type`` seen."""
    for error_type, n in sorted(o.errors.items()):
        yield (c.REQUEST_ERRORS, (*origin, error_type), n)


def open_connection_samples(snap: PoolSnapshot) -> Iterator[Sample]:
    """Open connections by origin, state and protocol version."""
    for key, n in open_connection_counts(snap).items():
        yield (c.OPEN_CONNECTIONS, open_connection_labels(snap.name, key), n)


#: An open-connections series of a pool: (address, port, scheme, state, protocol version).
OpenConnectionKey: TypeAlias = tuple[str, int, str, str, str]


def open_connection_labels(pool_name: str, key: OpenConnectionKey) -> tuple[str, ...]:
    """The label values of one open-connections series."""
    address, port, scheme, state, version = key
    return (pool_name, address, str(port), scheme, state, version)


def open_connection_zeros(origins: Iterable[OriginSnapshot]) -> dict[OpenConnectionKey, int]:
    """A zero for every origin's states and versions seen (so a series that empties reads 0,
    never vanishes), in the origins' order."""
    zeros: dict[OpenConnectionKey, int] = {}
    for o in origins:
        for version in o.http_versions or ("1.1",):
            zeros[o.address, o.port, o.scheme, "active", version] = 0
            zeros[o.address, o.port, o.scheme, "idle", version] = 0
    return zeros


def open_connection_counts(
    snap: PoolSnapshot, zeros: dict[OpenConnectionKey, int] | None = None
) -> dict[OpenConnectionKey, int]:
    """Open connections by origin, state and protocol version: the zeros of its origins
    first (``zeros``: made before for origins of the same shape), then any other the pool
    has (connections with no version yet)."""
    counts = open_connection_zeros(snap.origins) if zeros is None else zeros.copy()
    for g in snap.connections:
        if g.state in ("active", "idle"):
            key = (g.address, g.port, g.scheme, g.state, g.http_version)
            counts[key] = counts.get(key, 0) + g.count
    return counts
