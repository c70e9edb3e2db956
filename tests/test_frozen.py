"""The snapshots poolwatch builds through writable twins (``_frozen.py``) are the very frozen
dataclasses their own constructors make: equal, of the same type, every field set, and frozen."""

from __future__ import annotations

import dataclasses
from types import MappingProxyType
from typing import Any

import pytest

from poolwatch import PoolSnapshot
from poolwatch._core import OriginSnapshot, OriginStats, _snapshot_origin
from poolwatch._frozen import writable_twin
from poolwatch._histogram import HistogramSnapshot, new_histogram_snapshot
from poolwatch._snapshot import ConnectionGroup, new_connection_group, new_pool_snapshot


def assert_same_frozen_instance(built: Any, expected: Any) -> None:
    assert type(built) is type(expected)
    assert built == expected
    # Every field was set: an unset slot would raise AttributeError here.
    names = [f.name for f in dataclasses.fields(expected)]
    assert [getattr(built, n) for n in names] == [getattr(expected, n) for n in names]
    first = dataclasses.fields(built)[0].name
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(built, first, None)
    assert repr(built) == repr(expected)


def test_a_histogram_snapshot_built_fast_is_the_one_its_constructor_makes() -> None:
    args = ((0.1, 1.0), (3, 0, 2), 5, 4.25)
    assert_same_frozen_instance(new_histogram_snapshot(*args), HistogramSnapshot(*args))


def test_a_connection_group_built_fast_is_the_one_its_constructor_makes() -> None:
    args = ("https", "api.example.test", 443, "idle", "2", 3)
    assert_same_frozen_instance(new_connection_group(*args), ConnectionGroup(*args))


def test_an_origin_snapshot_built_fast_is_the_one_its_constructor_makes() -> None:
    o = OriginStats("https", "api.example.test", 443)
    o.active_requests, o.requests_new, o.requests_reused = 1, 2, 7
    o.connections_created, o.timeouts = 2, 1
    o.errors["ReadTimeout"] = 3
    o.http_versions.update({"2", "1.1"})
    o.time_in_queue.observe(0.002)
    o.connection_duration.observe(12.0)
    built = _snapshot_origin(o)
    expected = OriginSnapshot(
        scheme="https",
        address="api.example.test",
        port=443,
        active_requests=1,
        requests_new=2,
        requests_reused=7,
        connections_created=2,
        timeouts=1,
        errors=MappingProxyType({"ReadTimeout": 3}),
        http_versions=("1.1", "2"),
        time_in_queue=o.time_in_queue.snapshot(),
        connection_duration=o.connection_duration.snapshot(),
    )
    assert_same_frozen_instance(built, expected)
    # The errors are a copy, read-only: the core's dict moves on, the snapshot does not.
    o.errors["ReadTimeout"] = 4
    assert built.errors["ReadTimeout"] == 3
    with pytest.raises(TypeError):
        built.errors["ReadTimeout"] = 5  # type: ignore[index]


def test_an_origin_snapshot_shows_a_protocol_version_seen_after_an_earlier_read() -> None:
    o = OriginStats("https", "api.example.test", 443)
    o.http_versions.add("1.1")
    assert _snapshot_origin(o).http_versions == ("1.1",)
    o.http_versions.add("2")
    assert _snapshot_origin(o).http_versions == ("1.1", "2")


def test_a_pool_snapshot_built_fast_is_the_one_its_constructor_makes() -> None:
    h = HistogramSnapshot((1.0,), (1, 1), 2, 1.5)
    fields = {f.name: None for f in dataclasses.fields(PoolSnapshot)}
    values: dict[str, Any] = {
        **fields,
        "name": "llm",
        "max_connections": 10,
        "active_connections": 3,
        "idle_connections": 2,
        "pending_requests": 4,
        "active_requests": 7,
        "utilization": 0.3,
        "requests_total": 40,
        "reused_requests_total": 35,
        "connections_created_total": 5,
        "pool_timeouts_total": 1,
        "leaked_responses_total": 0,
        "reuse_ratio": 0.875,
        "connecting_connections": 1,
        "pending_max_age": 0.25,
        "active_max_age": 2.5,
        "errors": MappingProxyType({"PoolTimeout": 1}),
        "connections": (ConnectionGroup("https", "a.test", 443, "idle", "1.1", 2),),
        "origins": (),
        "unreadable_pools": 0,
        "connect_time": h,
        "tls_time": h,
        "time_to_first_byte": h,
        "request_duration": h,
    }
    assert None not in [values[name] for name in fields if name != "reuse_ratio"]
    assert_same_frozen_instance(new_pool_snapshot(**values), PoolSnapshot(**values))


def test_a_twin_is_refused_for_a_class_without_slots() -> None:
    @dataclasses.dataclass(frozen=True)
    class Plain:
        x: int

    with pytest.raises(TypeError, match="not a slots dataclass"):
        writable_twin(Plain)


def test_a_twin_is_refused_for_a_dataclass_whose_slots_are_partly_inherited() -> None:
    @dataclasses.dataclass(frozen=True, slots=True)
    class Base:
        x: int

    @dataclasses.dataclass(frozen=True, slots=True)
    class Derived(Base):
        y: int

    with pytest.raises(TypeError, match="not a slots dataclass of its own"):
        writable_twin(Derived)
    assert writable_twin(Base)().__class__ is not Base  # a fresh twin, not yet given the class
