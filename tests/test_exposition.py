"""poolwatch's own page writer (``poolwatch.prometheus.start_http_server`` and
``generate_latest``): the same samples as prometheus_client writes, in both formats a scraper
may ask for, with the rest of the registry, and never a failed scrape."""

from __future__ import annotations

import contextlib
import gzip
import logging
import math
import random
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.openmetrics.exposition import generate_latest as openmetrics_latest
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as parse_openmetrics_families,
)
from prometheus_client.parser import text_string_to_metric_families

import poolwatch
import poolwatch._exposition
import poolwatch.prometheus
from poolwatch._catalogue import (
    CATALOGUE,
    CONNECT_TIME,
    CONNECTION_DURATION,
    REQUEST_DURATION,
    TIME_IN_QUEUE,
    TIME_TO_FIRST_BYTE,
    TLS_TIME,
    MetricSpec,
)
from poolwatch._core import OriginSnapshot
from poolwatch._exposition import _Series
from poolwatch._histogram import HistogramSnapshot
from poolwatch._loopback import LoopbackServer
from poolwatch._samples import samples as poolwatch_samples
from poolwatch._snapshot import NO_OBSERVATIONS, ConnectionGroup, PoolSnapshot

#: What Prometheus 2.x sends when it scrapes.
PROMETHEUS_ACCEPT = (
    "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;"
    "q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
)

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def samples_of(text: bytes, *, openmetrics: bool = False) -> Samples:
    parse = parse_openmetrics_families if openmetrics else text_string_to_metric_families
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in parse(text.decode())
        for s in family.samples
    }


def family_names(text: bytes) -> list[str]:
    return [line.split()[2] for line in text.decode().splitlines() if line.startswith("# TYPE ")]


def get(url: str, **headers: str) -> tuple[bytes, dict[str, str]]:
    request = urllib.request.Request(url, headers=headers)
    with urllib.request.urlopen(request, timeout=10) as response:
        return response.read(), dict(response.headers)


def assert_logged_once(caplog: pytest.LogCaptureFixture, site: str) -> None:
    errors = [r.getMessage() for r in caplog.records if "internal error" in r.getMessage()]
    assert len(errors) == 1
    assert site in errors[0]


@pytest.fixture
def registry() -> CollectorRegistry:
    """A registry with poolwatch and one metric of the application's own on it."""
    registry = CollectorRegistry()
    Counter("app_jobs", "The application's own counter.", registry=registry).inc(3)
    poolwatch.prometheus.enable(registry)
    return registry


@pytest.fixture
def served(registry: CollectorRegistry) -> Iterator[str]:
    server, thread = poolwatch.prometheus.start_http_server(0, registry=registry)
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join(5)


@contextlib.contextmanager
def traffic(hx: Any, server: LoopbackServer, name: str) -> Iterator[Any]:
    """An instrumented client after three requests and one that failed."""
    with hx.Client(limits=hx.Limits(max_connections=2)) as client:
        poolwatch.instrument(client, name=name)
        for _ in range(3):
            client.get(f"{server.url}/ok")
        with pytest.raises(hx.RemoteProtocolError):
            client.get(f"{server.url}/drop")
        yield client


def test_prometheus_gets_openmetrics_gzipped_with_the_same_samples_as_prometheus_client_writes(
    hx: Any, loopback_server: LoopbackServer, registry: CollectorRegistry, served: str
) -> None:
    with traffic(hx, loopback_server, "om"):
        body, headers = get(
            f"{served}/metrics", Accept=PROMETHEUS_ACCEPT, **{"Accept-Encoding": "gzip"}
        )
        expected = openmetrics_latest(registry)
    assert headers["Content-Encoding"] == "gzip"
    assert headers["Content-Type"].startswith("application/openmetrics-text; version=1.0.0")
    page = gzip.decompress(body)
    assert page.endswith(b"\n# EOF\n")
    assert page.count(b"# EOF") == 1
    assert samples_of(page, openmetrics=True) == samples_of(expected, openmetrics=True)
    assert sorted(family_names(page)) == sorted(family_names(expected))


def test_a_plain_scrape_gets_the_text_format_with_every_family_once(
    hx: Any, loopback_server: LoopbackServer, registry: CollectorRegistry, served: str
) -> None:
    with traffic(hx, loopback_server, "text"):
        page, headers = get(f"{served}/metrics")
        expected = generate_latest(registry)
    assert headers["Content-Type"].startswith("text/plain; version=0.0.4")
    assert "Content-Encoding" not in headers
    assert samples_of(page) == samples_of(expected)
    names = family_names(page)
    # + the application's counter and the _created gauge prometheus_client gives it
    assert len(names) == len(set(names)) == len(CATALOGUE) + 2
    assert samples_of(page)[("app_jobs_total", ())] == 3


def test_a_page_filtered_by_name_holds_only_those_metrics(
    hx: Any, loopback_server: LoopbackServer, served: str
) -> None:
    with traffic(hx, loopback_server, "filtered"):
        page, _headers = get(f"{served}/metrics?name[]=poolwatch_pool_requests_total")
    assert {name for name, _labels in samples_of(page)} == {"poolwatch_pool_requests_total"}


@pytest.mark.parametrize(
    "name", ['quoted "pool"', "back\\slash", "two\nlines", "ünïcode 池", "{braces} %d %s"]
)
def test_pool_names_that_need_escaping_read_back_the_same_in_both_formats(
    name: str, hx: Any, loopback_server: LoopbackServer, registry: CollectorRegistry
) -> None:
    with traffic(hx, loopback_server, name):
        text, text_type = poolwatch.prometheus._render(registry, "")
        om, om_type = poolwatch.prometheus._render(registry, PROMETHEUS_ACCEPT)
        assert samples_of(text) == samples_of(generate_latest(registry))
        assert samples_of(om, openmetrics=True) == samples_of(
            openmetrics_latest(registry), openmetrics=True
        )
    assert text_type.startswith("text/plain")
    assert om_type.startswith("application/openmetrics")
    assert {dict(labels).get("pool_name") for _n, labels in samples_of(text)} >= {name}


def test_series_reused_from_the_last_scrape_are_rewritten_once_they_move(
    hx: Any, loopback_server: LoopbackServer, registry: CollectorRegistry
) -> None:
    with traffic(hx, loopback_server, "moving") as client:
        pages = []
        for _ in range(3):
            pages.append(poolwatch.prometheus.generate_latest(registry))
            assert samples_of(pages[-1]) == samples_of(generate_latest(registry))
            client.get(f"{loopback_server.url}/ok")
    assert pages[0] != pages[1] != pages[2]
    requests = [
        sum(v for (n, _), v in samples_of(p).items() if n == "poolwatch_pool_requests_total")
        for p in pages
    ]
    assert requests == [4, 5, 6]  # three /ok and the dropped one, then one more each time


def test_a_pool_at_rest_gets_the_same_bytes_scrape_after_scrape_with_every_family_once(
    hx: Any, loopback_server: LoopbackServer, registry: CollectorRegistry
) -> None:
    """The first scrape after traffic writes the pool's pieces, the next joins them, the
    third reuses the joined text: one page, byte for byte, in both formats."""
    with traffic(hx, loopback_server, "resting"):
        for accept in ("", PROMETHEUS_ACCEPT):
            pages = [poolwatch.prometheus._render(registry, accept)[0] for _ in range(3)]
            assert pages[0] == pages[1] == pages[2]
            names = family_names(pages[0])
            assert len(names) == len(set(names))
            assert pages[0].count(b"# EOF") == (1 if accept else 0)
        assert samples_of(pages[0], openmetrics=True) == samples_of(
            openmetrics_latest(registry), openmetrics=True
        )


@pytest.mark.parametrize("accept", ["", PROMETHEUS_ACCEPT], ids=["text", "openmetrics"])
def test_when_poolwatch_cannot_write_the_pools_prometheus_client_writes_them_and_it_logs_once(
    accept: str,
    hx: Any,
    loopback_server: LoopbackServer,
    registry: CollectorRegistry,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    def broken(*_args: Any, **_kwargs: Any) -> bytes:
        raise RuntimeError("cannot write")

    openmetrics = bool(accept)
    monkeypatch.setattr(poolwatch.prometheus._exposition, "render", broken)
    with caplog.at_level(logging.INFO, logger="poolwatch"), traffic(hx, loopback_server, "x"):
        pages = [poolwatch.prometheus._render(registry, accept)[0] for _ in range(2)]
        theirs = openmetrics_latest(registry) if openmetrics else generate_latest(registry)
        expected = samples_of(theirs, openmetrics=openmetrics)
    assert all(samples_of(page, openmetrics=openmetrics) == expected for page in pages)
    assert any(dict(labels).get("pool_name") == "x" for _n, labels in expected)
    assert all(page.count(b"# EOF") == (1 if openmetrics else 0) for page in pages)
    assert_logged_once(caplog, "prometheus render")


def test_a_registry_poolwatch_is_not_enabled_on_gets_prometheus_clients_page_unchanged(
    hx: Any, loopback_server: LoopbackServer
) -> None:
    registry = CollectorRegistry()
    Counter("app_only", "Nothing of poolwatch's.", registry=registry).inc()
    with traffic(hx, loopback_server, "elsewhere"):
        assert poolwatch.prometheus.generate_latest(registry) == generate_latest(registry)


def test_a_pool_that_cannot_be_written_is_left_out_and_the_others_stay(
    hx: Any,
    loopback_server: LoopbackServer,
    registry: CollectorRegistry,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    real = poolwatch._exposition.pool_values

    def failing_for_one(snap: poolwatch.PoolSnapshot) -> Any:
        if snap.name == "broken":
            raise RuntimeError("cannot write this pool")
        return real(snap)

    monkeypatch.setattr(poolwatch._exposition, "pool_values", failing_for_one)
    with (
        caplog.at_level(logging.INFO, logger="poolwatch"),
        traffic(hx, loopback_server, "broken"),
        traffic(hx, loopback_server, "fine"),
    ):
        pages = [poolwatch.prometheus.generate_latest(registry) for _ in range(2)]
        expected = {
            key: value
            for key, value in samples_of(generate_latest(registry)).items()
            if dict(key[1]).get("pool_name") != "broken"
        }
    for page in pages:
        assert samples_of(page) == expected
    assert any(dict(labels).get("pool_name") == "fine" for _n, labels in expected)
    assert_logged_once(caplog, "prometheus render")


def test_a_pool_uninstrumented_since_the_last_scrape_leaves_the_page(
    hx: Any, loopback_server: LoopbackServer, registry: CollectorRegistry
) -> None:
    with (
        traffic(hx, loopback_server, "leaving") as leaving,
        traffic(hx, loopback_server, "staying"),
    ):
        before = poolwatch.prometheus.generate_latest(registry)
        poolwatch.uninstrument(leaving)
        after = poolwatch.prometheus.generate_latest(registry)
        assert samples_of(after) == samples_of(generate_latest(registry))
    pools = [
        {dict(labels).get("pool_name") for _n, labels in samples_of(p)} for p in (before, after)
    ]
    assert pools == [{"leaving", "staying", None}, {"staying", None}]  # None: app_jobs


@pytest.mark.parametrize("seed", range(5))
def test_a_histogram_block_holds_the_cumulative_counts_whichever_buckets_are_filled(
    seed: int,
) -> None:
    """The block writer formats every bucket's cumulative count in one go, from the counts per
    bucket; prometheus_client's parser reads back every bucket, however they are filled."""
    rng = random.Random(seed)
    bounds = TIME_IN_QUEUE.buckets
    n = len(bounds) + 1
    shapes = [
        [0] * n,  # nothing observed
        [rng.randrange(1, 9)] + [0] * (n - 1),  # all in the first bucket
        [0] * (n - 1) + [rng.randrange(1, 9)],  # all past the last bound
        [rng.choice((0, 0, 0, rng.randrange(1, 50))) for _ in range(n)],  # a few buckets
        [rng.randrange(0, 3) for _ in range(n)],  # many
    ]
    series = _Series(TIME_IN_QUEUE, ("p", "api.example", "443", "https"))
    header = f"# TYPE {TIME_IN_QUEUE.prometheus_name} histogram\n"
    for counts in shapes:
        h = HistogramSnapshot(bounds, tuple(counts), sum(counts), rng.random() * 10)
        block = series.histogram(h).decode()
        [family] = text_string_to_metric_families(header + block)
        got = {(s.name, s.labels.get("le")): s.value for s in family.samples}
        les = [*(repr(float(b)) for b in bounds), "+Inf"]
        name = TIME_IN_QUEUE.prometheus_name
        assert [got[f"{name}_bucket", le] for le in les] == h.cumulative()
        assert got[f"{name}_count", None] == h.count
        assert got[f"{name}_sum", None] == pytest.approx(h.sum)
        assert len(family.samples) == n + 2
        same = HistogramSnapshot(bounds, tuple(counts), h.count, h.sum)
        assert series.histogram(same) is series.histogram(h)  # unchanged: reused, not rewritten


def test_a_histogram_with_bounds_of_its_own_is_written_at_the_catalogues_bounds() -> None:
    """A snapshot made by hand may carry other bounds: each bucket of the catalogue's then
    counts the observations known to be below it, and +Inf and the count hold them all."""
    series = _Series(TIME_IN_QUEUE, ("p", "api.example", "443", "https"))
    header = f"# TYPE {TIME_IN_QUEUE.prometheus_name} histogram\n"
    name = TIME_IN_QUEUE.prometheus_name
    for h in (
        HistogramSnapshot((0.01, 1.0), (3, 4, 5), 12, 7.5),
        HistogramSnapshot((), (0,), 0, 0.0),  # a PoolSnapshot field's default
    ):
        [family] = text_string_to_metric_families(header + series.histogram(h).decode())
        got = {s.labels.get("le"): s.value for s in family.samples if s.name == f"{name}_bucket"}
        for bound in TIME_IN_QUEUE.buckets:
            below = sum(n for b, n in zip(h.bounds, h.counts, strict=False) if b <= bound)
            assert got[repr(float(bound))] == below
        assert got["+Inf"] == h.count
        counts = [s.value for s in family.samples if s.name == f"{name}_count"]
        assert counts == [h.count]


def _random_histogram(rng: random.Random, spec: MetricSpec) -> HistogramSnapshot:
    n = len(spec.buckets) + 1
    counts = [rng.choice((0, 0, 0, rng.randrange(1, 5000))) for _ in range(n)]
    return HistogramSnapshot(spec.buckets, tuple(counts), sum(counts), rng.random() * 1e3)


def _random_pool(rng: random.Random, name: str, last: PoolSnapshot | None) -> PoolSnapshot:
    """A pool's next snapshot: origins, versions, errors and connection groups that come and
    go, with the last one's connection-group tuple kept now and then (as a busy pool's is),
    and its pool-wide numbers kept now and then (as a busy pool's are at most scrapes)."""
    hosts = rng.sample(
        ["api.test", "b.test", '"q"%d.test', "ü.test", "x\\y.test"], rng.randrange(4)
    )
    origins = tuple(
        OriginSnapshot(
            rng.choice(("http", "https")),
            host,
            rng.choice((80, 443, 8080)),
            rng.randrange(3),
            rng.randrange(100),
            rng.randrange(100),
            rng.randrange(9),
            rng.randrange(2),
            {
                e: rng.randrange(1, 9)
                for e in rng.sample(["ReadError", "PoolTimeout"], rng.randrange(3))
            },
            tuple(sorted(rng.sample(["1.1", "2"], rng.randrange(3)))),
            _random_histogram(rng, TIME_IN_QUEUE),
            _random_histogram(rng, CONNECTION_DURATION),
        )
        for host in hosts
    )
    if last is not None and rng.random() < 0.4:
        connections = last.connections
    else:
        connections = tuple(
            ConnectionGroup(o.scheme, o.address, o.port, state, version, rng.randrange(1, 4))
            for o in origins
            for state in rng.sample(["active", "idle", "connecting"], rng.randrange(3))
            for version in (rng.choice(("1.1", "2", "")),)
        )
    if last is not None and rng.random() < 0.5:  # pool-wide numbers as they were
        limit, pending, utilization = last.max_connections, last.pending_requests, last.utilization
        leaked, ages = last.leaked_responses_total, (last.pending_max_age, last.active_max_age)
    else:
        limit, pending, utilization = rng.choice((None, 10, 100)), rng.randrange(5), rng.random()
        leaked, ages = rng.randrange(3), (rng.random(), rng.random() * 9)
    return PoolSnapshot(
        name=name, max_connections=limit, active_connections=0,
        idle_connections=0, pending_requests=pending, active_requests=0,
        utilization=utilization, requests_total=0, reused_requests_total=0,
        connections_created_total=0, pool_timeouts_total=0,
        leaked_responses_total=leaked, reuse_ratio=None,
        pending_max_age=ages[0], active_max_age=ages[1],
        connections=connections, origins=origins,
        connect_time=_random_histogram(rng, CONNECT_TIME),
        tls_time=rng.choice((_random_histogram(rng, TLS_TIME), NO_OBSERVATIONS)),
        time_to_first_byte=_random_histogram(rng, TIME_TO_FIRST_BYTE),
        request_duration=_random_histogram(rng, REQUEST_DURATION),
    )  # fmt: skip


def _expected(snaps: list[PoolSnapshot]) -> Samples:
    """The page's samples as the catalogue's ``samples()`` gives them, written out by hand."""
    out: Samples = {}
    for snap in snaps:
        for spec, values, value in poolwatch_samples(snap):
            labels = tuple(zip(spec.labels, values, strict=True))
            name = spec.prometheus_name
            if not isinstance(value, HistogramSnapshot):
                out[name, tuple(sorted(labels))] = float(value)
                continue
            for bound in (*spec.buckets, math.inf):  # what is known to be at most each bound
                n = sum(
                    c
                    for b, c in zip((*value.bounds, math.inf), value.counts, strict=True)
                    if b <= bound
                )
                le = "+Inf" if bound == math.inf else repr(float(bound))
                out[f"{name}_bucket", tuple(sorted((*labels, ("le", le))))] = float(n)
            out[f"{name}_count", tuple(sorted(labels))] = float(value.count)
            out[f"{name}_sum", tuple(sorted(labels))] = value.sum
    return out


@pytest.mark.parametrize("seed", range(12))
def test_any_run_of_scrapes_reads_back_as_the_catalogues_samples_of_each_snapshot(
    seed: int,
) -> None:
    """Pools whose origins, versions, errors and connections change between scrapes, pools
    at rest (the very snapshot again), pools that leave and come back under their name: each
    page holds exactly the samples of its snapshots, whatever the writer kept from before."""
    rng = random.Random(seed)
    exposition = poolwatch._exposition.Exposition()
    last: dict[str, PoolSnapshot] = {}
    for _ in range(15):
        snaps = []
        for name in rng.sample(["a", "b%d", 'c"'], rng.randrange(1, 4)):
            previous = last.get(name)
            if previous is not None and rng.random() < 0.3:
                snap = previous  # at rest
            else:
                snap = _random_pool(rng, name, previous)
            last[name] = snap
            snaps.append(snap)
        openmetrics = rng.random() < 0.5
        page = exposition.render(
            snaps, openmetrics=openmetrics, after=b"# EOF\n" if openmetrics else b""
        )
        assert samples_of(page, openmetrics=openmetrics) == _expected(snaps)
