"""poolwatch's own Prometheus exposition: the pools' samples as text, fast.

prometheus_client formats every sample anew (escaping each label, sorting the labels), about
20 µs a line on a slow machine: 1.2 s for 100 pools x 5 origins (58,000 lines, six histograms
of twenty buckets per origin). Here each series' text is built once: a scalar's line prefix,
a histogram's bucket prefixes; a scrape only writes the values. A histogram whose count has not
moved since the last scrape reuses its whole block, and the buckets of a block are written in
runs of equal cumulative counts, ``"<count>\\n".join(prefixes)``, so a scrape costs a few
operations per series, not per line. And a pool at rest costs nothing to speak of: its
snapshot is the very object of the last scrape (``ClientWatch.snapshot``), so its text is
reused whole.

Both formats prometheus_client speaks are written: the text format (0.0.4) and OpenMetrics 1.0
(what Prometheus asks for first). They differ, for poolwatch's metrics, only in the family
name of counters on the HELP and TYPE lines, the escaping of HELP, and the final ``# EOF``,
which the caller appends after the rest of the registry.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterable
from itertools import compress

from ._catalogue import CATALOGUE, MetricSpec
from ._histogram import HistogramSnapshot
from ._safety import report_internal_error
from ._samples import samples
from ._snapshot import PoolSnapshot


class Exposition:
    """Renders pools' snapshots in the catalogue's order, reusing every text it built before.

    Each pool keeps its own text: a pool whose snapshot is the very object of the last scrape
    (a client at rest, see ``ClientWatch.snapshot``) costs one list append per family.
    """

    def __init__(self) -> None:
        self._pools: dict[str, _PoolText] = {}
        self._lock = threading.Lock()  # scrapes may run in parallel server threads

    def render(self, snapshots: Iterable[PoolSnapshot], *, openmetrics: bool = False) -> str:
        """The pools as exposition text (without OpenMetrics' ``# EOF``).

        A pool that fails to render is left out (and logged once), never the others.
        """
        with self._lock:
            parts: dict[MetricSpec, list[str]] = {spec: [] for spec in CATALOGUE}
            previous, current = self._pools, {}
            for snap in snapshots:
                pool = previous.get(snap.name) or _PoolText()
                try:
                    fragments = pool.fragments(snap)
                except Exception as exc:
                    report_internal_error("prometheus render", exc)
                    continue
                current[snap.name] = pool  # pools gone since the last scrape are forgotten
                for spec, text in fragments:
                    parts[spec].append(text)
            self._pools = current
        out: list[str] = []
        for spec in CATALOGUE:
            out.append(_HEADERS[spec][openmetrics])
            out.extend(parts[spec])
        return "".join(out)


class _PoolText:
    """One pool's series, and its text per family as of its last snapshot."""

    __slots__ = ("last", "series", "text")

    def __init__(self) -> None:
        self.series: dict[tuple[MetricSpec, tuple[str, ...]], _Series] = {}
        self.last: PoolSnapshot | None = None
        self.text: list[tuple[MetricSpec, str]] = []

    def fragments(self, snap: PoolSnapshot) -> list[tuple[MetricSpec, str]]:
        if snap is self.last:
            return self.text
        by_family: list[list[str]] = [[] for _ in CATALOGUE]
        series = self.series
        for spec, labels, value in samples(snap):
            one = series.get((spec, labels))
            if one is None:
                one = series[spec, labels] = _Series(spec, labels)
            if type(value) is int:
                by_family[one.family].append(f"{one.prefix}{value}\n")
            elif isinstance(value, HistogramSnapshot):
                by_family[one.family].append(one.histogram(value))
            else:
                by_family[one.family].append(f"{one.prefix}{_number(value)}\n")
        self.text = [
            (spec, "".join(lines))
            for spec, lines in zip(CATALOGUE, by_family, strict=True)
            if lines
        ]
        self.last = snap
        return self.text


class _Series:
    """One series' text pieces, built once; a histogram's last block, reused while unchanged."""

    __slots__ = ("buckets", "count_prefix", "family", "last", "prefix", "sum_prefix")

    def __init__(self, spec: MetricSpec, values: tuple[str, ...]) -> None:
        labels = ",".join(
            f'{name}="{_escape_label(value)}"'
            for name, value in zip(spec.labels, values, strict=True)
        )
        name = spec.prometheus_name
        self.prefix = f"{name}{{{labels}}} "
        self.family = _FAMILY_INDEX[spec]  # its place in the catalogue (and on the page)
        self.last: tuple[HistogramSnapshot, str] | None = None
        if spec.kind == "histogram":
            sep = "," if labels else ""
            self.buckets = [
                f'{name}_bucket{{{labels}{sep}le="{_le(bound)}"}} '
                for bound in (*spec.buckets, math.inf)
            ]
            self.count_prefix = f"{name}_count{{{labels}}} "
            self.sum_prefix = f"{name}_sum{{{labels}}} "
        else:
            self.buckets = []
            self.count_prefix = self.sum_prefix = ""

    def histogram(self, h: HistogramSnapshot) -> str:
        last = self.last
        if last is not None and (
            last[0] is h or (last[0].count == h.count and last[0].sum == h.sum)
        ):
            return last[1]
        buckets = self.buckets
        counts = h.counts
        pieces: list[str] = []
        start = 0
        running = counts[0]
        # Cumulative counts change only after non-empty buckets: write runs of equal values.
        for i in compress(range(1, len(counts)), counts[1:]):
            value = f"{running}\n"
            pieces.append(value.join(buckets[start:i]))
            pieces.append(value)
            start = i
            running += counts[i]
        value = f"{running}\n"
        pieces.append(value.join(buckets[start:]))
        pieces.append(value)
        pieces.append(f"{self.count_prefix}{running}\n{self.sum_prefix}{_number(h.sum)}\n")
        block = "".join(pieces)
        self.last = (h, block)
        return block


def _number(value: float) -> str:
    if type(value) is int:
        return str(value)
    if -math.inf < value < math.inf:
        return repr(float(value))
    return "NaN" if math.isnan(value) else ("+Inf" if value > 0 else "-Inf")


def _le(bound: float) -> str:
    """A bucket bound as prometheus_client writes it: ``+Inf``, ``0.5``, ``1.0``."""
    return "+Inf" if bound == math.inf else repr(float(bound))


def _escape_label(value: str) -> str:
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


def _headers(spec: MetricSpec) -> tuple[str, str]:
    """(text format, OpenMetrics) HELP and TYPE lines of one family."""
    text_help = spec.help.replace("\\", r"\\").replace("\n", r"\n")
    om_help = text_help.replace('"', r"\"")
    text_name = spec.prometheus_name
    om_name = spec.exposition_name  # counters: without ``_total`` in OpenMetrics
    return (
        f"# HELP {text_name} {text_help}\n# TYPE {text_name} {spec.kind}\n",
        f"# HELP {om_name} {om_help}\n# TYPE {om_name} {spec.kind}\n",
    )


_HEADERS = {spec: _headers(spec) for spec in CATALOGUE}
_FAMILY_INDEX = {spec: i for i, spec in enumerate(CATALOGUE)}
