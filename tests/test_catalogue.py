"""The one metric catalogue: its names follow the OTel-to-Prometheus translation, its
buckets reach LLM time scales, and the README's table is made from it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from poolwatch._catalogue import CATALOGUE, MetricSpec, markdown_table

README = Path(__file__).parent.parent / "README.md"
UNIT_SUFFIX = {"s": "_seconds", "1": "_ratio"}


def translated(spec: MetricSpec) -> str:
    """What the standard OTel-to-Prometheus translation makes of the OTel name."""
    name = spec.otel_name.replace(".", "_")
    suffix = UNIT_SUFFIX.get(spec.unit, "")  # annotations like {connection} are dropped
    if spec.unit == "1" and spec.kind != "gauge":
        suffix = ""
    if suffix and not name.endswith(suffix):
        name += suffix
    if spec.kind == "counter":
        name += "_total"
    return name


@pytest.mark.parametrize("spec", CATALOGUE, ids=lambda s: s.otel_name)
def test_the_prometheus_name_is_the_standard_translation_of_the_otel_name(spec: MetricSpec) -> None:
    assert spec.prometheus_name == translated(spec)


@pytest.mark.parametrize("spec", CATALOGUE, ids=lambda s: s.otel_name)
def test_every_metric_carries_the_pool_name_and_per_origin_ones_the_origin(
    spec: MetricSpec,
) -> None:
    assert spec.attributes[0] == "pool.name"
    if spec.per_origin:
        assert spec.attributes[:4] == ("pool.name", "server.address", "server.port", "url.scheme")


@pytest.mark.parametrize(
    "spec", [s for s in CATALOGUE if s.kind == "histogram"], ids=lambda s: s.otel_name
)
def test_time_histograms_reach_the_sdks_ten_minute_pool_timeout(spec: MetricSpec) -> None:
    assert spec.unit == "s"
    assert max(spec.buckets) >= 600
    assert list(spec.buckets) == sorted(set(spec.buckets))


def test_names_are_unique() -> None:
    assert (
        len({s.otel_name for s in CATALOGUE})
        == len({s.prometheus_name for s in CATALOGUE})
        == len(CATALOGUE)
    )


def test_the_readme_metric_table_is_the_catalogue() -> None:
    text = README.read_text()
    found = re.search(r"<!-- metrics-table -->\n(.*?)\n<!-- /metrics-table -->", text, re.S)
    assert found, "README.md lacks the <!-- metrics-table --> block"
    assert found.group(1) == markdown_table(), (
        "regenerate: python -c 'from poolwatch._catalogue import markdown_table as t; print(t())'"
    )
