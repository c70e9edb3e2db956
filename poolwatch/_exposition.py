"""poolwatch's own Prometheus exposition: the pools' samples as text, fast.

prometheus_client formats every sample anew (escaping each label, sorting the labels), about
20 µs a line on a slow machine: 1.2 s for 100 pools x 5 origins (58,000 lines, six histograms
of twenty buckets per origin). Here each series' text is built once: a scalar's line prefix,
a histogram's bucket prefixes; a scrape only writes the values. A histogram whose count has not
moved since the last scrape reuses its whole block, and the buckets of a block are written in
runs of equal cumulative counts, ``"<count>\\n".join(prefixes)``, so a scrape costs a few
operations per series, not per line.

Both formats prometheus_client speaks are written: the text format (0.0.4) and OpenMetrics 1.0
(what Prometheus asks for first). They differ, for poolwatch's metrics, only in the family
name of counters on the HELP and TYPE lines, the escaping of HELP, and the final ``# EOF``,
which the caller appends after the rest of the registry.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterable

from ._catalogue import CATALOGUE, MetricSpec
from ._histogram import HistogramSnapshot
from ._samples import Sample


class Exposition:
    """Renders samples in the catalogue's order, reusing every series' text it built before."""

    def __init__(self) -> None:
        self._series: dict[tuple[MetricSpec, tuple[str, ...]], _Series] = {}
        self._lock = threading.Lock()  # scrapes may run in parallel server threads
        self._generation = 0

    def render(self, samples: Iterable[Sample], *, openmetrics: bool = False) -> str:
        """The samples as exposition text (without OpenMetrics' ``# EOF``)."""
        with self._lock:
            return self._render(samples, openmetrics)

    def _render(self, samples: Iterable[Sample], openmetrics: bool) -> str:
        parts: dict[MetricSpec, list[str]] = {spec: [] for spec in CATALOGUE}
        cache = self._series
        self._generation = generation = self._generation + 1
        seen = 0
        for spec, labels, value in samples:
            series = cache.get((spec, labels))
            if series is None:
                series = cache[spec, labels] = _Series(spec, labels)
            series.generation = generation
            seen += 1
            if type(value) is int:
                parts[spec].append(f"{series.prefix}{value}\n")
            elif isinstance(value, HistogramSnapshot):
                parts[spec].append(series.histogram(value))
            else:
                parts[spec].append(f"{series.prefix}{_number(value)}\n")
        if len(cache) > 2 * seen + 1024:  # series of pools long gone
            self._series = {k: v for k, v in cache.items() if v.generation == generation}
        out: list[str] = []
        for spec in CATALOGUE:
            out.append(_HEADERS[spec][openmetrics])
            out.extend(parts[spec])
        return "".join(out)


class _Series:
    """One series' text pieces, built once; a histogram's last block, reused while unchanged."""

    __slots__ = ("buckets", "count_prefix", "generation", "last", "prefix", "sum_prefix")

    def __init__(self, spec: MetricSpec, values: tuple[str, ...]) -> None:
        labels = ",".join(
            f'{name}="{_escape_label(value)}"'
            for name, value in zip(spec.labels, values, strict=True)
        )
        name = spec.prometheus_name
        self.prefix = f"{name}{{{labels}}} "
        self.generation = 0
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
        for i in [i for i in range(1, len(counts)) if counts[i]]:
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
    if math.isfinite(value):
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
