"""``poolwatch top URL``: a live table of the pools behind a poolwatch ``/metrics`` page.

Each scrape is fetched with ``urllib`` and parsed with prometheus_client's own parser; the
series are summed per pool (and per ``instance``, when the page has that label, as a
federation endpoint does). Gauges are shown as read; counters become rates between two
scrapes, and the queue-wait p99 is computed from the histogram buckets that filled between
them, so every figure describes the last interval rather than the process's lifetime.

Metric names come from the catalogue, the same list the exporters read.
"""

from __future__ import annotations

import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from datetime import datetime

from prometheus_client.parser import text_string_to_metric_families
from rich import box
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from . import _catalogue as c
from ._histogram import HistogramSnapshot
from ._version import __version__

__all__ = ["PoolFigures", "PoolRow", "Scrape", "TopError", "fetch", "parse", "rows", "run_top"]

#: What a scrape needs at least one of to count as a poolwatch page.
_POOL_WIDE = (
    c.UTILIZATION.prometheus_name,
    c.PENDING_REQUESTS.prometheus_name,
    c.LEAKED_RESPONSES.prometheus_name,
)
_LOOPBACK = ("127.0.0.1", "::1", "localhost")
_QUEUE_BUCKET = c.TIME_IN_QUEUE.prometheus_name + "_bucket"
#: The sample names ``top`` reads (as they appear in the text, ``_total`` included).
_READ = frozenset(
    {
        spec.prometheus_name
        for spec in (
            c.UTILIZATION,
            c.CONNECTION_MAX,
            c.PENDING_REQUESTS,
            c.PENDING_MAX_AGE,
            c.LEAKED_RESPONSES,
            c.OPEN_CONNECTIONS,
            c.ACTIVE_REQUESTS,
            c.REQUESTS,
            c.CONNECTIONS_CREATED,
            c.TIMEOUTS,
        )
    }
    | {_QUEUE_BUCKET}
)


class TopError(Exception):
    """``top`` cannot show anything: unreachable URL, not a metrics page, no poolwatch."""


@dataclass
class PoolFigures:
    """One pool's figures in one scrape (summed over its origins and protocol versions)."""

    pool: str
    instance: str = ""
    utilization: float = 0.0
    max_connections: float | None = None
    active_connections: float = 0.0
    idle_connections: float = 0.0
    pending_requests: float = 0.0
    pending_max_age: float = 0.0
    active_requests: float = 0.0
    requests_total: float = 0.0
    reused_requests_total: float = 0.0
    connections_created_total: float = 0.0
    pool_timeouts_total: float = 0.0
    leaked_responses_total: float = 0.0
    #: Queue-wait histogram: cumulative count per ``le`` bound (``inf`` included).
    queue_buckets: dict[float, float] = field(default_factory=dict)


@dataclass
class Scrape:
    url: str
    #: ``time.monotonic()`` when the page arrived.
    at: float
    pools: dict[tuple[str, str], PoolFigures]
    #: The page declares poolwatch's metric families (even if no pool has a series yet).
    poolwatch_page: bool


@dataclass
class PoolRow:
    """What one line of the table shows; rates are ``None`` until there are two scrapes."""

    pool: str
    instance: str
    utilization: float
    max_connections: int | None
    active_connections: int
    idle_connections: int
    pending_requests: int
    pending_max_age: float
    requests_total: int
    requests_per_s: float | None
    reuse_ratio: float | None
    queue_p99_s: float | None
    pool_timeouts_total: int
    pool_timeouts_per_s: float | None
    leaked_responses_total: int
    leaked_new: int


# --------------------------------------------------------------------------------------------
# Fetching and parsing
# --------------------------------------------------------------------------------------------


def normalize_url(url: str) -> str:
    """``host:port`` -> ``http://host:port/metrics``; a URL without a path gets ``/metrics``."""
    text = url.strip()
    if "://" not in text:
        text = "http://" + text
    parts = urllib.parse.urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise TopError(f"{url!r} is not an http:// or https:// URL")
    path = parts.path if parts.path not in ("", "/") else "/metrics"
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, path, parts.query, ""))


def fetch(url: str, timeout: float = 5.0) -> str:
    """The page's text. Loopback URLs never go through a proxy from the environment."""
    request = urllib.request.Request(
        url,
        headers={
            # The classic text format: prometheus_client's parser reads it.
            "Accept": "text/plain;version=0.0.4;q=1.0, */*;q=0.1",
            "User-Agent": f"poolwatch-top/{__version__}",
        },
    )
    host = urllib.parse.urlsplit(url).hostname or ""
    handlers: list[urllib.request.BaseHandler] = []
    if host in _LOOPBACK:
        handlers.append(urllib.request.ProxyHandler({}))
    opener = urllib.request.build_opener(*handlers)
    try:
        with opener.open(request, timeout=timeout) as response:
            charset = response.headers.get_content_charset() or "utf-8"
            body: bytes = response.read()
    except urllib.error.HTTPError as exc:
        raise TopError(
            f"{url} answered HTTP {exc.code} {exc.reason}: is it a /metrics page?"
        ) from exc
    except urllib.error.URLError as exc:
        raise TopError(f"cannot reach {url}: {_reason(exc.reason)}") from exc
    except (TimeoutError, OSError) as exc:
        raise TopError(f"cannot reach {url}: {_reason(exc)}") from exc
    return body.decode(charset, errors="replace")


def _reason(reason: object) -> str:
    if isinstance(reason, ConnectionRefusedError):
        return "connection refused (nothing listens there)"
    if isinstance(reason, TimeoutError):
        return "timed out"
    if isinstance(reason, OSError) and reason.strerror:
        return reason.strerror
    return str(reason) or type(reason).__name__


def parse(text: str, url: str = "the page", at: float | None = None) -> Scrape:
    """Sum the page's poolwatch series per (pool, instance).

    Raises:
        TopError: the text is not Prometheus exposition, or has no poolwatch metric at all.
    """
    pools: dict[tuple[str, str], PoolFigures] = {}
    families: set[str] = set()
    # Families only poolwatch exports (the http_client_* names are shared with other tools).
    known = {
        spec.exposition_name
        for spec in c.CATALOGUE
        if spec.prometheus_name.startswith("poolwatch_")
    }

    def figures(labels: dict[str, str]) -> PoolFigures | None:
        pool = labels.get("pool_name")
        if pool is None:
            return None
        key = (pool, labels.get("instance", ""))
        found = pools.get(key)
        if found is None:
            found = pools[key] = PoolFigures(pool=key[0], instance=key[1])
        return found

    try:
        for family in text_string_to_metric_families(text):
            if family.name in known:
                families.add(family.name)
            for sample in family.samples:
                if sample.name in _READ:
                    f = figures(sample.labels)
                    if f is not None:
                        _apply(f, sample.name, sample.labels, float(sample.value))
    except Exception as exc:  # the parser raises several types on text it cannot read
        raise TopError(f"{url} does not look like a Prometheus /metrics page: {exc}") from exc
    poolwatch_page = bool(families) or bool(pools)
    if not poolwatch_page:
        raise TopError(
            f"{url} has no poolwatch metrics (no {_POOL_WIDE[0]} or other poolwatch series): "
            f"is it the /metrics of a process that calls poolwatch.prometheus.enable()?"
        )
    return Scrape(url, time.monotonic() if at is None else at, pools, poolwatch_page)


def _apply(f: PoolFigures, name: str, labels: dict[str, str], value: float) -> None:
    """Add one sample to its pool's figures."""
    if name == c.UTILIZATION.prometheus_name:
        f.utilization = max(f.utilization, value)
    elif name == c.CONNECTION_MAX.prometheus_name:
        f.max_connections = (f.max_connections or 0.0) + value
    elif name == c.PENDING_REQUESTS.prometheus_name:
        f.pending_requests += value
    elif name == c.PENDING_MAX_AGE.prometheus_name:
        f.pending_max_age = max(f.pending_max_age, value)
    elif name == c.LEAKED_RESPONSES.prometheus_name:
        f.leaked_responses_total += value
    elif name == c.OPEN_CONNECTIONS.prometheus_name:
        state = labels.get("http_connection_state")
        if state == "active":
            f.active_connections += value
        elif state == "idle":
            f.idle_connections += value
    elif name == c.ACTIVE_REQUESTS.prometheus_name:
        f.active_requests += value
    elif name == c.REQUESTS.prometheus_name:
        f.requests_total += value
        if labels.get("connection_reused") == "true":
            f.reused_requests_total += value
    elif name == c.CONNECTIONS_CREATED.prometheus_name:
        f.connections_created_total += value
    elif name == c.TIMEOUTS.prometheus_name:
        f.pool_timeouts_total += value
    elif name == _QUEUE_BUCKET:
        bound = float(labels.get("le", "+Inf"))
        f.queue_buckets[bound] = f.queue_buckets.get(bound, 0.0) + value


def scrape(url: str, timeout: float = 5.0) -> Scrape:
    text = fetch(url, timeout)
    return parse(text, url)


# --------------------------------------------------------------------------------------------
# Rates between two scrapes
# --------------------------------------------------------------------------------------------


def _delta(now: float, before: float | None) -> float:
    """A counter's increase; after a reset (the process restarted) the new value is it."""
    if before is None or now < before:
        return now
    return now - before


def _interval_p99(now: PoolFigures, before: PoolFigures | None) -> float | None:
    bounds = sorted(now.queue_buckets)
    if not bounds:
        return None
    previous = before.queue_buckets if before is not None else {}
    cumulative = [now.queue_buckets[b] - previous.get(b, 0.0) for b in bounds]
    if any(n < 0 for n in cumulative):  # a reset: use the whole histogram
        cumulative = [now.queue_buckets[b] for b in bounds]
    counts: list[int] = []
    running = 0.0
    for n in cumulative:
        counts.append(max(round(n - running), 0))
        running = n
    finite = tuple(b for b in bounds if b != float("inf"))
    if float("inf") not in now.queue_buckets:
        counts.append(0)
    total = sum(counts)
    if total == 0:
        return None
    return HistogramSnapshot(finite, tuple(counts), total, 0.0).quantile(0.99)


def rows(current: Scrape, previous: Scrape | None) -> list[PoolRow]:
    """One row per pool, rates over the interval since ``previous`` (``None``: no rates)."""
    out: list[PoolRow] = []
    dt = (current.at - previous.at) if previous is not None else 0.0
    for key in sorted(current.pools):
        now = current.pools[key]
        before = previous.pools.get(key) if previous is not None else None
        rated = previous is not None and dt > 0
        d_requests = _delta(now.requests_total, before.requests_total if before else None)
        d_reused = _delta(
            now.reused_requests_total, before.reused_requests_total if before else None
        )
        d_timeouts = _delta(now.pool_timeouts_total, before.pool_timeouts_total if before else None)
        d_leaks = _delta(
            now.leaked_responses_total, before.leaked_responses_total if before else None
        )
        if rated and d_requests > 0:
            reuse: float | None = d_reused / d_requests
        elif now.requests_total > 0:
            reuse = now.reused_requests_total / now.requests_total
        else:
            reuse = None
        out.append(
            PoolRow(
                pool=now.pool,
                instance=now.instance,
                utilization=now.utilization,
                max_connections=None if now.max_connections is None else int(now.max_connections),
                active_connections=int(now.active_connections),
                idle_connections=int(now.idle_connections),
                pending_requests=int(now.pending_requests),
                pending_max_age=now.pending_max_age,
                requests_total=int(now.requests_total),
                requests_per_s=d_requests / dt if rated else None,
                reuse_ratio=reuse,
                queue_p99_s=_interval_p99(now, before) if rated else _interval_p99(now, None),
                pool_timeouts_total=int(now.pool_timeouts_total),
                pool_timeouts_per_s=d_timeouts / dt if rated else None,
                leaked_responses_total=int(now.leaked_responses_total),
                leaked_new=int(d_leaks) if rated and before is not None else 0,
            )
        )
    return out


# --------------------------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------------------------


def _bar(fraction: float, width: int = 10) -> str:
    filled = max(0, min(width, round(fraction * width)))
    return "█" * filled + "░" * (width - filled)


def _rate(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.2f}" if value < 10 else f"{value:.0f}"


def render(
    table_rows: list[PoolRow],
    *,
    url: str,
    interval: float,
    rated: bool,
    error: str | None = None,
    note: str | None = None,
) -> RenderableType:
    instances = any(r.instance for r in table_rows)
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False)
    table.add_column("pool", style="bold", no_wrap=True)
    if instances:
        table.add_column("instance", no_wrap=True)
    table.add_column("utilization", no_wrap=True)
    table.add_column("active/max", justify="right", no_wrap=True)
    table.add_column("idle", justify="right")
    table.add_column("waiting", justify="right")
    table.add_column("oldest wait", justify="right", no_wrap=True)
    table.add_column("req/s", justify="right")
    table.add_column("reuse", justify="right")
    table.add_column("queue p99", justify="right", no_wrap=True)
    table.add_column("timeouts/s", justify="right")
    table.add_column("leaks", justify="right")
    table.add_column("requests", justify="right")
    for r in table_rows:
        style = "red" if r.utilization >= 1.0 else "yellow" if r.utilization >= 0.8 else "green"
        limit = "∞" if r.max_connections is None else str(r.max_connections)
        cells: list[str | Text] = [r.pool]
        if instances:
            cells.append(r.instance or "-")
        cells += [
            Text.assemble((f"{r.utilization:4.0%} ", style), (_bar(r.utilization), style)),
            f"{r.active_connections}/{limit}",
            str(r.idle_connections),
            Text(str(r.pending_requests), style="yellow" if r.pending_requests else ""),
            f"{r.pending_max_age:.2f} s",
            _rate(r.requests_per_s),
            "-" if r.reuse_ratio is None else f"{r.reuse_ratio:.0%}",
            "-" if r.queue_p99_s is None else f"{r.queue_p99_s:.3f} s",
            Text(
                _rate(r.pool_timeouts_per_s),
                style="red" if (r.pool_timeouts_per_s or 0) > 0 else "",
            ),
            Text(
                f"{r.leaked_responses_total}" + (f" (+{r.leaked_new})" if r.leaked_new else ""),
                style="red" if r.leaked_responses_total else "",
            ),
            str(r.requests_total),
        ]
        table.add_row(*cells)
    stamp = datetime.now().strftime("%H:%M:%S")
    what = f"rates over {interval:g} s" if rated else "rates after the next scrape"
    header = Text.assemble(("poolwatch top", "bold"), f"  {url}  ", (f"{stamp}, {what}", "dim"))
    parts: list[RenderableType] = [header, table]
    if not table_rows:
        parts.append(
            Text(note or "poolwatch is enabled there, but no pool is instrumented yet.", "dim")
        )
    if error:
        parts.append(Text(f"last scrape failed: {error} (retrying)", style="red"))
    return Group(*parts)


def run_top(
    url: str,
    *,
    interval: float = 2.0,
    once: bool = False,
    timeout: float = 5.0,
    console: Console | None = None,
) -> int:
    """Scrape ``url`` every ``interval`` seconds and show the table (once: two scrapes, exit).

    Returns the exit code (0, or 130 after Ctrl-C). Raises ``TopError`` when the first scrape
    fails; later failures are shown and retried.
    """
    target = normalize_url(url)
    if console is None:
        console = Console(highlight=False)
        if not console.is_terminal and console.width < 160:
            console = Console(highlight=False, width=160)  # a table, not a wrapped mess
    first = scrape(target, timeout)
    if once:
        time.sleep(interval)
        second = scrape(target, timeout)
        console.print(render(rows(second, first), url=target, interval=interval, rated=True))
        return 0
    previous = first
    try:
        with Live(
            render(rows(first, None), url=target, interval=interval, rated=False),
            console=console,
            auto_refresh=False,
        ) as live:
            while True:
                time.sleep(interval)
                try:
                    current = scrape(target, timeout)
                except TopError as exc:
                    live.update(
                        render(
                            rows(previous, None),
                            url=target,
                            interval=interval,
                            rated=False,
                            error=str(exc),
                        ),
                        refresh=True,
                    )
                    continue
                live.update(
                    render(rows(current, previous), url=target, interval=interval, rated=True),
                    refresh=True,
                )
                previous = current
    except KeyboardInterrupt:
        return 130
