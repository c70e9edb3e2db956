"""Every metric poolwatch exports, named once.

The Prometheus exporter, the OpenTelemetry exporter, the dashboard and alert tests and the
README's metric table all read this tuple, so a name cannot drift between them.

Prometheus names are exactly what the standard OTel-to-Prometheus translation makes of the
OTel names (dots to underscores, the unit as a suffix, ``_total`` on counters), so the same
dashboard works whether the figures are scraped from poolwatch or arrive through OTLP and a
collector. ``tests/test_catalogue.py`` checks that translation for every entry.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Kind = Literal["gauge", "counter", "histogram"]

#: Labels every per-origin metric carries, in OTel attribute form.
ORIGIN_ATTRIBUTES = ("pool.name", "server.address", "server.port", "url.scheme")
#: Labels the pool-wide metrics carry.
POOL_ATTRIBUTES = ("pool.name",)

#: Buckets for request-scale times. LLM calls run for minutes and the SDKs' default pool
#: timeout is 600 s, so the buckets reach it; the low end resolves sub-millisecond queue waits.
REQUEST_TIME_BUCKETS: tuple[float, ...] = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
)  # fmt: skip
#: Buckets for connection lifetimes: the OTel semconv advice, extended to an hour.
CONNECTION_TIME_BUCKETS: tuple[float, ...] = (
    0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
    600.0, 1800.0, 3600.0,
)  # fmt: skip


@dataclass(frozen=True, slots=True, eq=False)
class MetricSpec:
    """One exported metric, as both exporters name it.

    Compared and hashed by identity: each is a module constant, and a scrape looks series up
    by ``(spec, labels)`` thousands of times.
    """

    otel_name: str
    prometheus_name: str
    kind: Kind
    unit: str
    help: str
    #: OTel attribute names; the Prometheus label is the same with dots as underscores.
    attributes: tuple[str, ...]
    buckets: tuple[float, ...] = ()

    @property
    def labels(self) -> tuple[str, ...]:
        """Prometheus label names."""
        return tuple(a.replace(".", "_") for a in self.attributes)

    @property
    def per_origin(self) -> bool:
        return "server.address" in self.attributes

    @property
    def exposition_name(self) -> str:
        """The name as prometheus_client takes it (without the ``_total`` it adds itself)."""
        if self.kind == "counter":
            return self.prometheus_name.removesuffix("_total")
        return self.prometheus_name


OPEN_CONNECTIONS = MetricSpec(
    "http.client.open_connections",
    "http_client_open_connections",
    "gauge",
    "{connection}",
    "Open connections in the pool: active ones serve at least one request, idle ones are kept "
    "alive with nothing to do.",
    (*ORIGIN_ATTRIBUTES, "http.connection.state", "network.protocol.version"),
)
ACTIVE_REQUESTS = MetricSpec(
    "http.client.active_requests",
    "http_client_active_requests",
    "gauge",
    "{request}",
    "Requests in flight, from entering the transport until the response is closed "
    "(queued ones included).",
    ORIGIN_ATTRIBUTES,
)
PENDING_REQUESTS = MetricSpec(
    "poolwatch.pool.pending_requests",
    "poolwatch_pool_pending_requests",
    "gauge",
    "{request}",
    "Requests waiting for a connection or an HTTP/2 stream slot right now.",
    POOL_ATTRIBUTES,
)
PENDING_MAX_AGE = MetricSpec(
    "poolwatch.pool.pending_requests.max_age",
    "poolwatch_pool_pending_requests_max_age_seconds",
    "gauge",
    "s",
    "How long the oldest request still waiting for a connection has waited (0 when none waits).",
    POOL_ATTRIBUTES,
)
ACTIVE_MAX_AGE = MetricSpec(
    "poolwatch.pool.active_requests.max_age",
    "poolwatch_pool_active_requests_max_age_seconds",
    "gauge",
    "s",
    "Age of the oldest request in flight: a response never closed keeps growing it.",
    POOL_ATTRIBUTES,
)
CONNECTION_MAX = MetricSpec(
    "poolwatch.pool.connection.max",
    "poolwatch_pool_connection_max",
    "gauge",
    "{connection}",
    "The pool's max_connections limit (absent when the pool is unlimited).",
    POOL_ATTRIBUTES,
)
UTILIZATION = MetricSpec(
    "poolwatch.pool.utilization",
    "poolwatch_pool_utilization_ratio",
    "gauge",
    "1",
    "Active connections divided by max_connections (0 when the pool is unlimited).",
    POOL_ATTRIBUTES,
)
REQUESTS = MetricSpec(
    "poolwatch.pool.requests",
    "poolwatch_pool_requests_total",
    "counter",
    "{request}",
    "Requests that obtained a connection, by whether it already existed.",
    (*ORIGIN_ATTRIBUTES, "connection.reused"),
)
CONNECTIONS_CREATED = MetricSpec(
    "poolwatch.pool.connections.created",
    "poolwatch_pool_connections_created_total",
    "counter",
    "{connection}",
    "Connections the pool opened (TCP connect completed).",
    ORIGIN_ATTRIBUTES,
)
TIMEOUTS = MetricSpec(
    "poolwatch.pool.timeouts",
    "poolwatch_pool_timeouts_total",
    "counter",
    "{timeout}",
    "Requests that failed with the library's PoolTimeout.",
    ORIGIN_ATTRIBUTES,
)
REQUEST_ERRORS = MetricSpec(
    "poolwatch.pool.request.errors",
    "poolwatch_pool_request_errors_total",
    "counter",
    "{request}",
    "Requests that ended in an exception, by error type (the exception's class name, or "
    "'cancelled').",
    (*ORIGIN_ATTRIBUTES, "error.type"),
)
LEAKED_RESPONSES = MetricSpec(
    "poolwatch.pool.leaked_responses",
    "poolwatch_pool_leaked_responses_total",
    "counter",
    "{response}",
    "Responses garbage-collected without being closed: each keeps its connection forever.",
    POOL_ATTRIBUTES,
)
TIME_IN_QUEUE = MetricSpec(
    "http.client.request.time_in_queue",
    "http_client_request_time_in_queue_seconds",
    "histogram",
    "s",
    "Time requests spent waiting for a connection or an HTTP/2 stream slot.",
    ORIGIN_ATTRIBUTES,
    REQUEST_TIME_BUCKETS,
)
CONNECTION_DURATION = MetricSpec(
    "http.client.connection.duration",
    "http_client_connection_duration_seconds",
    "histogram",
    "s",
    "Lifetime of connections, from TCP connect to close.",
    ORIGIN_ATTRIBUTES,
    CONNECTION_TIME_BUCKETS,
)
CONNECT_TIME = MetricSpec(
    "poolwatch.connection.connect_time",
    "poolwatch_connection_connect_time_seconds",
    "histogram",
    "s",
    "Time to establish the TCP connection of new connections.",
    POOL_ATTRIBUTES,
    REQUEST_TIME_BUCKETS,
)
TLS_TIME = MetricSpec(
    "poolwatch.connection.tls_time",
    "poolwatch_connection_tls_time_seconds",
    "histogram",
    "s",
    "Time of the TLS handshake of new connections.",
    POOL_ATTRIBUTES,
    REQUEST_TIME_BUCKETS,
)
TIME_TO_FIRST_BYTE = MetricSpec(
    "poolwatch.request.time_to_first_byte",
    "poolwatch_request_time_to_first_byte_seconds",
    "histogram",
    "s",
    "From holding a connection to the response headers: the server's time plus the network's "
    "(connect and TLS excluded).",
    POOL_ATTRIBUTES,
    REQUEST_TIME_BUCKETS,
)
REQUEST_DURATION = MetricSpec(
    "poolwatch.request.duration",
    "poolwatch_request_duration_seconds",
    "histogram",
    "s",
    "Whole requests, from entering the transport until the response is closed (queue, "
    "connect, server time and body).",
    POOL_ATTRIBUTES,
    REQUEST_TIME_BUCKETS,
)

CATALOGUE: tuple[MetricSpec, ...] = (
    OPEN_CONNECTIONS,
    ACTIVE_REQUESTS,
    PENDING_REQUESTS,
    PENDING_MAX_AGE,
    ACTIVE_MAX_AGE,
    CONNECTION_MAX,
    UTILIZATION,
    REQUESTS,
    CONNECTIONS_CREATED,
    TIMEOUTS,
    REQUEST_ERRORS,
    LEAKED_RESPONSES,
    TIME_IN_QUEUE,
    CONNECTION_DURATION,
    CONNECT_TIME,
    TLS_TIME,
    TIME_TO_FIRST_BYTE,
    REQUEST_DURATION,
)


def markdown_table() -> str:
    """The README's metric table, made from the catalogue (a test keeps the README in sync)."""
    rows = [
        "| Prometheus name | OTel name | kind | unit | labels beyond `pool_name` | meaning |",
        "|---|---|---|---|---|---|",
    ]
    for spec in CATALOGUE:
        extra = [label for label in spec.labels if label != "pool_name"]
        labels = ", ".join(f"`{label}`" for label in extra) or "(pool-wide)"
        rows.append(
            f"| `{spec.prometheus_name}` | `{spec.otel_name}` | {spec.kind} | `{spec.unit}` "
            f"| {labels} | {spec.help} |"
        )
    return "\n".join(rows)
