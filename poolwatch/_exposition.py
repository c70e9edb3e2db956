"""poolwatch's own Prometheus exposition: the pools' samples as text, fast.

prometheus_client formats every sample anew (escaping each label, sorting the labels), about
20 µs a line on a slow machine: 1.2 s for 100 pools x 5 origins (58,000 lines, six histograms
of twenty buckets per origin). Here each series' text is built once: a scalar's line prefix,
a histogram's bucket prefixes; a scrape only writes the values. A histogram whose count has not
moved since the last scrape reuses its whole block, and the buckets of a block are written in
runs of equal cumulative counts, ``"<count>\\n".join(prefixes)``, so a scrape costs a few
operations per series, not per line; an origin's series are written from ``ORIGIN_SERIES``
with one ``attrgetter`` call, no lookup per sample. And a pool at rest costs nothing to speak
of: its snapshot is the very object of the last scrape (``ClientWatch.snapshot``), so its text
is reused whole.

Both formats prometheus_client speaks are written: the text format (0.0.4) and OpenMetrics 1.0
(what Prometheus asks for first). They differ, for poolwatch's metrics, only in the family
name of counters on the HELP and TYPE lines, the escaping of HELP, and the final ``# EOF``,
which the caller passes as what comes after the pools (the rest of the registry comes
before them). The page is bytes, UTF-8, joined once from every piece.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterable
from itertools import compress

from ._catalogue import CATALOGUE, OPEN_CONNECTIONS, MetricSpec
from ._histogram import HistogramSnapshot
from ._safety import report_internal_error
from ._samples import (
    ORIGIN_SERIES,
    OpenConnectionKey,
    error_samples,
    open_connection_counts,
    open_connection_labels,
    origin_labels,
    origin_values,
    pool_samples,
)
from ._snapshot import PoolSnapshot


class Exposition:
    """Renders pools' snapshots in the catalogue's order, reusing every text it built before.

    Each pool keeps its own text: a pool whose snapshot is the very object of the last scrape
    (a client at rest, see ``ClientWatch.snapshot``) costs one list append per family.
    """

    def __init__(self) -> None:
        self._pools: dict[str, _PoolText] = {}
        self._lock = threading.Lock()  # scrapes may run in parallel server threads

    def render(
        self,
        snapshots: Iterable[PoolSnapshot],
        *,
        openmetrics: bool = False,
        before: bytes | memoryview = b"",
        after: bytes = b"",
    ) -> bytes:
        """The pools as exposition text, UTF-8, between ``before`` and ``after`` (the rest of
        the registry, and OpenMetrics' ``# EOF``): the page's bytes are copied once, here.

        A pool that fails to render is left out (and logged once), never the others.
        """
        with self._lock:
            parts: list[list[bytes]] = [[] for _ in CATALOGUE]
            previous, current = self._pools, {}
            for snap in snapshots:
                pool = previous.get(snap.name) or _PoolText()
                try:
                    fragments = pool.fragments(snap)
                except Exception as exc:
                    report_internal_error("prometheus render", exc)
                    continue
                current[snap.name] = pool  # pools gone since the last scrape are forgotten
                for family, pieces in fragments:
                    parts[family].extend(pieces)
            self._pools = current
        out: list[bytes | memoryview] = [before]
        for spec, pieces in zip(CATALOGUE, parts, strict=True):
            out.append(_HEADERS[spec][openmetrics])
            out.extend(pieces)
        out.append(after)
        return b"".join(out)


class _PoolText:
    """One pool's series, and its text per family as of its last snapshot."""

    __slots__ = ("errors", "joined", "last", "open_connections", "origins", "pool", "text")

    def __init__(self) -> None:
        #: The pool-wide series, by metric.
        self.pool: dict[MetricSpec, _Series] = {}
        #: The failed-requests series, by labels.
        self.errors: dict[tuple[str, ...], _Series] = {}
        #: Each origin's ``ORIGIN_SERIES``, in the table's order.
        self.origins: dict[tuple[str, int, str], list[_Series]] = {}
        #: The line prefix of each open-connections series.
        self.open_connections: dict[OpenConnectionKey, bytes] = {}
        self.last: PoolSnapshot | None = None
        self.text: list[tuple[int, list[bytes]]] = []
        self.joined = False

    def fragments(self, snap: PoolSnapshot) -> list[tuple[int, list[bytes]]]:
        """The pool's text as (family index, pieces), for the families it has series in."""
        if snap is self.last:
            if not self.joined:  # at rest: one piece per family from now on
                self.text = [(family, [b"".join(pieces)]) for family, pieces in self.text]
                self.joined = True
            return self.text
        by_family: list[list[bytes]] = [[] for _ in CATALOGUE]
        pool = self.pool
        for spec, labels, value in pool_samples(snap):
            one = pool.get(spec)
            if one is None:
                one = pool[spec] = _Series(spec, labels)
            one.write(by_family, value)
        origins = self.origins
        for o in snap.origins:
            origin_key = (o.address, o.port, o.scheme)
            row = origins.get(origin_key)
            if row is None:
                labels = origin_labels(snap.name, o)
                row = origins[origin_key] = [
                    _Series(spec, (*labels, *extra)) for spec, extra, _ in ORIGIN_SERIES
                ]
            # The per-origin bulk of the page: no lookup, one call for all values.
            for one, value in zip(row, origin_values(o), strict=True):
                if type(value) is int:
                    by_family[one.family].append(one.prefix + b"%d\n" % value)
                else:
                    one.write(by_family, value)
            if o.errors:
                errors = self.errors
                for spec, labels, value in error_samples(origin_labels(snap.name, o), o):
                    one = errors.get(labels)
                    if one is None:
                        one = errors[labels] = _Series(spec, labels)
                    one.write(by_family, value)
        lines = by_family[_FAMILY_INDEX[OPEN_CONNECTIONS]]
        prefixes = self.open_connections
        for key, n in open_connection_counts(snap).items():
            prefix = prefixes.get(key)
            if prefix is None:
                labels = open_connection_labels(snap.name, key)
                prefix = prefixes[key] = _Series(OPEN_CONNECTIONS, labels).prefix
            lines.append(prefix + b"%d\n" % n)
        self._forget_what_is_gone(snap)
        # Not joined: the page's join copies them once. Joined if the pool is still at rest
        # on the next scrape.
        self.text = [(family, pieces) for family, pieces in enumerate(by_family) if pieces]
        self.joined = False
        self.last = snap
        return self.text

    def _forget_what_is_gone(self, snap: PoolSnapshot) -> None:
        """Keep the caches bounded by what the pool has now: a client's origins are bounded by
        its core, but clients that come and go under one name would add up. Past the bound,
        start over (the next scrape writes the prefixes again)."""
        if len(self.origins) > 2 * len(snap.origins) + _SPARE_ORIGINS:
            self.origins = {}
            self.errors = {}
            self.open_connections = {}


class _Series:
    """One series' text pieces, built once; a histogram's last block, reused while unchanged."""

    __slots__ = ("buckets", "family", "last", "prefix", "sum_prefix")

    def __init__(self, spec: MetricSpec, values: tuple[str, ...]) -> None:
        labels = ",".join(
            f'{name}="{_escape_label(value)}"'
            for name, value in zip(spec.labels, values, strict=True)
        )
        name = spec.prometheus_name
        self.prefix = f"{name}{{{labels}}} ".encode()
        self.family = _FAMILY_INDEX[spec]  # its place in the catalogue (and on the page)
        self.last: tuple[HistogramSnapshot, list[bytes]] | None = None
        if spec.kind == "histogram":
            sep = "," if labels else ""
            #: Every bucket's line up to its value, then the count's: the count is +Inf's.
            self.buckets = [
                *(
                    f'{name}_bucket{{{labels}{sep}le="{_le(bound)}"}} '.encode()
                    for bound in (*spec.buckets, math.inf)
                ),
                f"{name}_count{{{labels}}} ".encode(),
            ]
            self.sum_prefix = f"{name}_sum{{{labels}}} ".encode()
        else:
            self.buckets = []
            self.sum_prefix = b""

    def write(self, by_family: list[list[bytes]], value: float | HistogramSnapshot) -> None:
        """Add the series' text to its family's pieces."""
        if type(value) is int:
            by_family[self.family].append(self.prefix + b"%d\n" % value)
        elif isinstance(value, HistogramSnapshot):
            by_family[self.family].extend(self.histogram(value))
        else:
            by_family[self.family].append(self.prefix + _number(value) + b"\n")

    def histogram(self, h: HistogramSnapshot) -> list[bytes]:
        """The block's text, in pieces (the family's join writes them once)."""
        last = self.last
        if last is not None and (
            last[0] is h or (last[0].count == h.count and last[0].sum == h.sum)
        ):
            return last[1]
        buckets = self.buckets
        counts = h.counts
        total = h.count
        if counts[0] == total:  # one run: every observation in the first bucket, or none
            value = b"%d\n" % total
            pieces = [value.join(buckets), value, self.sum_prefix, _number(h.sum), b"\n"]
        else:
            # Cumulative counts change only after non-empty buckets: runs of equal values.
            pieces = []
            start = 0
            running = counts[0]
            for i in compress(range(1, len(counts)), counts[1:]):
                value = b"%d\n" % running
                pieces.append(value.join(buckets[start:i]))
                pieces.append(value)
                start = i
                running += counts[i]
            value = b"%d\n" % running
            pieces.append(value.join(buckets[start:]))  # the last run, +Inf and the count
            pieces += (value, self.sum_prefix, _number(h.sum), b"\n")
        self.last = (h, pieces)
        return pieces


def _number(value: float) -> bytes:
    if type(value) is int:
        return b"%d" % value
    if -math.inf < value < math.inf:
        return repr(float(value)).encode()
    return b"NaN" if math.isnan(value) else (b"+Inf" if value > 0 else b"-Inf")


def _le(bound: float) -> str:
    """A bucket bound as prometheus_client writes it: ``+Inf``, ``0.5``, ``1.0``."""
    return "+Inf" if bound == math.inf else repr(float(bound))


def _escape_label(value: str) -> str:
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


def _headers(spec: MetricSpec) -> tuple[bytes, bytes]:
    """(text format, OpenMetrics) HELP and TYPE lines of one family."""
    text_help = spec.help.replace("\\", r"\\").replace("\n", r"\n")
    om_help = text_help.replace('"', r"\"")
    text_name = spec.prometheus_name
    om_name = spec.exposition_name  # counters: without ``_total`` in OpenMetrics
    return (
        f"# HELP {text_name} {text_help}\n# TYPE {text_name} {spec.kind}\n".encode(),
        f"# HELP {om_name} {om_help}\n# TYPE {om_name} {spec.kind}\n".encode(),
    )


_HEADERS = {spec: _headers(spec) for spec in CATALOGUE}
#: Origins a pool's text may keep beyond twice what its snapshot has.
_SPARE_ORIGINS = 64
_FAMILY_INDEX = {spec: i for i, spec in enumerate(CATALOGUE)}
