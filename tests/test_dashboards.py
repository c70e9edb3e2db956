"""The Grafana dashboard and the Prometheus alert rules in dashboards/ are sound.

Static checks against the real tools where they exist: Grafana's own JSON Schema (generated from
npm ``@grafana/schema``, committed in dashboards/schema/), ``promtool`` for parsing, linting and
unit-testing the rules, and poolwatch's metric catalogue for every name and label a query uses.

These tests need ``promtool`` (Debian: ``apt-get install -y --no-install-recommends
prometheus``). Without it they fail, on purpose: skipping would let broken rules ship.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from poolwatch._catalogue import CATALOGUE, MetricSpec

ROOT = Path(__file__).resolve().parents[1]
DASHBOARDS = ROOT / "dashboards"
DASHBOARD_JSON = DASHBOARDS / "poolwatch.json"
ALERTS_YML = DASHBOARDS / "alerts.yml"
README = DASHBOARDS / "README.md"
RULES_TEST = DASHBOARDS / "tests" / "rules_test.yml"
SCHEMA = DASHBOARDS / "schema" / "dashboard.schema.json"
BUILD_SCRIPT = DASHBOARDS / "build_dashboard.py"

RUNBOOK_BASE = "https://github.com/poolwatch/poolwatch/blob/main/dashboards/README.md#"
INSTALL_HINT = (
    "promtool is not installed, and these tests need it to check the PromQL of the dashboard "
    "and the alert rules. On Debian/Ubuntu: "
    "apt-get update && apt-get install -y --no-install-recommends prometheus"
)

#: Labels Prometheus itself attaches to every scraped series.
TARGET_LABELS = frozenset({"instance", "job"})
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")
BY_CATALOGUE_NAME = {spec.prometheus_name: spec for spec in CATALOGUE}

# A metric name as the brief defines it: an identifier starting with one of poolwatch's
# prefixes, followed by a selector, a range, a closing parenthesis, a comma, whitespace or the end.
METRIC_RE = re.compile(r"\b((?:http_client_|poolwatch_)[A-Za-z0-9_]*)(?=[\s{\[),]|$)")
STRING_RE = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'')
SELECTOR_RE = re.compile(
    r"\b((?:http_client_|poolwatch_)[A-Za-z0-9_]*)\s*\{((?:[^}\"]|\"(?:[^\"\\]|\\.)*\")*)\}"
)
MATCHER_RE = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)\s*\"(?:[^\"\\]|\\.)*\"")
GROUPING_RE = re.compile(r"\b(by|without)\s*\(([^)]*)\)")
MATCHING_RE = re.compile(r"\b(on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
GRAFANA_RANGES = ("$__rate_interval", "${__rate_interval}", "$__interval", "${__interval}",
                  "$__range", "${__range}")  # fmt: skip


# --------------------------------------------------------------------------- loading


@cache
def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD_JSON.read_text(encoding="utf-8"))
    return loaded


@cache
def alert_rules() -> tuple[dict[str, Any], ...]:
    doc = yaml.safe_load(ALERTS_YML.read_text(encoding="utf-8"))
    return tuple(rule for group in doc["groups"] for rule in group["rules"] if "alert" in rule)


def all_panels(panels: list[dict[str, Any]] | None = None) -> Iterator[dict[str, Any]]:
    """Every panel, including those nested in (collapsed) rows."""
    for panel in dashboard()["panels"] if panels is None else panels:
        yield panel
        yield from all_panels(panel.get("panels", []))


def data_panels() -> list[dict[str, Any]]:
    return [p for p in all_panels() if p["type"] != "row"]


@dataclass(frozen=True)
class Query:
    where: str  # human-readable origin, for failure messages
    record: str  # a valid recording-rule name for the promtool parse check
    expr: str
    legend: str = ""


def dashboard_queries() -> list[Query]:
    return [
        Query(
            f"panel {panel['id']} {panel['title']!r} query {target['refId']}",
            f"dashboard:panel_{panel['id']}_{target['refId']}",
            target["expr"],
            target.get("legendFormat", ""),
        )
        for panel in data_panels()
        for target in panel.get("targets", [])
    ]


def alert_queries() -> list[Query]:
    return [Query(f"alert {r['alert']}", f"alert:{r['alert']}", r["expr"]) for r in alert_rules()]


def all_queries() -> list[Query]:
    return dashboard_queries() + alert_queries()


# --------------------------------------------------------------------------- promtool


def promtool(*args: str | Path) -> subprocess.CompletedProcess[str]:
    """Run promtool; fail the calling test (never skip it) if promtool is missing."""
    exe = shutil.which("promtool")
    if exe is None:
        pytest.fail(INSTALL_HINT, pytrace=False)
    return subprocess.run(
        [exe, *map(str, args)], capture_output=True, text=True, timeout=120, check=False
    )


def assert_promtool_ok(result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode == 0, (
        f"{' '.join(result.args)} exited {result.returncode}\n"
        f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    )


def for_promtool(expr: str) -> str:
    """The expression as Prometheus sees it once Grafana has expanded its range variables."""
    for var in GRAFANA_RANGES:
        expr = expr.replace(var, "5m")
    return expr


# --------------------------------------------------------------------------- PromQL name checks


def without_strings(expr: str) -> str:
    return STRING_RE.sub('""', expr)


def resolve(name: str) -> tuple[MetricSpec, str] | None:
    """The catalogue entry a series name belongs to, and its histogram suffix (or "")."""
    if name in BY_CATALOGUE_NAME:
        return BY_CATALOGUE_NAME[name], ""
    for suffix in HISTOGRAM_SUFFIXES:
        base = name.removesuffix(suffix)
        if base != name and base in BY_CATALOGUE_NAME:
            spec = BY_CATALOGUE_NAME[base]
            if spec.kind == "histogram":
                return spec, suffix
    return None


def metric_names(expr: str) -> list[str]:
    return METRIC_RE.findall(without_strings(expr))


def allowed_labels(name: str) -> frozenset[str]:
    resolved = resolve(name)
    if resolved is None:
        return frozenset()
    spec, suffix = resolved
    extra = {"le"} if suffix == "_bucket" else set()
    return frozenset(spec.labels) | TARGET_LABELS | extra


def balanced(expr: str, start: int, step: int) -> str:
    """The parenthesised group that opens (step 1) or closes (step -1) at ``start``."""
    opening, closing = ("(", ")") if step == 1 else (")", "(")
    depth = 0
    i = start
    while 0 <= i < len(expr):
        if expr[i] == opening:
            depth += 1
        elif expr[i] == closing:
            depth -= 1
            if depth == 0:
                lo, hi = sorted((start, i))
                return expr[lo : hi + 1]
        i += step
    raise AssertionError(f"unbalanced parentheses in {expr!r}")


def grouping_clauses(expr: str) -> list[tuple[list[str], str]]:
    """Each ``by``/``without`` label list with the expression it aggregates."""
    bare = without_strings(expr)
    clauses = []
    for match in GROUPING_RE.finditer(bare):
        labels = [label.strip() for label in match.group(2).split(",") if label.strip()]
        after = bare[match.end() :].lstrip()
        if after.startswith("("):  # sum by (x) (expr)
            body = balanced(bare, bare.index("(", match.end()), 1)
        else:  # sum (expr) by (x)
            before = bare[: match.start()].rstrip()
            assert before.endswith(")"), f"cannot find what {match.group(0)!r} aggregates"
            body = balanced(bare, len(before) - 1, -1)
        clauses.append((labels, body))
    return clauses


def name_problems(query: Query) -> list[str]:
    """Metric names and labels that the catalogue does not have, in one query."""
    problems = []
    names = metric_names(query.expr)
    if not names:
        problems.append(f"{query.where}: no poolwatch metric found in {query.expr!r}")
    for name in names:
        if resolve(name) is None:
            problems.append(f"{query.where}: {name} is not in poolwatch._catalogue.CATALOGUE")
    for selector in SELECTOR_RE.finditer(query.expr):
        name = selector.group(1)
        for label in MATCHER_RE.findall(selector.group(2)):
            if resolve(name) is not None and label not in allowed_labels(name):
                problems.append(f"{query.where}: {name} has no label {label!r}")
    for labels, body in grouping_clauses(query.expr):
        inner = metric_names(body)
        carried = frozenset.intersection(*map(allowed_labels, inner)) if inner else frozenset()
        problems.extend(
            f"{query.where}: not every metric in {body!r} carries {label!r} "
            f"(common labels: {sorted(carried)})"
            for label in labels
            if label not in carried
        )
    everywhere = frozenset().union(*map(allowed_labels, names))
    for match in MATCHING_RE.finditer(without_strings(query.expr)):
        for label in (x.strip() for x in match.group(2).split(",") if x.strip()):
            if label not in everywhere:
                problems.append(f"{query.where}: {match.group(1)}({label}) is no metric's label")
    return problems


def kept_labels(expr: str) -> set[str]:
    """Labels an aggregated query can still show: those of its ``by`` clauses."""
    kept: set[str] = set()
    for match in GROUPING_RE.finditer(without_strings(expr)):
        if match.group(1) == "by":
            kept.update(x.strip() for x in match.group(2).split(",") if x.strip())
    return kept


# --------------------------------------------------------------------------- README anchors


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading."""
    slug = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return slug.replace(" ", "-")


def readme_headings(level: int) -> list[str]:
    marker = "#" * level + " "
    lines = README.read_text(encoding="utf-8").splitlines()
    return [line[len(marker) :].strip() for line in lines if line.startswith(marker)]


def runbook_headings() -> list[str]:
    """Level-3 headings inside the README's '## Runbooks' section."""
    headings: list[str] = []
    inside = False
    for line in README.read_text(encoding="utf-8").splitlines():
        if line.startswith("## "):
            inside = line[3:].strip() == "Runbooks"
        elif inside and line.startswith("### "):
            headings.append(line[4:].strip())
    return headings


def deepest(error: jsonschema.ValidationError) -> jsonschema.ValidationError:
    """The most specific error under an anyOf/oneOf (panels are Panel | RowPanel)."""
    while error.context:
        error = max(error.context, key=lambda e: len(e.absolute_path))
    return error


def schema_errors(document: dict[str, Any]) -> list[str]:
    schema = json.loads(SCHEMA.read_text(encoding="utf-8"))
    validator = jsonschema.Draft7Validator(schema)
    out = []
    for error in validator.iter_errors(document):
        leaf = deepest(error)
        path = "/".join(map(str, leaf.absolute_path)) or "<root>"
        out.append(f"{path} -> {leaf.message}")
    return out


# =========================================================================== the dashboard


def test_the_committed_dashboard_is_what_build_dashboard_py_writes() -> None:
    spec = importlib.util.spec_from_file_location("build_dashboard", BUILD_SCRIPT)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert DASHBOARD_JSON.read_text(encoding="utf-8") == module.render(), (
        "dashboards/poolwatch.json is stale: run python dashboards/build_dashboard.py"
    )


def test_the_dashboard_validates_against_grafanas_schema() -> None:
    errors = schema_errors(dashboard())
    assert not errors, "poolwatch.json does not match Grafana's schema:\n" + "\n".join(errors)


def test_the_schema_check_rejects_a_misspelt_key_and_a_wrong_type() -> None:
    broken = json.loads(json.dumps(dashboard()))
    broken["titel"] = "typo"
    broken["panels"][1]["gridPos"]["w"] = "wide"
    errors = schema_errors(broken)
    assert any("'titel' was unexpected" in e for e in errors), errors
    assert any(e.startswith("panels/1/gridPos/w") for e in errors), errors


def test_the_dashboard_has_a_datasource_variable_and_multi_select_pool_and_instance() -> None:
    variables = {v["name"]: v for v in dashboard()["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for name in ("pool_name", "instance"):
        var = variables[name]
        assert var["type"] == "query"
        assert var["multi"] is True
        assert var["includeAll"] is True
        assert var["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        match = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", var["query"])
        assert match, var["query"]
        assert match.group(2) == name
        problems = name_problems(Query(f"variable {name}", "", match.group(1)))
        assert not problems, problems
        assert name in allowed_labels(metric_names(match.group(1))[0])


def test_every_panel_has_a_description_and_reads_from_the_datasource_variable() -> None:
    for panel in data_panels():
        assert len(panel.get("description", "")) >= 80, f"{panel['title']!r}: describe it"
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert panel["targets"], f"{panel['title']!r} has no query"
        for target in panel["targets"]:
            assert target["datasource"] == panel["datasource"]
            assert target["refId"]


def test_every_query_filters_on_pool_and_instance_and_rates_use_rate_interval() -> None:
    for query in dashboard_queries():
        for selector in SELECTOR_RE.finditer(query.expr):
            assert 'pool_name=~"$pool_name"' in selector.group(2), query.where
            assert 'instance=~"$instance"' in selector.group(2), query.where
        bare_names = re.findall(
            r"\b((?:http_client_|poolwatch_)\w*)(?!\w)(?!\s*\{)", without_strings(query.expr)
        )
        assert not bare_names, f"{query.where}: unfiltered {bare_names}"
        for function, window in re.findall(r"\b(\w+)\([^()\[]*\[([^\]]+)\]", query.expr):
            expected = "$__range" if function == "increase" else "$__rate_interval"
            assert window == expected, f"{query.where}: {function}(...[{window}])"


def test_panel_ids_are_unique_and_panels_do_not_overlap() -> None:
    panels = list(all_panels())
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    cells: dict[tuple[int, int], str] = {}
    for panel in panels:
        pos = panel["gridPos"]
        assert pos["x"] + pos["w"] <= 24, panel["title"]
        for x in range(pos["x"], pos["x"] + pos["w"]):
            for y in range(pos["y"], pos["y"] + pos["h"]):
                assert (x, y) not in cells, f"{panel['title']!r} overlaps {cells[(x, y)]!r}"
                cells[(x, y)] = panel["title"]


def test_the_dashboard_has_the_panels_operators_read_first() -> None:
    used = {name for query in dashboard_queries() for name in metric_names(query.expr)}
    expected = {
        "poolwatch_pool_utilization_ratio",
        "poolwatch_pool_connection_max",
        "http_client_open_connections",
        "poolwatch_pool_pending_requests",
        "poolwatch_pool_pending_requests_max_age_seconds",
        "http_client_request_time_in_queue_seconds_bucket",
        "poolwatch_pool_timeouts_total",
        "poolwatch_pool_requests_total",
        "poolwatch_pool_connections_created_total",
        "http_client_connection_duration_seconds_bucket",
        "poolwatch_pool_leaked_responses_total",
        "poolwatch_connection_connect_time_seconds_bucket",
        "poolwatch_connection_tls_time_seconds_bucket",
        "poolwatch_request_time_to_first_byte_seconds_bucket",
        "poolwatch_request_duration_seconds_bucket",
        "poolwatch_pool_request_errors_total",
    }
    assert expected <= used, f"no panel shows {sorted(expected - used)}"
    queue_quantiles = {
        float(q)
        for query in dashboard_queries()
        for q in re.findall(
            r"histogram_quantile\(([\d.]+), [^;]*http_client_request_time_in_queue", query.expr
        )
    }
    assert {0.5, 0.95, 0.99} <= queue_quantiles


# =========================================================================== PromQL, both files


def test_every_dashboard_and_alert_expression_parses_with_promtool(tmp_path: Path) -> None:
    queries = all_queries()
    rules = {
        "groups": [
            {
                "name": "parse-check",
                "rules": [{"record": q.record, "expr": for_promtool(q.expr)} for q in queries],
            }
        ]
    }
    path = tmp_path / "exprs.yml"
    path.write_text(yaml.safe_dump(rules, sort_keys=False), encoding="utf-8")
    result = promtool("check", "rules", path)
    assert_promtool_ok(result)
    assert f"SUCCESS: {len(queries)} rules found" in result.stdout


#: Values for the labels whose values the queries match on; every other label gets one value.
LABEL_VALUES = {
    "http_connection_state": ("active", "idle"),
    "connection_reused": ("true", "false"),
    "error_type": ("PoolTimeout", "ConnectError"),
    "network_protocol_version": ("1.1",),
}


def synthetic_series() -> list[dict[str, str]]:
    """One pool's worth of series for every catalogue metric, 30 minutes at 1 per minute."""
    out = []
    for spec in CATALOGUE:
        variants: list[dict[str, str]] = [{"job": "app", "instance": "a:8000"}]
        for label in spec.labels:
            values = LABEL_VALUES.get(label, (f"{label}-1",))
            variants = [{**v, label: value} for v in variants for value in values]
        for labels in variants:
            if spec.kind == "histogram":
                cumulative = (("0.1", 5), ("1", 8), ("+Inf", 10))
                rows = [(f"{spec.prometheus_name}_bucket", {**labels, "le": le}, f"0+{n}x30")
                        for le, n in cumulative]  # fmt: skip
                rows += [(f"{spec.prometheus_name}_sum", labels, "0+7x30"),
                         (f"{spec.prometheus_name}_count", labels, "0+10x30")]  # fmt: skip
            elif spec.kind == "counter":
                rows = [(spec.prometheus_name, labels, "0+6x30")]
            else:
                rows = [(spec.prometheus_name, labels, "0.5x30")]
            for name, row_labels, values in rows:
                selector = ", ".join(f'{k}="{v}"' for k, v in row_labels.items())
                out.append({"series": f"{name}{{{selector}}}", "values": values})
    return out


def test_every_dashboard_query_returns_data_for_series_shaped_like_the_catalogue(
    tmp_path: Path,
) -> None:
    """Catches queries that parse but match nothing (a wrong label value, an empty join)."""
    checks = []
    for query in dashboard_queries():
        expr = for_promtool(query.expr).replace("$pool_name", ".*").replace("$instance", ".*")
        # 1 if the query returns at least one number (NaN excluded), nothing otherwise.
        checks.append(
            {
                "expr": f"count(({expr}) >= 0) > bool 0",
                "eval_time": "20m",
                "exp_samples": [{"labels": "{}", "value": 1}],
            }
        )
    doc = {
        "rule_files": [],
        "evaluation_interval": "1m",
        "tests": [
            {"interval": "1m", "input_series": synthetic_series(), "promql_expr_test": checks}
        ],
    }
    path = tmp_path / "dashboard_eval_test.yml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
    assert_promtool_ok(promtool("test", "rules", path))


def test_every_metric_a_panel_or_alert_uses_is_in_the_catalogue() -> None:
    problems = [
        p
        for query in all_queries()
        for p in name_problems(query)
        if "not in poolwatch._catalogue" in p or "no poolwatch metric" in p
    ]
    assert not problems, "\n".join(problems)


def test_every_label_a_panel_or_alert_uses_is_one_its_metric_carries() -> None:
    problems = [p for query in all_queries() for p in name_problems(query)]
    assert not problems, "\n".join(problems)


def test_the_name_check_catches_unknown_metrics_labels_and_lost_labels() -> None:
    bad = Query(
        "self-test",
        "",
        'sum by (pool_name, server_address) (poolwatch_pool_pending_requests{pool="x"})'
        " / on (pool_nmae) poolwatch_pool_utilisation_ratio"
        " + sum by (error_type) (rate(http_client_request_time_in_queue_seconds_sum[5m]))",
    )
    problems = "\n".join(name_problems(bad))
    assert "poolwatch_pool_utilisation_ratio is not in" in problems
    assert "has no label 'pool'" in problems
    assert "carries 'server_address'" in problems
    assert "carries 'error_type'" in problems
    assert "on(pool_nmae)" in problems
    assert resolve("poolwatch_pool_pending_requests_bucket") is None  # a gauge has no buckets


def test_legends_and_alert_annotations_name_only_labels_the_query_keeps() -> None:
    for query in dashboard_queries():
        shown = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", query.legend))
        assert shown <= kept_labels(query.expr), f"{query.where}: legend {query.legend!r}"
    for rule in alert_rules():
        text = " ".join(rule["annotations"].values())
        shown = set(re.findall(r"\$labels\.(\w+)", text))
        kept = kept_labels(rule["expr"]) | set(rule.get("labels", {}))
        assert shown <= kept, f"{rule['alert']}: annotations use {sorted(shown - kept)}"


# =========================================================================== the alert rules


def test_alerts_yml_passes_promtool_check_rules_with_every_lint() -> None:
    result = promtool("check", "rules", "--lint=all", "--lint-fatal", ALERTS_YML)
    assert_promtool_ok(result)
    assert f"SUCCESS: {len(alert_rules())} rules found" in result.stdout


def test_the_alert_unit_tests_pass_with_promtool() -> None:
    assert_promtool_ok(promtool("test", "rules", RULES_TEST))


def test_the_rules_include_the_pool_exhaustion_alerts() -> None:
    names = {rule["alert"] for rule in alert_rules()}
    assert {
        "PoolwatchPoolNearlySaturated",
        "PoolwatchPoolSaturated",
        "PoolwatchRequestWaitingTooLong",
        "PoolwatchRequestsQueuedContinuously",
        "PoolwatchQueueWaitHigh",
        "PoolwatchPoolTimeouts",
        "PoolwatchLeakedResponses",
        "PoolwatchLowConnectionReuse",
    } <= names


def test_alerts_are_pascal_case_with_the_poolwatch_prefix_and_carry_a_severity() -> None:
    names = [rule["alert"] for rule in alert_rules()]
    assert len(names) == len(set(names))
    for rule in alert_rules():
        assert re.fullmatch(r"Poolwatch(?:[A-Z][a-z0-9]*)+", rule["alert"]), rule["alert"]
        assert rule.get("labels", {}).get("severity") in {"warning", "critical"}, rule["alert"]


def test_every_alert_has_a_summary_a_description_and_a_runbook_in_the_readme() -> None:
    anchors = {github_anchor(h) for level in (1, 2, 3, 4) for h in readme_headings(level)}
    for rule in alert_rules():
        notes = rule.get("annotations", {})
        name = rule["alert"]
        assert notes.get("summary"), f"{name} has no summary"
        assert notes.get("description"), f"{name} has no description"
        assert "$value" in notes["description"], f"{name}: give the figure in the description"
        url = notes.get("runbook_url", "")
        assert url.startswith(RUNBOOK_BASE), f"{name}: runbook_url {url!r}"
        anchor = url.removeprefix(RUNBOOK_BASE)
        assert anchor in anchors, f"{name}: README.md has no heading with anchor #{anchor}"


def test_the_readme_has_one_runbook_section_per_alert() -> None:
    headings = runbook_headings()
    names = [rule["alert"] for rule in alert_rules()]
    assert sorted(headings) == sorted(names)
    for rule in alert_rules():
        assert rule["annotations"]["runbook_url"].endswith("#" + github_anchor(rule["alert"]))


def test_every_alert_has_a_case_that_fires_and_a_case_that_stays_quiet() -> None:
    doc = yaml.safe_load(RULES_TEST.read_text(encoding="utf-8"))
    assert doc["rule_files"] == ["../alerts.yml"]
    fires: set[str] = set()
    quiet: set[str] = set()
    for case in doc["tests"]:
        for check in case.get("alert_rule_test", []):
            (fires if check["exp_alerts"] else quiet).add(check["alertname"])
    names = {rule["alert"] for rule in alert_rules()}
    assert names - fires == set(), "no firing case"
    assert names - quiet == set(), "no quiet case"
