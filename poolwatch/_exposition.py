"""poolwatch's own Prometheus exposition: the pools' samples as text, fast.

prometheus_client formats every sample anew (escaping each label, sorting the labels), about
20 µs a line on a slow machine: 1.2 s for 100 pools x 5 origins (58,000 lines, six histograms
of twenty buckets per origin). Here each series' text is built once, as a format string with a
``%d`` where its value goes; a scrape only fills in the values. The lines of each counter and
gauge of a pool's origins are one format for all of them, filled with one ``%`` from the
columns of ``ORIGIN_SERIES`` (one ``attrgetter`` call per origin, one ``zip``); a histogram's
block is one format filled with its cumulative counts, and reused whole while its count has not
moved. So a scrape costs a few operations per series and per family, not per line. And a pool
at rest costs nothing to speak of: its snapshot is the very object of the last scrape
(``ClientWatch.snapshot``), so its text is reused whole.

Both formats prometheus_client speaks are written: the text format (0.0.4) and OpenMetrics 1.0
(what Prometheus asks for first). They differ, for poolwatch's metrics, only in the family
name of counters on the HELP and TYPE lines, the escaping of HELP, and the final ``# EOF``,
which the caller passes as what comes after the pools (the rest of the registry comes
before them). The page is bytes, UTF-8, joined once from every piece.
"""

from __future__ import annotations

import math
import threading
from bisect import bisect_right
from collections.abc import Iterable, Iterator, Sequence
from itertools import accumulate, chain
from operator import attrgetter
from typing import Any

from ._catalogue import CATALOGUE, OPEN_CONNECTIONS, MetricSpec
from ._core import OriginSnapshot
from ._histogram import HistogramSnapshot
from ._safety import report_internal_error
from ._samples import (
    ORIGIN_SERIES,
    POOL_SERIES,
    OpenConnectionKey,
    error_samples,
    open_connection_counts,
    open_connection_labels,
    open_connection_zeros,
    origin_labels,
    origin_values,
    pool_histograms,
    pool_values,
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
                for _ in map(list.extend, parts, fragments):  # in C: one extend per family
                    pass
            self._pools = current
        out: list[bytes | memoryview] = [before]
        for spec, pieces in zip(CATALOGUE, parts, strict=True):
            out.append(_HEADERS[spec][openmetrics])
            out.extend(pieces)
        out.append(after)
        return b"".join(out)


class _PoolText:
    """One pool's series, and its text per family as of its last snapshot."""

    __slots__ = (
        "errors",
        "joined",
        "last",
        "open_keys",
        "open_made_of",
        "open_template",
        "open_text",
        "origins",
        "pool",
        "scalar_lines",
        "scalars",
        "scalars_of",
        "text",
    )

    def __init__(self) -> None:
        #: The pool-wide series, by metric.
        self.pool: dict[MetricSpec, _Series] = {}
        #: The lines of the pool-wide numbers (by family), and the values they were written
        #: from: a busy pool's are most often the same again at the next scrape (nothing
        #: waiting, nothing in flight, the same limit), so they are written only when moved.
        self.scalars: list[tuple[int, bytes]] = []
        self.scalars_of: tuple[Any, ...] = _UNWRITTEN
        #: Each one's line, aligned with ``POOL_SERIES`` (``None``: no line).
        self.scalar_lines: list[tuple[int, bytes] | None] = [None] * len(POOL_SERIES)
        #: The failed-requests series, by labels.
        self.errors: dict[tuple[str, ...], _Series] = {}
        #: The per-origin series of the origins of the last snapshot.
        self.origins: _OriginTable | None = None
        #: The open-connections series of the last snapshot, and their lines as one format.
        self.open_keys: tuple[OpenConnectionKey, ...] = ()
        self.open_template = b""
        #: Those lines, and what they were written from: the snapshot's connection groups
        #: (the very tuple again while the groups are equal) and its origins' shape.
        self.open_text = b""
        self.open_made_of: tuple[object, tuple[object, ...]] = ((), ())
        self.last: PoolSnapshot | None = None
        self.text: list[list[bytes]] = [[] for _ in CATALOGUE]
        self.joined = False

    def fragments(self, snap: PoolSnapshot) -> list[list[bytes]]:
        """The pool's text as pieces, by family in the catalogue's order (none: no series)."""
        if snap is self.last:
            if not self.joined:  # at rest: one piece per family from now on
                self.text = [[b"".join(pieces)] if pieces else pieces for pieces in self.text]
                self.joined = True
            return self.text
        by_family: list[list[bytes]] = [[] for _ in CATALOGUE]
        values = pool_values(snap)
        if values != self.scalars_of:
            self._pool_scalars(snap.name, values)
        for family, line in self.scalars:
            by_family[family].append(line)
        pool = self.pool
        for spec, h in pool_histograms(snap):
            one = pool.get(spec)
            if one is None:
                one = pool[spec] = _Series(spec, (snap.name,))
            by_family[one.family].append(one.histogram(h))
        origins = snap.origins
        # What the per-origin lines are written from besides the values: each origin's key
        # and protocol versions (which zero lines of open connections it has).
        shape = tuple(map(_ORIGIN_SHAPE, origins))
        zeros: dict[OpenConnectionKey, int] = {}
        if origins:
            # The per-origin bulk of the page: a few C calls per family, whatever the origins.
            table = self.origins
            if table is None or table.shape != shape:
                table = self.origins = _OriginTable(snap.name, origins, shape)
            zeros = table.zeros
            table.write(by_family, origins)
            errors = self.errors
            written = 0
            for o in origins:
                if o.errors:
                    for spec, labels, value in error_samples(origin_labels(snap.name, o), o):
                        one = errors.get(labels)
                        if one is None:
                            one = errors[labels] = _Series(spec, labels)
                        by_family[one.family].append(one.number(value))
                        written += 1
            if len(errors) > 2 * written + _SPARE_ERRORS:  # error series long gone
                self.errors = {}
        made_of = self.open_made_of
        if snap.connections is not made_of[0] or shape != made_of[1]:
            self.open_text = self._open_connections(snap, zeros)
            self.open_made_of = (snap.connections, shape)
        if self.open_text:
            by_family[_OPEN_CONNECTIONS].append(self.open_text)
        # Not joined: the page's join copies them once. Joined if the pool is still at rest
        # on the next scrape.
        self.text = by_family
        self.joined = False
        self.last = snap
        return self.text

    def _pool_scalars(self, name: str, values: tuple[Any, ...]) -> None:
        """Write again the lines of the pool-wide numbers that moved (a busy pool's are most
        often the age of its oldest request alone); a limit of ``None`` has no line."""
        pool = self.pool
        lines = self.scalar_lines
        for i, ((spec, _), value, was) in enumerate(
            zip(POOL_SERIES, values, self.scalars_of, strict=True)
        ):
            if value == was:
                continue
            if value is None:
                lines[i] = None
                continue
            one = pool.get(spec)
            if one is None:
                one = pool[spec] = _Series(spec, (name,))
            lines[i] = (one.family, one.number(value))
        self.scalars = [line for line in lines if line is not None]
        self.scalars_of = values

    def _open_connections(self, snap: PoolSnapshot, zeros: dict[OpenConnectionKey, int]) -> bytes:
        """The open-connections lines, one format for all of them."""
        counts = open_connection_counts(snap, zeros)
        keys = tuple(counts)
        if keys != self.open_keys:
            self.open_template = b"".join(
                _Series(OPEN_CONNECTIONS, open_connection_labels(snap.name, key)).line
                for key in keys
            )
            self.open_keys = keys
        return self.open_template % tuple(counts.values())


class _OriginTable:
    """The per-origin series of one pool for one list of origins (``ORIGIN_SERIES`` of each).

    The lines of each counter and gauge family are one format string for every origin, so a
    scrape writes them with one ``%``: the origins' values come in one ``attrgetter`` call
    each, turned into columns by one ``zip``. Each histogram series keeps its own block (and
    reuses it while unchanged). Made again when the pool's origins (or their protocol
    versions) change.
    """

    __slots__ = ("histograms", "scalars", "shape", "zeros")

    def __init__(
        self, pool_name: str, origins: Sequence[OriginSnapshot], shape: tuple[object, ...]
    ) -> None:
        self.shape = shape
        #: The open-connections series these origins always have, at zero.
        self.zeros = open_connection_zeros(origins)
        labels = [origin_labels(pool_name, o) for o in origins]
        #: (family index, the columns of its values, the lines of every origin as a format).
        self.scalars: list[tuple[int, tuple[int, ...], bytes]] = []
        #: (column, the series of each origin), for each histogram.
        self.histograms: list[tuple[int, list[_Series]]] = []
        for spec, columns in _ORIGIN_FAMILIES:
            if spec.kind == "histogram":
                [(column, extra)] = columns
                series = [_Series(spec, (*origin, *extra)) for origin in labels]
                self.histograms.append((column, series))
                continue
            template = b"".join(
                _Series(spec, (*origin, *extra)).line for origin in labels for _, extra in columns
            )
            self.scalars.append(
                (_FAMILY_INDEX[spec], tuple(column for column, _ in columns), template)
            )

    def write(self, by_family: list[list[bytes]], origins: Iterable[OriginSnapshot]) -> None:
        columns = list(zip(*map(origin_values, origins), strict=True))
        for family, which, template in self.scalars:
            if len(which) == 1:
                values = columns[which[0]]
            else:  # several series per origin (reused or not): the origin's, in turn
                values = tuple(chain.from_iterable(zip(*(columns[i] for i in which), strict=True)))
            by_family[family].append(template % values)
        for column, series in self.histograms:  # each origin's block, in C's loop
            by_family[series[0].family].extend(map(_Series.histogram, series, columns[column]))


class _Series:
    """One series' text, built once: its line as a format; a histogram's block as a format,
    and its last block, reused while unchanged."""

    __slots__ = ("block", "bounds", "family", "last", "last_text", "line", "prefix")

    def __init__(self, spec: MetricSpec, values: tuple[str, ...]) -> None:
        labels = ",".join(
            f'{name}="{_escape_label(value)}"'
            for name, value in zip(spec.labels, values, strict=True)
        )
        name = spec.prometheus_name
        self.prefix = f"{name}{{{labels}}} ".encode()
        #: The line of an integer value, as a format (``%`` in a label written ``%%``).
        self.line = self.prefix.replace(b"%", b"%%") + b"%d\n"
        self.family = _FAMILY_INDEX[spec]  # its place in the catalogue (and on the page)
        #: A histogram's last snapshot and block (two slots, not a tuple: one scrape of busy
        #: pools writes thousands, and each tuple would wait for the garbage collector).
        self.last: HistogramSnapshot | None = None
        self.last_text = b""
        self.bounds = spec.buckets
        self.block = b""
        if spec.kind == "histogram":
            sep = "," if labels else ""
            escaped = labels.replace("%", "%%")
            #: Every bucket's line, the count's (the count is +Inf's) and the sum's.
            self.block = "".join(
                [
                    *(
                        f'{name}_bucket{{{escaped}{sep}le="{_le(bound)}"}} %d\n'
                        for bound in (*spec.buckets, math.inf)
                    ),
                    f"{name}_count{{{escaped}}} %d\n",
                    f"{name}_sum{{{escaped}}} %b\n",
                ]
            ).encode()

    def number(self, value: float) -> bytes:
        """The line of a number."""
        if type(value) is int:
            return self.line % value
        return self.prefix + _number(value) + b"\n"

    def histogram(self, h: HistogramSnapshot) -> bytes:
        """The block's text: one ``%`` of the cumulative counts."""
        last = self.last
        if last is not None and (last is h or (last.count == h.count and last.sum == h.sum)):
            return self.last_text
        total = h.sum
        if type(total) is float and total - total == 0.0:  # finite: inline, a frame less
            total_text = repr(total).encode()
        else:
            total_text = _number(total)
        if h.bounds is self.bounds or h.bounds == self.bounds:
            text = self.block % (*accumulate(h.counts), h.count, total_text)
        else:  # bounds of its own (a snapshot made by hand): what is known below each
            text = self.block % (*_rebucketed(h, self.bounds), h.count, total_text)
        self.last = h
        self.last_text = text
        return text


def _rebucketed(h: HistogramSnapshot, bounds: tuple[float, ...]) -> Iterator[int]:
    """Cumulative counts at ``bounds`` and +Inf of a histogram with other bounds: below each,
    the observations known to be below it."""
    cumulative = h.cumulative()
    for bound in bounds:
        i = bisect_right(h.bounds, bound)  # h's buckets whose upper bound is at most ``bound``
        yield cumulative[i - 1] if i else 0
    yield cumulative[-1]


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
#: Pool-wide values no pool has: every line is written the first time.
_UNWRITTEN = tuple(object() for _ in POOL_SERIES)
#: Error series a pool's text may keep beyond twice what its snapshot has.
_SPARE_ERRORS = 64
_FAMILY_INDEX = {spec: i for i, spec in enumerate(CATALOGUE)}
#: Each family of ``ORIGIN_SERIES``, in the table's order, with its columns there and the
#: label values each adds after the origin's.
_ORIGIN_FAMILIES: list[tuple[MetricSpec, list[tuple[int, tuple[str, ...]]]]] = []
for _column, (_spec, _extra, _field) in enumerate(ORIGIN_SERIES):
    if not _ORIGIN_FAMILIES or _ORIGIN_FAMILIES[-1][0] is not _spec:
        _ORIGIN_FAMILIES.append((_spec, []))
    _ORIGIN_FAMILIES[-1][1].append((_column, _extra))
#: An origin's key and its protocol versions.
_ORIGIN_SHAPE = attrgetter("address", "port", "scheme", "http_versions")
_OPEN_CONNECTIONS = _FAMILY_INDEX[OPEN_CONNECTIONS]
