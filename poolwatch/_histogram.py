"""A fixed-bucket histogram whose observations cost one list append on the request path."""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections.abc import Callable
from dataclasses import dataclass
from itertools import repeat
from operator import add, sub

from ._frozen import TWINS, writable_twin


class Histogram:
    """Cumulative-at-read histogram with upper-inclusive bounds (Prometheus ``le`` semantics).

    ``observe`` is the ``append`` of a list of waiting values: one C call per observation.
    The values are sorted into buckets when the histogram is read (``snapshot()``), or by
    ``fold()`` when the owner sees ``waiting`` grow long, so memory stays bounded when nobody
    reads. Not thread-safe by itself: the pool core uses it under its own lock.
    """

    __slots__ = ("_last", "bounds", "count", "counts", "observe", "sum", "waiting")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last slot is +Inf
        self.count = 0
        self.sum = 0.0
        #: Observed, not yet in a bucket.
        self.waiting: list[float] = []
        self.observe: Callable[[float], None] = self.waiting.append
        self._last: HistogramSnapshot | None = None

    def fold(self) -> None:
        """Sort the waiting values into their buckets."""
        waiting = self.waiting
        if not waiting:
            return
        counts = self.counts
        bounds = self.bounds
        n = len(waiting)
        if n < _SORT_FROM:
            for value in waiting:
                counts[bisect_left(bounds, value)] += 1  # the first bound >= value: `le`
        else:
            # Sorted first: list.sort compares floats natively, where a bisection per value
            # compares through the generic protocol (~40 ns a value against ~130). Then each
            # bound's share in C: the values <= each bound, less those <= the bound below.
            waiting.sort()
            upto = list(map(bisect_right, repeat(waiting), bounds))
            upto.append(n)
            self.counts = list(map(add, counts, map(sub, upto, [0, *upto])))
        self.count += n
        self.sum += sum(waiting)
        waiting.clear()

    def snapshot(self) -> HistogramSnapshot:
        """The state now; the same object as last time while nothing was observed since."""
        if self.waiting:
            self.fold()
        last = self._last
        if last is None or last.count != self.count:
            last = self._last = new_histogram_snapshot(
                self.bounds, tuple(self.counts), self.count, self.sum
            )
        return last


#: Waiting values from which ``fold()`` sorts them, rather than bisecting the bounds for each.
_SORT_FROM = 8


@dataclass(frozen=True, slots=True)
class HistogramSnapshot:
    """A histogram's state at one instant. ``counts`` are per bucket, not cumulative."""

    bounds: tuple[float, ...]
    counts: tuple[int, ...]
    count: int
    sum: float

    def cumulative(self) -> list[int]:
        """Counts per bound, cumulative, with +Inf last (what Prometheus exposes)."""
        out: list[int] = []
        running = 0
        for c in self.counts:
            running += c
            out.append(running)
        return out

    def quantile(self, q: float) -> float | None:
        """Estimate the q-quantile by linear interpolation inside the bucket (as PromQL does)."""
        if self.count == 0:
            return None
        rank = q * self.count
        running = 0
        lower = 0.0
        for i, c in enumerate(self.counts):
            upper = self.bounds[i] if i < len(self.bounds) else float("inf")
            if running + c >= rank and c > 0:
                if upper == float("inf"):
                    return lower
                return lower + (upper - lower) * ((rank - running) / c)
            running += c
            lower = upper
        return lower


_WritableHistogramSnapshot = writable_twin(HistogramSnapshot)


def _built_from_twin(
    bounds: tuple[float, ...], counts: tuple[int, ...], count: int, sum: float
) -> HistogramSnapshot:
    s = _WritableHistogramSnapshot()
    s.bounds = bounds
    s.counts = counts
    s.count = count
    s.sum = sum
    s.__class__ = HistogramSnapshot
    return s  # type: ignore[no-any-return]  # a call to typing.cast costs a frame


#: ``HistogramSnapshot(bounds, counts, count, sum)``, at a third of the cost (``_frozen``).
new_histogram_snapshot: Callable[
    [tuple[float, ...], tuple[int, ...], int, float], HistogramSnapshot
] = _built_from_twin if TWINS else HistogramSnapshot
