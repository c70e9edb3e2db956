"""The overhead benchmark: every variant, interleaved over rounds, paired against bare.

    python bench/run.py            # the full matrix (5 rounds x C in 1, 32 x 10 variants)
    python bench/run.py --quick    # a smoke run: 2 rounds, small N, short warm-up

Starts ``server.py`` in its own process, then for each round and each concurrency runs every
variant of ``client.py`` as a fresh process, in an order rotated from round to round (the
order of the concurrencies alternates between rounds too). Writes

    bench/results/latest.md     machine facts, one table per concurrency, the targets
    bench/results/latest.jsonl  one JSON line per run (the client's line plus what the runner
                                measured around it), after a first "meta" line

Overheads and ratios are paired: each run is compared with the ``bare`` run of the same
round, concurrency and client family (httpx or httpx2), and the median of those per-round
figures is reported with their range. See bench/README.md for how to read them.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import importlib.metadata
import json
import os
import platform
import resource
import shlex
import socket
import statistics
import subprocess
import sys
import sysconfig
import time
from collections.abc import Iterable, Iterator
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RESULTS = os.path.join(HERE, "results")
sys.path.insert(0, HERE)

from client import all_variants, parse_variant  # noqa: E402

DEFAULT_REQUESTS = {1: 8000, 32: 4000}
QUICK_REQUESTS = 600
PACKAGES = (
    "httpx",
    "httpcore",
    "httpx2",
    "httpcore2",
    "h11",
    "anyio",
    "sniffio",
    "uvloop",
    "opentelemetry-api",
    "opentelemetry-sdk",
    "opentelemetry-instrumentation",
    "opentelemetry-instrumentation-httpx",
    "prometheus_client",
    "wrapt",
)

#: For the duration estimate only: seconds to start a client process (imports), and rough
#: request rates of the slower variants on the reference machine (see perf-baseline.md).
ESTIMATE_STARTUP_S = 1.5
ESTIMATE_REQ_PER_S = {1: 850, 32: 450}

TARGET_PROM_RATIO = 1.03
TARGET_OTEL_SHARE = 0.5


# -- the machine ---------------------------------------------------------------------------


def machine_facts() -> dict[str, Any]:
    model = "?"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    config_args = sysconfig.get_config_var("CONFIG_ARGS") or ""
    commit = _git("rev-parse", "--short", "HEAD")
    dirty = _git("status", "--porcelain", "--", "poolwatch")
    return {
        "cpu_model": model,
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)),
        "kernel": platform.release(),
        "python": sys.version.split()[0],
        "python_impl": platform.python_implementation(),
        "python_pgo": "--enable-optimizations" in config_args,
        "python_lto": "--with-lto" in config_args,
        "packages": versions,
        "poolwatch_commit": commit,
        "poolwatch_dirty": bool(dirty),
        "loadavg_start": _loadavg(),
    }


def _git(*args: str) -> str:
    try:
        return subprocess.run(
            ["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=20, check=False
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def _loadavg() -> str:
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "?"


def _cpu_ticks() -> tuple[int, int, int]:
    """(busy, total, steal) jiffies of the whole machine."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:9]]
    idle, iowait, steal = values[3], values[4], values[7]
    total = sum(values)
    return total - idle - iowait, total, steal


def _process_cpu(pid: int) -> float:
    """CPU seconds (user + system) of a process, from /proc/<pid>/stat."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


# -- the server ----------------------------------------------------------------------------


def pinning(enabled: bool) -> tuple[set[int], set[int]] | None:
    """(server's cores, clients' cores) with ``--pin``: the server on the last usable core, the
    client on the others, so neither process is migrated onto the other's core (and its
    caches) between rounds. ``None`` without ``--pin`` or with fewer than two cores."""
    cores = sorted(os.sched_getaffinity(0))
    if not enabled or len(cores) < 2:
        return None
    return {cores[-1]}, set(cores[:-1])


class Server:
    def __init__(self, cores: set[int] | None = None) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, os.path.join(HERE, "server.py")],
            stdout=subprocess.PIPE,
            text=True,
        )
        if cores is not None:  # before it starts serving: it prints its port once listening
            os.sched_setaffinity(self.proc.pid, cores)
        assert self.proc.stdout is not None
        self.port = int(self.proc.stdout.readline())
        self.info = json.loads(self.proc.stdout.readline())
        self.url = f"http://127.0.0.1:{self.port}/"

    def stats(self) -> dict[str, Any]:
        with socket.create_connection(("127.0.0.1", self.port), timeout=10) as sock:
            sock.sendall(b"GET /__stats HTTP/1.1\r\nhost: bench\r\n\r\n")
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        return json.loads(b"".join(chunks).split(b"\r\n\r\n", 1)[1])  # type: ignore[no-any-return]

    def cpu(self) -> float:
        return _process_cpu(self.proc.pid)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


# -- one run -------------------------------------------------------------------------------


def run_one(
    server: Server,
    variant: str,
    concurrency: int,
    requests: int,
    warmup_requests: int,
    warmup_seconds: float,
    timeout: float,
    cores: set[int] | None = None,
) -> dict[str, Any]:
    cmd = [
        sys.executable,
        os.path.join(HERE, "client.py"),
        "--variant",
        variant,
        "--concurrency",
        str(concurrency),
        "--requests",
        str(requests),
        "--url",
        server.url,
        "--warmup-requests",
        str(warmup_requests),
        "--warmup-seconds",
        str(warmup_seconds),
    ]
    before = server.stats()
    server_cpu0 = server.cpu()
    busy0, total0, steal0 = _cpu_ticks()
    children0 = _children_cpu()
    t0 = time.perf_counter()
    try:
        with subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        ) as proc:
            if cores is not None:  # at once: its threads, started later, inherit it
                os.sched_setaffinity(proc.pid, cores)
            try:
                stdout, stderr = proc.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate()
                raise
            code = proc.returncode
    except subprocess.TimeoutExpired as exc:
        stdout = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        stderr = f"timed out after {timeout} s"
        code = -1
    wall = time.perf_counter() - t0
    children = _children_cpu() - children0
    busy1, total1, steal1 = _cpu_ticks()
    server_cpu = server.cpu() - server_cpu0
    after = server.stats()

    result: dict[str, Any]
    lines = [line for line in stdout.splitlines() if line.startswith("{")]
    if code != 0 or not lines:
        result = {
            "variant": variant,
            "concurrency": concurrency,
            "requests": requests,
            "failed": True,
            "returncode": code,
        }
    else:
        result = json.loads(lines[-1])
    if stderr.strip():
        result["stderr_tail"] = stderr.strip()[-2000:]
    tick = os.sysconf("SC_CLK_TCK")
    served = after["requests"] - before["requests"]
    opened = after["connections"] - before["connections"]
    ticks = max(total1 - total0, 1)
    result["runner"] = {
        "process_wall_s": round(wall, 2),
        "process_cpu_s": round(children, 2),
        "server_requests": served,
        "server_connections": opened,
        "server_cpu_us_per_req": round(server_cpu / served * 1e6, 1) if served else None,
        "steal_pct": round(100 * (steal1 - steal0) / ticks, 2),
        # Cores kept busy by everything else on the machine meanwhile (other people's work).
        "other_load_cores": round(
            max((busy1 - busy0) / tick - children - server_cpu, 0.0) / wall, 2
        ),
    }
    if not result.get("failed"):
        check_against_server(result, served, opened)
    return result


def check_against_server(result: dict[str, Any], served: int, opened: int) -> None:
    """What the server saw must match what the client sent and what poolwatch counted."""
    sanity = result["sanity"]
    problems = sanity["problems"]
    if served != sanity["requests_sent"]:
        problems.append(f"server answered {served} requests, client sent {sanity['requests_sent']}")
    created = sanity.get("pw_connections_created_total")
    if created is not None and created != opened:
        problems.append(
            f"poolwatch counted {created} connections created, server accepted {opened}"
        )
    sanity["server_connections"] = opened
    sanity["ok"] = not problems


# -- the matrix ----------------------------------------------------------------------------


def rotated(items: list[str], round_index: int, rounds: int) -> list[str]:
    """The variants in this round's order: offsets spread evenly over the rounds."""
    offset = (round_index * len(items)) // max(rounds, 1) % len(items)
    return items[offset:] + items[:offset]


def plan(
    variants: list[str], concurrencies: list[int], rounds: int
) -> Iterator[tuple[int, int, int, str]]:
    """(round, position, concurrency, variant) in running order."""
    for r in range(rounds):
        order = concurrencies if r % 2 == 0 else list(reversed(concurrencies))
        for c in order:
            for position, variant in enumerate(rotated(variants, r, rounds)):
                yield r, position, c, variant


# -- the report ----------------------------------------------------------------------------


def _median_range(values: Iterable[float], fmt: str) -> str:
    vals = sorted(v for v in values if v is not None)
    if not vals:
        return "-"
    med = statistics.median(vals)
    if len(vals) == 1:
        return format(med, fmt)
    return f"{format(med, fmt)} [{format(vals[0], fmt)}..{format(vals[-1], fmt)}]"


def _signed(fmt: str) -> str:
    return "+" + fmt if not fmt.startswith("+") else fmt


def paired(
    runs: list[dict[str, Any]], variant: str, c: int, key: str
) -> tuple[list[float], list[float]]:
    """Per round: (variant - bare, variant / bare) of ``key``, same round, C and family."""
    _, family = parse_variant(variant)
    bare_name = "bare" if family == "httpx" else "bare-httpx2"
    by_round: dict[int, dict[str, dict[str, Any]]] = {}
    for run in runs:
        if run.get("failed") or run["concurrency"] != c:
            continue
        by_round.setdefault(run["round"], {})[run["variant"]] = run
    diffs, ratios = [], []
    for r in sorted(by_round):
        row = by_round[r]
        if variant in row and bare_name in row:
            v, b = row[variant][key], row[bare_name][key]
            diffs.append(v - b)
            ratios.append(v / b if b else float("nan"))
    return diffs, ratios


def otel_share(runs: list[dict[str, Any]], c: int, family: str) -> list[float]:
    """Per round: poolwatch-prom-otel's CPU overhead / otel-httpx's, both vs the same bare."""
    suffix = "" if family == "httpx" else "-httpx2"
    pw, _ = paired(runs, "poolwatch-prom-otel" + suffix, c, "cpu_us_per_req")
    ot, _ = paired(runs, "otel-httpx" + suffix, c, "cpu_us_per_req")
    rounds_pw = _rounds_with(runs, c, ["poolwatch-prom-otel" + suffix, "bare" + suffix])
    rounds_ot = _rounds_with(runs, c, ["otel-httpx" + suffix, "bare" + suffix])
    pw_by = dict(zip(rounds_pw, pw, strict=True))
    ot_by = dict(zip(rounds_ot, ot, strict=True))
    return [pw_by[r] / ot_by[r] for r in pw_by if r in ot_by and ot_by[r] > 0]


def _rounds_with(runs: list[dict[str, Any]], c: int, names: list[str]) -> list[int]:
    have: dict[int, set[str]] = {}
    for run in runs:
        if not run.get("failed") and run["concurrency"] == c:
            have.setdefault(run["round"], set()).add(run["variant"])
    return [r for r in sorted(have) if all(n in have[r] for n in names)]


def marginal(runs: list[dict[str, Any]], c: int, family: str) -> list[float]:
    """Per round: CPU of poolwatch-otel-on-otel-httpx minus otel-httpx (poolwatch's share)."""
    suffix = "" if family == "httpx" else "-httpx2"
    a, b = "poolwatch-otel-on-otel-httpx" + suffix, "otel-httpx" + suffix
    by_round: dict[int, dict[str, float]] = {}
    for run in runs:
        if not run.get("failed") and run["concurrency"] == c:
            by_round.setdefault(run["round"], {})[run["variant"]] = run["cpu_us_per_req"]
    return [row[a] - row[b] for _, row in sorted(by_round.items()) if a in row and b in row]


def render(meta: dict[str, Any], runs: list[dict[str, Any]]) -> str:
    m = meta["machine"]
    out: list[str] = []
    out.append("# poolwatch overhead benchmark")
    out.append("")
    if meta["quick"]:
        out.append(
            "> **QUICK SMOKE RUN** (`--quick`): few requests, short warm-up, not steady state. "
            "It checks that the harness works; do not draw conclusions from these figures."
        )
        out.append("")
    out.append(
        f"Run {meta['started']} to {meta['finished']} ({meta['duration_s'] / 60:.1f} min): "
        f"`{meta['command']}`. {meta['rounds']} rounds, C in {meta['concurrencies']}, "
        f"warm-up {meta['warmup_requests']} requests + at least {meta['warmup_seconds']} s "
        "when C > 1, one fresh client process per run."
    )
    out.append("")
    out.append("## Machine")
    out.append("")
    pk = m["packages"]
    out.append("| fact | value |")
    out.append("|---|---|")
    out.append(f"| CPU | {m['cpu_model']}, {m['cores']} cores ({m['cores_usable']} usable) |")
    out.append(f"| kernel | {m['kernel']} |")
    out.append(
        f"| Python | {m['python']} ({m['python_impl']}; PGO {'yes' if m['python_pgo'] else 'no'},"
        f" LTO {'yes' if m['python_lto'] else 'no'}) |"
    )
    out.append(
        f"| event loops | client: asyncio; server: {meta['server']['loop']} "
        "(raw asyncio.Protocol, own process) |"
    )
    pinned = meta.get("pinned")
    out.append(
        "| cores | "
        + (
            f"server pinned to {pinned['server']}, clients to {pinned['client']} (`--pin`) |"
            if pinned
            else "not pinned: the scheduler places both processes |"
        )
    )
    out.append(
        "| sniffio importable | "
        + ("yes" if pk.get("sniffio") else "**NO: bare httpx pays ~+280 µs/request**")
        + " |"
    )
    out.append(
        "| packages | "
        + ", ".join(f"{k} {v}" for k, v in pk.items() if v is not None)
        + (
            " (not installed: " + ", ".join(k for k, v in pk.items() if v is None) + ")"
            if any(v is None for v in pk.values())
            else ""
        )
        + " |"
    )
    out.append(
        f"| poolwatch | commit {m['poolwatch_commit']}"
        + (" + uncommitted changes under poolwatch/" if m["poolwatch_dirty"] else "")
        + " |"
    )
    out.append(f"| load average | start {m['loadavg_start']}, end {meta['loadavg_end']} |")
    out.append("")

    for c in meta["concurrencies"]:
        n = meta["requests"][str(c)]
        out.append(f"## C = {c} (N = {n:,} timed requests per run)")
        out.append("")
        out.append(
            "| variant | req/s | client CPU µs/req | overhead µs/req vs bare (paired) "
            "| CPU ratio vs bare (paired) | drift | other threads µs/req | export µs/run "
            "| pool start→end | runs ok |"
        )
        out.append("|---|---|---|---|---|---|---|---|---|---|")
        for variant in meta["variants"]:
            rs = [r for r in runs if r["variant"] == variant and r["concurrency"] == c]
            good = [r for r in rs if not r.get("failed")]
            if not rs:
                continue
            diffs, ratios = paired(runs, variant, c, "cpu_us_per_req")
            is_bare = parse_variant(variant)[0] == "bare"
            ok = sum(1 for r in good if r["sanity"]["ok"])
            pools = sorted({f"{r['pool_start']}→{r['pool_end']}" for r in good})
            out.append(
                "| "
                + " | ".join(
                    [
                        variant,
                        _median_range((r["req_per_s"] for r in good), ",.0f"),
                        _median_range((r["cpu_us_per_req"] for r in good), ".0f"),
                        "0 (reference)" if is_bare else _median_range(diffs, "+.0f"),
                        "1.00" if is_bare else _median_range(ratios, ".3f"),
                        _median_range((r["drift"] for r in good), ".2f"),
                        _median_range((r["other_threads_cpu_us_per_req"] for r in good), ".1f"),
                        _median_range((r["export_cpu_us"] for r in good), ",.0f"),
                        ", ".join(pools[:4]) + (" …" if len(pools) > 4 else ""),
                        f"{ok}/{len(rs)}" + ("" if ok == len(rs) else " **!**"),
                    ]
                )
                + " |"
            )
        env = [r["runner"] for r in runs if r["concurrency"] == c and "runner" in r]
        out.append("")
        out.append(
            f"Environment during these runs: other load on the machine "
            f"{_median_range((e['other_load_cores'] for e in env), '.2f')} cores, "
            f"steal {_median_range((e['steal_pct'] for e in env), '.1f')} %, "
            f"server CPU {_median_range((e['server_cpu_us_per_req'] for e in env), '.0f')} "
            "µs per request (whole run incl. warm-up)."
        )
        out.append("")

    out.append("## Targets")
    out.append("")
    out.append(
        "Verdicts are on the median of the paired per-round figures; "
        '"every round" says whether the whole range meets it too.'
    )
    out.append("")
    out.append("| target | family | C | measured: median [min..max] | verdict | every round |")
    out.append("|---|---|---|---|---|---|")
    families = sorted({parse_variant(v)[1] for v in meta["variants"]})
    for family in families:
        suffix = "" if family == "httpx" else "-httpx2"
        for c in meta["concurrencies"]:
            name = "poolwatch-prom" + suffix
            if name in meta["variants"]:
                _, ratios = paired(runs, name, c, "cpu_us_per_req")
                out.append(
                    _target_row(
                        f"poolwatch-prom CPU ratio ≤ {TARGET_PROM_RATIO}",
                        family,
                        c,
                        ratios,
                        TARGET_PROM_RATIO,
                        ".3f",
                    )
                )
        for c in meta["concurrencies"]:
            if {"poolwatch-prom-otel" + suffix, "otel-httpx" + suffix} <= set(meta["variants"]):
                out.append(
                    _target_row(
                        "poolwatch-prom-otel overhead ≤ ½ otel-httpx overhead (quotient)",
                        family,
                        c,
                        otel_share(runs, c, family),
                        TARGET_OTEL_SHARE,
                        ".2f",
                    )
                )
    out.append("")
    out.append(
        "Not a target, for context: what poolwatch (instrument + OTel export) adds on top of "
        "an already instrumented client, paired per round "
        "(`poolwatch-otel-on-otel-httpx` minus `otel-httpx`), in µs/request: "
        + "; ".join(
            f"{f} C={c}: {_median_range(marginal(runs, c, f), '+.0f')}"
            for f in families
            for c in meta["concurrencies"]
        )
        + "."
    )
    out.append("")

    bad = [r for r in runs if r.get("failed") or not r["sanity"]["ok"]]
    out.append("## Sanity")
    out.append("")
    if not bad:
        out.append(
            f"All {len(runs)} runs passed their sanity checks: no failed request; the server "
            "answered exactly the requests each client sent; poolwatch's snapshot, Prometheus "
            "and OTel exports counted every request once with nothing left active, pending or "
            "leaked; poolwatch's connections-created count matched the connections the server "
            "accepted; every span was exported, by the instrumentation that should make it."
        )
    else:
        out.append(f"**{len(bad)} of {len(runs)} runs failed a check:**")
        out.append("")
        for r in bad:
            why = (
                f"process failed (exit {r.get('returncode')}): {r.get('stderr_tail', '')[-300:]}"
                if r.get("failed")
                else "; ".join(r["sanity"]["problems"])
            )
            out.append(f"- round {r['round']}, C={r['concurrency']}, {r['variant']}: {why}")
    logs: dict[str, int] = {}
    for r in runs:
        for level, count in (r.get("sanity", {}).get("pw_log_records") or {}).items():
            logs[level] = logs.get(level, 0) + count
    if logs:
        out.append("")
        out.append(
            "poolwatch log records over all runs: "
            + ", ".join(f"{k} {v}" for k, v in sorted(logs.items()))
            + " (saturation warnings are expected: every run drives its pool at its limit)."
        )
    out.append("")
    return "\n".join(out)


def _target_row(
    label: str, family: str, c: int, values: list[float], limit: float, fmt: str
) -> str:
    if not values:
        return f"| {label} | {family} | {c} | - | no data | - |"
    med = statistics.median(values)
    verdict = "met" if med <= limit else "**not met**"
    every = "yes" if max(values) <= limit else "no"
    return f"| {label} | {family} | {c} | {_median_range(values, fmt)} | {verdict} | {every} |"


# -- main ----------------------------------------------------------------------------------


def _micro_section(path: str) -> str:
    """The report's micro.py section (its latest blocks stay when the matrix is re-run)."""
    try:
        with open(path) as f:
            text = f.read()
    except FileNotFoundError:
        return ""
    start, end = text.find(_MICRO_START), text.find(_MICRO_END)
    if start < 0 or end < start:
        return ""
    return text[start : end + len(_MICRO_END)] + "\n"


_MICRO_START = "<!-- micro.py: start -->"
_MICRO_END = "<!-- micro.py: end -->"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 rounds, small N")
    parser.add_argument("--rounds", type=int, default=None, help="default 5 (2 with --quick)")
    parser.add_argument("--concurrency", default="1,32", help="comma-separated, default 1,32")
    parser.add_argument(
        "--requests",
        type=int,
        default=None,
        help="timed requests per run (default 8000 at C=1, 4000 otherwise; 600 with --quick)",
    )
    parser.add_argument(
        "--variants",
        default=None,
        help="comma-separated subset (default all): " + ", ".join(all_variants()),
    )
    parser.add_argument("--warmup-requests", type=int, default=None, help="default 1000")
    parser.add_argument(
        "--warmup-seconds", type=float, default=None, help="minimum at C>1, default 6"
    )
    parser.add_argument("--timeout", type=float, default=900, help="per client process, s")
    parser.add_argument(
        "--pin",
        action="store_true",
        help="pin the server to the last core and each client to the others",
    )
    parser.add_argument(
        "--no-micro",
        action="store_true",
        help="skip bench/micro.py, which a full run (not --quick) runs after the matrix",
    )
    parser.add_argument(
        "--micro-requests",
        type=int,
        default=1_000_000,
        help="requests of micro.py's memory part (default 1,000,000)",
    )
    parser.add_argument(
        "--output", default=os.path.join(RESULTS, "latest"), help="path without extension"
    )
    args = parser.parse_args()

    rounds = args.rounds or (2 if args.quick else 5)
    concurrencies = [int(c) for c in args.concurrency.split(",") if c.strip()]
    variants = args.variants.split(",") if args.variants else all_variants()
    for v in variants:
        parse_variant(v)
    warm_requests = args.warmup_requests or (300 if args.quick else 1000)
    warm_seconds = (
        args.warmup_seconds if args.warmup_seconds is not None else (1.5 if args.quick else 6.0)
    )
    requests = {
        c: args.requests or (QUICK_REQUESTS if args.quick else DEFAULT_REQUESTS.get(c, 4000))
        for c in concurrencies
    }

    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    started = dt.datetime.now().astimezone()
    t_start = time.perf_counter()
    meta: dict[str, Any] = {
        "type": "meta",
        "command": shlex.join(["python", "bench/run.py", *sys.argv[1:]]),
        "quick": args.quick,
        "started": started.strftime("%Y-%m-%d %H:%M %Z"),
        "rounds": rounds,
        "concurrencies": concurrencies,
        "requests": {str(c): n for c, n in requests.items()},
        "variants": variants,
        "warmup_requests": warm_requests,
        "warmup_seconds": warm_seconds,
        "machine": machine_facts(),
        "pinned": None,
    }
    pins = pinning(args.pin)
    if pins is not None:
        meta["pinned"] = {"server": sorted(pins[0]), "client": sorted(pins[1])}
    if not meta["machine"]["packages"].get("sniffio"):
        print(
            "WARNING: sniffio is not importable: bare httpx pays ~+280 µs/request "
            "(see the perf baseline); ratios will not compare with a sniffio environment.",
            file=sys.stderr,
        )

    estimate = sum(
        ESTIMATE_STARTUP_S
        + (warm_seconds if c > 1 else warm_requests / ESTIMATE_REQ_PER_S[1])
        + requests[c] / ESTIMATE_REQ_PER_S.get(c, ESTIMATE_REQ_PER_S[32])
        for _, _, c, _ in plan(variants, concurrencies, rounds)
    )
    print(
        f"run.py: {rounds * len(concurrencies) * len(variants)} runs, about "
        f"{estimate / 60:.0f} min on a quiet machine (more when it is busy)",
        file=sys.stderr,
    )

    server = Server(None if pins is None else pins[0])
    client_cores = None if pins is None else pins[1]
    meta["server"] = server.info
    runs: list[dict[str, Any]] = []
    total = rounds * len(concurrencies) * len(variants)
    jsonl_path = args.output + ".jsonl"
    try:
        with open(jsonl_path, "w") as jsonl:
            jsonl.write(json.dumps(meta) + "\n")
            # One untimed run first: disk caches, .pyc files, the server's first connections.
            run_one(server, variants[0], 1, 200, 100, 0.0, args.timeout, client_cores)
            for i, (r, position, c, variant) in enumerate(plan(variants, concurrencies, rounds)):
                result = run_one(
                    server,
                    variant,
                    c,
                    requests[c],
                    warm_requests,
                    warm_seconds,
                    args.timeout,
                    client_cores,
                )
                result["round"] = r
                result["position"] = position
                runs.append(result)
                jsonl.write(json.dumps(result) + "\n")
                jsonl.flush()
                status = (
                    "FAILED"
                    if result.get("failed")
                    else f"{result['cpu_us_per_req']:8.0f} µs/req {result['req_per_s']:7.0f} req/s"
                    + (
                        ""
                        if result["sanity"]["ok"]
                        else "  SANITY: " + "; ".join(result["sanity"]["problems"])
                    )
                )
                elapsed = time.perf_counter() - t_start
                print(
                    f"[{i + 1:3d}/{total}] {elapsed / 60:5.1f} min  round {r} C={c:<3d} "
                    f"{variant:<36s} {status}",
                    file=sys.stderr,
                    flush=True,
                )
    finally:
        server.stop()

    meta["finished"] = dt.datetime.now().astimezone().strftime("%H:%M %Z")
    meta["duration_s"] = time.perf_counter() - t_start
    meta["loadavg_end"] = _loadavg()
    markdown = render(meta, runs)
    kept = _micro_section(args.output + ".md")
    with open(args.output + ".md", "w") as f:
        f.write(markdown.rstrip("\n") + "\n\n" + kept if kept else markdown)
    print(markdown)
    print(f"wrote {args.output}.md and {jsonl_path}", file=sys.stderr)
    if not args.quick and not args.no_micro:
        micro = [
            sys.executable,
            os.path.join(HERE, "micro.py"),
            "--requests",
            str(args.micro_requests),
            "--output",
            args.output + ".md",
        ]
        print(f"run.py: now {shlex.join(micro)}", file=sys.stderr, flush=True)
        sys.exit(subprocess.run(micro, check=False).returncode)


if __name__ == "__main__":
    main()
