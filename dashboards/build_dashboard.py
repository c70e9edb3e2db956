"""Build dashboards/poolwatch.json, the Grafana dashboard for poolwatch's pools.

Plain Python dicts, no dependency: run ``python dashboards/build_dashboard.py`` after editing
and commit both files (``tests/test_dashboards.py`` checks that the JSON is this script's output,
that it validates against Grafana's schema, and that every query parses and names only metrics
and labels from ``poolwatch._catalogue``).

Conventions kept by every query:

* the data source is the ``$datasource`` variable, so the JSON imports as is;
* every selector filters on ``pool_name=~"$pool_name"`` and ``instance=~"$instance"``;
* results are aggregated ``by (pool_name)`` (``sum`` for counts and rates, ``max`` for
  ratios and ages: the worst instance is the one that times out), so the dashboard stays
  readable with hundreds of instances;
* rates use ``$__rate_interval``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
OUTPUT = HERE / "poolwatch.json"
README_URL = "https://github.com/poolwatch/poolwatch/blob/main/dashboards/README.md"

DS = {"type": "prometheus", "uid": "${datasource}"}
SEL = 'pool_name=~"$pool_name", instance=~"$instance"'
RI = "$__rate_interval"

Json = dict[str, Any]


# --------------------------------------------------------------------------- query helpers


def sel(extra: str = "") -> str:
    """The label matchers every query carries, plus ``extra`` ones."""
    return "{" + SEL + (", " + extra if extra else "") + "}"


def rate(metric: str, extra: str = "") -> str:
    return f"rate({metric}{sel(extra)}[{RI}])"


def quantile(q: float, histogram: str, by: str = "pool_name") -> str:
    return f"histogram_quantile({q}, sum by ({by}, le) ({rate(histogram + '_bucket')}))"


def target(expr: str, legend: str, ref: str) -> Json:
    return {
        "datasource": DS,
        "editorMode": "code",
        "expr": expr,
        "legendFormat": legend,
        "range": True,
        "refId": ref,
    }


# --------------------------------------------------------------------------- panel helpers


class Layout:
    """Places panels left to right on Grafana's 24-column grid, wrapping rows."""

    def __init__(self) -> None:
        self.x = 0
        self.y = 0
        self.row_height = 0
        self.next_id = 1

    def take_id(self) -> int:
        self.next_id += 1
        return self.next_id - 1

    def place(self, w: int, h: int) -> Json:
        if self.x + w > 24:
            self.newline()
        pos = {"h": h, "w": w, "x": self.x, "y": self.y}
        self.x += w
        self.row_height = max(self.row_height, h)
        return pos

    def newline(self) -> None:
        self.y += self.row_height
        self.x = 0
        self.row_height = 0


def row(layout: Layout, title: str) -> Json:
    layout.newline()
    panel = {
        "collapsed": False,
        "gridPos": layout.place(24, 1),
        "id": layout.take_id(),
        "panels": [],
        "title": title,
        "type": "row",
    }
    layout.newline()
    return panel


def thresholds(*steps: tuple[float | None, str]) -> Json:
    return {
        "mode": "absolute",
        "steps": [{"color": color, "value": value} for value, color in steps],
    }


GREEN_ONLY = thresholds((None, "green"))


def timeseries(
    layout: Layout,
    *,
    title: str,
    description: str,
    targets: list[Json],
    unit: str,
    w: int = 12,
    h: int = 8,
    min_: float | None = 0,
    max_: float | None = None,
    stack: bool = False,
    threshold_steps: Json | None = None,
    overrides: list[Json] | None = None,
    fill: int = 10,
) -> Json:
    custom: Json = {
        "axisSoftMin": 0,
        "drawStyle": "line",
        "fillOpacity": 60 if stack else fill,
        "lineWidth": 1,
        "showPoints": "never",
        "spanNulls": False,
        "stacking": {"group": "A", "mode": "normal" if stack else "none"},
        "thresholdsStyle": {"mode": "dashed" if threshold_steps else "off"},
    }
    defaults: Json = {
        "color": {"mode": "palette-classic"},
        "custom": custom,
        "thresholds": threshold_steps or GREEN_ONLY,
        "unit": unit,
    }
    if min_ is not None:
        defaults["min"] = min_
    if max_ is not None:
        defaults["max"] = max_
    return {
        "datasource": DS,
        "description": description,
        "fieldConfig": {"defaults": defaults, "overrides": overrides or []},
        "gridPos": layout.place(w, h),
        "id": layout.take_id(),
        "options": {
            "legend": {
                "calcs": ["lastNotNull", "max"],
                "displayMode": "table",
                "placement": "bottom",
                "showLegend": True,
            },
            "tooltip": {"mode": "multi", "sort": "desc"},
        },
        "targets": targets,
        "title": title,
        "type": "timeseries",
    }


def stat(
    layout: Layout,
    *,
    title: str,
    description: str,
    targets: list[Json],
    unit: str,
    threshold_steps: Json,
    w: int = 6,
    h: int = 8,
    calc: str = "lastNotNull",
    max_: float | None = None,
) -> Json:
    defaults: Json = {
        "color": {"mode": "thresholds"},
        "min": 0,
        "noValue": "0",
        "thresholds": threshold_steps,
        "unit": unit,
    }
    if max_ is not None:
        defaults["max"] = max_
    return {
        "datasource": DS,
        "description": description,
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "gridPos": layout.place(w, h),
        "id": layout.take_id(),
        "options": {
            "colorMode": "background",
            "graphMode": "area",
            "justifyMode": "auto",
            "orientation": "auto",
            "reduceOptions": {"calcs": [calc], "fields": "", "values": False},
            "textMode": "value_and_name",
        },
        "targets": targets,
        "title": title,
        "type": "stat",
    }


def by_ref(ref: str, *properties: tuple[str, Any]) -> Json:
    """A field override for the series of one query."""
    return {
        "matcher": {"id": "byFrameRefID", "options": ref},
        "properties": [{"id": pid, "value": value} for pid, value in properties],
    }


LIMIT_LINE = (
    ("custom.lineStyle", {"dash": [10, 10], "fill": "dash"}),
    ("custom.fillOpacity", 0),
    ("custom.lineWidth", 2),
)


# --------------------------------------------------------------------------- the panels


def panels() -> list[Json]:
    lay = Layout()
    out: list[Json] = []
    add = out.append

    # Row 1: is any pool saturated right now?
    add(row(lay, "Saturation: read first"))
    add(
        stat(
            lay,
            title="Utilization (worst instance)",
            description=(
                "Active connections divided by max_connections, per pool, on the instance "
                "where it is highest. Amber from 80 %, red from 95 %: the "
                "PoolwatchPoolNearlySaturated and PoolwatchPoolSaturated alerts. A pool "
                "without a limit shows 0. If it stays red, read 'Requests waiting' and "
                "'Queue wait' below, then raise max_connections or lower the concurrency "
                "that feeds this pool (runbook: dashboards/README.md)."
            ),
            targets=[
                target(
                    f"max by (pool_name) (poolwatch_pool_utilization_ratio{sel()})",
                    "{{pool_name}}",
                    "A",
                )
            ],
            unit="percentunit",
            max_=1,
            threshold_steps=thresholds((None, "green"), (0.8, "orange"), (0.95, "red")),
        )
    )
    add(
        timeseries(
            lay,
            title="Utilization over time",
            description=(
                "Utilization (active / max_connections) of each pool on its busiest "
                "instance. The dashed lines are the alert thresholds, 80 % (warning) and "
                "95 % (critical). A pool near 100 % makes new requests wait for a "
                "connection; short peaks are fine, plateaus are not: raise max_connections "
                "or reduce concurrency. Unlimited pools read 0."
            ),
            targets=[
                target(
                    f"max by (pool_name) (poolwatch_pool_utilization_ratio{sel()})",
                    "{{pool_name}}",
                    "A",
                )
            ],
            unit="percentunit",
            w=9,
            max_=1,
            threshold_steps=thresholds((None, "green"), (0.8, "orange"), (0.95, "red")),
        )
    )
    add(
        timeseries(
            lay,
            title="Active connections and the limit",
            description=(
                "Active connections summed over the selected instances (solid) against the "
                "sum of their max_connections (dashed). When the solid line meets the dashed "
                "one, the pool is full and requests queue. Select a single instance to read "
                "its own limit. A pool without a limit has no dashed line (its "
                "poolwatch_pool_connection_max series is absent)."
            ),
            targets=[
                target(
                    "sum by (pool_name) (http_client_open_connections"
                    + sel('http_connection_state="active"')
                    + ")",
                    "{{pool_name}} active",
                    "A",
                ),
                target(
                    f"sum by (pool_name) (poolwatch_pool_connection_max{sel()})",
                    "{{pool_name}} limit",
                    "B",
                ),
            ],
            unit="short",
            w=9,
            overrides=[by_ref("B", *LIMIT_LINE)],
        )
    )

    # Row 2: connections and the queue in front of them.
    add(row(lay, "Connections and queue"))
    add(
        timeseries(
            lay,
            title="Active / idle connections and waiting requests",
            description=(
                "Stacked: open connections serving a request (active), open connections "
                "kept alive with nothing to do (idle), and requests waiting for a connection "
                "or an HTTP/2 stream slot (waiting), summed over instances. Waiting above "
                "zero with no idle connections means the pool is the bottleneck: raise "
                "max_connections or lower concurrency. Many idle connections and no waiting "
                "means the pool is larger than needed. Select one pool to read its stack."
            ),
            targets=[
                target(
                    "sum by (pool_name, http_connection_state) "
                    f"(http_client_open_connections{sel()})",
                    "{{pool_name}} {{http_connection_state}}",
                    "A",
                ),
                target(
                    f"sum by (pool_name) (poolwatch_pool_pending_requests{sel()})",
                    "{{pool_name}} waiting",
                    "B",
                ),
            ],
            unit="short",
            stack=True,
        )
    )
    add(
        timeseries(
            lay,
            title="Oldest waiting request",
            description=(
                "How long the oldest request still waiting for a connection has waited, "
                "worst instance per pool (0 when nothing waits). The dashed line is the "
                "PoolwatchRequestWaitingTooLong threshold (60 s). A line that climbs steadily "
                "means no connection is being released: look for leaked responses and "
                "unclosed streams below. It ends in a PoolTimeout when it reaches the "
                "client's pool timeout."
            ),
            targets=[
                target(
                    f"max by (pool_name) (poolwatch_pool_pending_requests_max_age_seconds{sel()})",
                    "{{pool_name}}",
                    "A",
                )
            ],
            unit="s",
            threshold_steps=thresholds((None, "green"), (60, "red")),
        )
    )
    queue = "http_client_request_time_in_queue_seconds"
    add(
        timeseries(
            lay,
            title="Queue wait p50 / p95 / p99",
            description=(
                "Time requests waited for a connection before being sent, as percentiles "
                "over all selected instances. Near zero in a healthy pool. A p99 above 1 s "
                "for 10 minutes fires PoolwatchQueueWaitHigh: the pool is too small for "
                "the load, or responses hold connections too long. Compare with "
                "'Request phases': if queueing is a large share of the whole request, give "
                "the pool more connections."
            ),
            targets=[
                target(quantile(0.5, queue), "{{pool_name}} p50", "A"),
                target(quantile(0.95, queue), "{{pool_name}} p95", "B"),
                target(quantile(0.99, queue), "{{pool_name}} p99", "C"),
            ],
            unit="s",
            threshold_steps=thresholds((None, "green"), (1, "red")),
        )
    )
    add(
        timeseries(
            lay,
            title="PoolTimeouts per second",
            description=(
                "Requests that failed with the library's PoolTimeout: they waited the whole "
                "pool timeout without getting a connection. Any value above zero fires "
                "PoolwatchPoolTimeouts and is an error your users saw. Raise "
                "max_connections, make sure responses and streams are closed, and limit "
                "concurrency before the pool (a semaphore) rather than in it."
            ),
            targets=[
                target(
                    f"sum by (pool_name) ({rate('poolwatch_pool_timeouts_total')})",
                    "{{pool_name}}",
                    "A",
                )
            ],
            unit="reqps",
        )
    )

    # Row 3: is the pool doing its job (reusing connections), and how long do they live?
    add(row(lay, "Reuse and churn"))
    requests = "poolwatch_pool_requests_total"
    add(
        timeseries(
            lay,
            title="Connection reuse ratio",
            description=(
                "Share of requests served by a connection that already existed. A pool "
                "under steady load should sit near 100 %. A low ratio while the request "
                "rate is meaningful fires PoolwatchLowConnectionReuse: connections are "
                "closed after each request (the server closes them, keepalive_expiry is "
                "too short, a new client is created per request) and every request pays "
                "connect and TLS time again."
            ),
            targets=[
                # "or 0 * ...": a pool that never reused a connection has no
                # connection_reused="true" series; without it the ratio would vanish
                # instead of reading 0.
                target(
                    "(sum by (pool_name) ("
                    + rate(requests, 'connection_reused="true"')
                    + f") or 0 * sum by (pool_name) ({rate(requests)}))"
                    + f" / sum by (pool_name) ({rate(requests)})",
                    "{{pool_name}}",
                    "A",
                )
            ],
            unit="percentunit",
            w=8,
            max_=1,
            threshold_steps=thresholds((None, "red"), (0.5, "green")),
        )
    )
    add(
        timeseries(
            lay,
            title="Connections opened vs requests per second",
            description=(
                "New connections per second (churn) next to requests per second that "
                "obtained a connection. The two lines close together mean nearly every "
                "request opens a connection: find why connections are not kept (server "
                "'Connection: close', short keepalive_expiry, a client per request). A "
                "burst of new connections right after a saturation episode is expected."
            ),
            targets=[
                target(
                    f"sum by (pool_name) ({rate('poolwatch_pool_connections_created_total')})",
                    "{{pool_name}} connections opened",
                    "A",
                ),
                target(
                    f"sum by (pool_name) ({rate(requests)})",
                    "{{pool_name}} requests",
                    "B",
                ),
            ],
            unit="ops",
            w=8,
        )
    )
    lifetime = "http_client_connection_duration_seconds"
    add(
        timeseries(
            lay,
            title="Connection lifetime p50 / p95",
            description=(
                "How long connections live from TCP connect to close, over the selected "
                "instances. Lifetimes of a few seconds with a high request rate are churn: "
                "raise keepalive_expiry or check who closes the connections. Very long "
                "lifetimes are fine for a busy pool."
            ),
            targets=[
                target(quantile(0.5, lifetime), "{{pool_name}} p50", "A"),
                target(quantile(0.95, lifetime), "{{pool_name}} p95", "B"),
            ],
            unit="s",
            w=8,
        )
    )

    # Row 4: things that eat the pool slowly.
    add(row(lay, "Leaks and errors"))
    add(
        stat(
            lay,
            title="Leaked responses in range",
            description=(
                "Responses that were garbage-collected without being closed during the "
                "selected time range. httpx never takes their connections back: each leak "
                "shrinks the pool by one connection until the process restarts. Anything "
                "above zero fires "
                "PoolwatchLeakedResponses: close responses ('with client.stream(...)', "
                "'async with', response.aclose()), and always consume or close SDK streams."
            ),
            targets=[
                target(
                    "sum by (pool_name) "
                    f"(increase(poolwatch_pool_leaked_responses_total{sel()}[$__range]))",
                    "{{pool_name}}",
                    "A",
                )
            ],
            unit="short",
            w=6,
            calc="lastNotNull",
            threshold_steps=thresholds((None, "green"), (1, "red")),
        )
    )
    add(
        timeseries(
            lay,
            title="Oldest request in flight",
            description=(
                "Age of the oldest request from entering the transport until its response "
                "is closed, worst instance per pool. Long LLM streams legitimately reach "
                "minutes; a line that only ever grows is a response that is never closed "
                "and holds its connection. Find the code path that reads the response "
                "without closing it."
            ),
            targets=[
                target(
                    f"max by (pool_name) (poolwatch_pool_active_requests_max_age_seconds{sel()})",
                    "{{pool_name}}",
                    "A",
                )
            ],
            unit="s",
            w=8,
        )
    )
    add(
        timeseries(
            lay,
            title="Request errors by type",
            description=(
                "Requests that ended in an exception, per second, by the exception's class "
                "name ('cancelled' for cancellations). PoolTimeout points at the pool; "
                "ConnectTimeout / ConnectError at the network or the server; ReadTimeout at "
                "slow responses; a high 'cancelled' rate means callers give up (their own "
                "timeouts) and may be hiding queueing."
            ),
            targets=[
                target(
                    "sum by (pool_name, error_type) "
                    f"({rate('poolwatch_pool_request_errors_total')})",
                    "{{pool_name}} {{error_type}}",
                    "A",
                )
            ],
            unit="reqps",
            w=10,
        )
    )

    # Row 5: where the time of a request goes.
    add(row(lay, "Request phases"))
    phases = [
        ("http_client_request_time_in_queue_seconds", "queue"),
        ("poolwatch_connection_connect_time_seconds", "connect"),
        ("poolwatch_connection_tls_time_seconds", "TLS"),
        ("poolwatch_request_time_to_first_byte_seconds", "time to first byte"),
        ("poolwatch_request_duration_seconds", "whole request"),
    ]
    add(
        timeseries(
            lay,
            title="Request phases p95",
            description=(
                "95th percentile of each phase of a request, over the selected instances: "
                "waiting for a connection (queue), TCP connect and TLS handshake (new "
                "connections only), time to first byte (the server's and the network's "
                "time) and the whole request until the response is closed. If queue "
                "dominates, the pool is too small; if connect/TLS are high and frequent, "
                "improve reuse; if time to first byte dominates, the server is slow and a "
                "bigger pool will not help."
            ),
            targets=[
                target(quantile(0.95, metric), "{{pool_name}} " + name, chr(ord("A") + i))
                for i, (metric, name) in enumerate(phases)
            ],
            unit="s",
            w=24,
            h=9,
        )
    )
    return out


def variables() -> list[Json]:
    def query_var(name: str, label: str, query: str, description: str) -> Json:
        return {
            "allValue": ".*",
            "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
            "datasource": DS,
            "description": description,
            "hide": 0,
            "includeAll": True,
            "label": label,
            "multi": True,
            "name": name,
            "options": [],
            "query": query,
            "refresh": 2,
            "regex": "",
            "skipUrlSync": False,
            "sort": 1,
            "type": "query",
        }

    return [
        {
            "description": "The Prometheus that scrapes poolwatch (or receives it through OTLP).",
            "hide": 0,
            "includeAll": False,
            "label": "Data source",
            "multi": False,
            "name": "datasource",
            "options": [],
            "query": "prometheus",
            "refresh": 1,
            "regex": "",
            "skipUrlSync": False,
            "type": "datasource",
        },
        query_var(
            "pool_name",
            "Pool",
            "label_values(poolwatch_pool_utilization_ratio, pool_name)",
            "The name given to poolwatch.instrument(client, name=...).",
        ),
        query_var(
            "instance",
            "Instance",
            'label_values(poolwatch_pool_utilization_ratio{pool_name=~"$pool_name"}, instance)',
            "Scraped processes. Panels aggregate over the selected ones.",
        ),
    ]


def dashboard() -> Json:
    return {
        "annotations": {
            "list": [
                {
                    "builtIn": 1,
                    "datasource": {"type": "grafana", "uid": "-- Grafana --"},
                    "enable": True,
                    "hide": True,
                    "iconColor": "rgba(0, 211, 255, 1)",
                    "name": "Annotations & Alerts",
                    "type": "dashboard",
                }
            ]
        },
        "description": (
            "Connection pools of httpx / httpx2 clients instrumented with poolwatch: "
            "saturation, queueing, reuse, leaks and where request time goes."
        ),
        "editable": True,
        "fiscalYearStartMonth": 0,
        "graphTooltip": 1,
        "links": [
            {
                "asDropdown": False,
                "icon": "doc",
                "includeVars": False,
                "keepTime": False,
                "tags": [],
                "targetBlank": True,
                "title": "Runbooks",
                "tooltip": "What each poolwatch alert means and what to change",
                "type": "link",
                "url": README_URL,
            }
        ],
        "panels": panels(),
        "refresh": "30s",
        "schemaVersion": 39,
        "tags": ["poolwatch", "httpx", "connection-pool"],
        "templating": {"list": variables()},
        "time": {"from": "now-3h", "to": "now"},
        "timepicker": {},
        "timezone": "browser",
        "title": "poolwatch: HTTP client connection pools",
        "uid": "poolwatch-pools",
        "version": 1,
        "weekStart": "",
    }


def render() -> str:
    return json.dumps(dashboard(), indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def main() -> int:
    OUTPUT.write_text(render(), encoding="utf-8")
    print(f"wrote {OUTPUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
