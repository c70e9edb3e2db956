"""The histogram behind every time figure: values wait in a list on the request path and are
sorted into buckets when read, with the same result as sorting each one at once."""

from __future__ import annotations

import math
from bisect import bisect_left

from hypothesis import given
from hypothesis import strategies as st

from poolwatch._catalogue import REQUEST_TIME_BUCKETS
from poolwatch._core import _COUNT_AT, _FOLD_AT, PoolCore
from poolwatch._histogram import Histogram

times = st.floats(min_value=0.0, max_value=10_000.0, allow_nan=False)


@given(st.lists(times, max_size=300), st.lists(times, max_size=300))
def test_buckets_read_between_and_after_observations_equal_sorting_each_value_at_once(
    first: list[float], second: list[float]
) -> None:
    h = Histogram(REQUEST_TIME_BUCKETS)
    for value in first:
        h.observe(value)
    middle = h.snapshot()
    for value in second:
        h.observe(value)
    end = h.snapshot()
    for snap, values in ((middle, first), (end, first + second)):
        expected = [0] * (len(REQUEST_TIME_BUCKETS) + 1)
        for value in values:
            expected[bisect_left(REQUEST_TIME_BUCKETS, value)] += 1
        assert list(snap.counts) == expected
        assert snap.count == len(values)
        assert math.isclose(snap.sum, math.fsum(values), rel_tol=1e-9, abs_tol=1e-9)
    assert h.waiting == []


def test_a_snapshot_with_nothing_observed_since_is_the_same_object() -> None:
    h = Histogram(REQUEST_TIME_BUCKETS)
    h.observe(0.2)
    assert h.snapshot() is h.snapshot()
    h.observe(0.2)
    assert h.snapshot().count == 2


def test_values_nobody_reads_stay_bounded_and_all_count_once_read() -> None:
    core = PoolCore("unread")
    origin = core.origin((b"http", b"unread.test", 80))
    for _ in range(5 * _FOLD_AT + 7):
        rec = core.start(origin)
        core.finish(rec)
        assert len(core.request_duration.waiting) < _FOLD_AT
        assert len(origin.time_in_queue.waiting) < _FOLD_AT
        assert len(core._finished) < _COUNT_AT  # records wait to be counted, not for ever
    snap = core.snapshot()
    assert snap.request_duration.count == 5 * _FOLD_AT + 7
    assert snap.origins[0].time_in_queue.count == 5 * _FOLD_AT + 7
