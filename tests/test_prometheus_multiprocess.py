"""prometheus_client multiprocess mode with real worker processes: the merged page adds up."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from prometheus_client import CollectorRegistry
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

from poolwatch._loopback import LoopbackServer

WORKER = Path(__file__).with_name("mp_worker.py")


def merged(directory: Path) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(directory))
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in registry.collect()
        for s in family.samples
    }


def total(
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str
) -> float:
    return sum(v for (n, ls), v in samples.items() if n == name and set(labels.items()) <= ls)


def test_two_worker_processes_add_up_on_the_merged_page(
    loopback_server: LoopbackServer, tmp_path: Path
) -> None:
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    workers = [
        subprocess.Popen(
            [sys.executable, str(WORKER), loopback_server.url, str(n)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            text=True,
        )
        for n in (5, 7)
    ]
    try:
        for w in workers:
            assert w.stdout is not None
            assert w.stdout.readline().strip() == "ready"
        page = merged(tmp_path)
        # Counters sum over workers: 5 + 7 requests, plus the response each one holds open.
        assert total(page, "poolwatch_pool_requests_total", pool_name="workers") == 14
        assert total(page, "poolwatch_pool_requests_total") == loopback_server.stats.requests
        assert total(page, "poolwatch_pool_connections_created_total") == (
            loopback_server.stats.accepted_connections
        )
        # Gauges are livesum across workers, ages and ratios the worst worker.
        assert total(page, "http_client_active_requests", pool_name="workers") == 2
        assert total(page, "poolwatch_pool_connection_max", pool_name="workers") == 4
        assert total(page, "http_client_open_connections", http_connection_state="active") == 2
        assert total(page, "poolwatch_pool_utilization_ratio", pool_name="workers") == 0.5
        assert total(page, "http_client_request_time_in_queue_seconds_count") == 14
        assert total(page, "http_client_request_time_in_queue_seconds_bucket", le="+Inf") == 14
    finally:
        for w in workers:
            assert w.stdin is not None
            w.stdin.write("\n")
            w.stdin.flush()
        for w in workers:
            assert w.wait(timeout=20) == 0
    for w in workers:
        mark_process_dead(w.pid, str(tmp_path))
    page = merged(tmp_path)
    # Dead workers leave the live gauges; their counters stay (rates must not drop).
    assert total(page, "http_client_active_requests") == 0
    assert total(page, "poolwatch_pool_requests_total", pool_name="workers") >= 14
