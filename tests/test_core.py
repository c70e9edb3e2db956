"""The pure core on its own, with a clock the test turns: request sequences that real pools
reach only by rare interleavings."""

from __future__ import annotations

from poolwatch._core import ConnRecord, OriginStats, PoolCore, RequestRecord


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def lose_the_connection_it_opened(
    core: PoolCore, clock: Clock, origin: OriginStats, connect_s: float
) -> RequestRecord:
    """httpcore's sync pool, HTTP/2 offered and HTTP/1.1 negotiated: the request connects, a
    waiting request takes the new connection first, and this one goes back to the queue."""
    opened = ConnRecord(origin, maybe_h2=True)
    core.add_connection(1, opened)
    rec = core.start(origin)
    core.acquire(rec, opened, end_queue=False)
    core.on_trace_event(rec, "connection.connect_tcp.started")
    clock.now += connect_s
    core.on_trace_event(rec, "connection.connect_tcp.complete")
    core.requeue(rec)
    return rec


def test_a_request_that_lost_the_connection_it_opened_counts_by_the_one_it_ran_on() -> None:
    clock = Clock()
    core = PoolCore("p", clock=clock)
    origin = core.origin((b"https", b"example.test", 443))
    existing = ConnRecord(origin, maybe_h2=False, connected=True)
    core.add_connection(2, existing)

    a = lose_the_connection_it_opened(core, clock, origin, connect_s=0.25)
    clock.now = 2.0
    core.acquire(a, existing, end_queue=True)  # a connection that was already up
    assert a.reused is True
    clock.now = 2.5
    core.headers(a, 200, "1.1")
    clock.now = 3.0
    core.finish(a)

    (snap,) = core.snapshot().origins
    assert (snap.requests_new, snap.requests_reused) == (0, 1)
    assert snap.connections_created == 1  # its connect did open one
    assert snap.time_in_queue.count == 1
    assert snap.time_in_queue.sum == 2.0  # from start to the connection it kept
    assert core.snapshot().connect_time.sum == 0.25  # the connect it made is still its own
    assert core.snapshot().time_to_first_byte.sum == 0.5


def test_a_request_that_lost_the_connection_it_opened_and_then_timed_out_obtained_none() -> None:
    clock = Clock()
    core = PoolCore("p", clock=clock)
    origin = core.origin((b"https", b"example.test", 443))

    a = lose_the_connection_it_opened(core, clock, origin, connect_s=0.125)
    clock.now = 5.0
    core.finish(a, error_type="PoolTimeout", pool_timeout=True)

    (snap,) = core.snapshot().origins
    assert (snap.requests_new, snap.requests_reused) == (0, 0)
    assert snap.timeouts == 1
    assert snap.time_in_queue.sum == 5.0
    assert a.reused is None
