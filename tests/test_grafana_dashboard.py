"""The Grafana dashboard ``deploy/grafana/kleinserve.json``: importable as it is, and every
query valid PromQL, read with a real PromQL parser (``promql-parser``, the Rust parser's
Python binding) that tells metric names from functions, labels and strings.

Whether a real server exports each name is checked in ``tests/test_metrics_integration.py``
(``dashboard_metric_names`` against a running server's ``/metrics``).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import promql_parser
import pytest

DASHBOARD = Path(__file__).resolve().parent.parent / "deploy" / "grafana" / "kleinserve.json"

# Grafana's interval variables stand where PromQL takes a duration; any duration will do.
_INTERVALS = re.compile(r"\$__(?:rate_interval|interval|range)\b")
_SELECTORS = re.compile(r"\{[^{}]*\}")


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (``…_bucket``, ``…_total`` as written).

    Raises ValueError for what is not PromQL (an unknown function, a missing bracket) and for
    a selector without a metric name, which this check could not follow.
    """
    names: set[str] = set()

    def visit(node: promql_parser.Expr) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            if node.name is None:
                raise ValueError(f"a selector without a metric name in {expr!r}")
            names.add(node.name)

    promql_parser.walk(promql_parser.parse(_INTERVALS.sub("5m", expr)), pre_visit=visit)
    return names


def load() -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return doc


def panels(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel, those inside collapsed rows included."""
    found = []
    for panel in doc["panels"]:
        found.append(panel)
        found.extend(panel.get("panels", []))
    return found


def queries(doc: dict[str, Any]) -> list[str]:
    """Every PromQL expression: the panels' targets and the query variables'."""
    exprs = [t["expr"] for p in panels(doc) for t in p.get("targets", [])]
    for variable in doc["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]
            text = query["query"] if isinstance(query, dict) else query
            match = re.fullmatch(r"label_values\((.*),\s*\w+\)", text)
            assert match, f"variable {variable['name']}: {text!r} is not label_values(…, label)"
            exprs.append(match.group(1))
    return exprs


def dashboard_metric_names() -> set[str]:
    """Every metric name the dashboard's queries select."""
    return set().union(*(metric_names(expr) for expr in queries(load())))


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        ("up", {"up"}),
        (
            'rate(kleinserve_requests_total{code=~"5..", route!="x(y)"}[5m])',
            {"kleinserve_requests_total"},
        ),
        (
            "histogram_quantile(0.99, sum by (le, model) "
            '(rate(a_bucket{model=~"$model"}[$__rate_interval])))',
            {"a_bucket"},
        ),
        ("sum without (instance) (a) / on (model) group_left (version) b", {"a", "b"}),
        ("a offset 5m > bool 1e3 and b unless c", {"a", "b", "c"}),
        ("sum(rate(a[5m])) by (model)", {"a"}),
        ("max_over_time(a[1h:5m])", {"a"}),
    ],
)
def test_metric_names_are_read_from_promql(expr: str, names: set[str]) -> None:
    """Names come out of selectors, never out of functions, labels, strings or durations."""
    assert metric_names(expr) == names


@pytest.mark.parametrize(
    ("expr", "error"),
    [
        ("rat(a[5m])", "unknown function with name .rat."),
        ("sum(rate(a[5m])", "unclosed left parenthesis"),
        ('{__name__="a"}', "without a metric name"),
    ],
)
def test_what_cannot_be_checked_is_an_error(expr: str, error: str) -> None:
    """A typo in a function, a missing bracket or a selector without a name fails the
    check rather than being read as something else."""
    with pytest.raises(ValueError, match=error):
        metric_names(expr)


def test_the_dashboard_imports_with_a_datasource_and_a_model_variable() -> None:
    """The JSON is a dashboard with a Prometheus datasource variable that every panel and
    query uses, a model variable, unique panel ids and a place on the grid for each."""
    doc = load()
    variables = {v["name"]: v for v in doc["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert variables["model"]["type"] == "query" and variables["model"]["includeAll"]
    assert doc["uid"] and doc["title"] and isinstance(doc["schemaVersion"], int)
    all_panels = panels(doc)
    assert len({p["id"] for p in all_panels}) == len(all_panels)
    for panel in all_panels:
        assert {"h", "w", "x", "y"} <= set(panel["gridPos"])
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == panel["datasource"]
            assert target["expr"].count("(") == target["expr"].count(")"), target["expr"]


# kleinserve's metrics without a model label.
SERVER_WIDE = {
    "kleinserve_requests_total",
    "kleinserve_in_flight_requests",
    "kleinserve_request_body_bytes",
}


def test_every_model_metric_is_filtered_by_the_model_variable() -> None:
    """Each selector of a metric labelled by model selects ``model=~"$model"``."""
    exprs = [t["expr"] for p in panels(load()) for t in p.get("targets", [])]
    for expr in exprs:
        for name, selector in re.findall(r"(kleinserve_\w+)(\{[^{}]*\})?", expr):
            if name not in SERVER_WIDE:
                assert 'model=~"$model"' in selector, expr


def test_the_dashboard_names_the_metrics_it_is_built_on() -> None:
    """The queries read the per-model request metrics, batching, threads, model state and
    the process's CPU and memory."""
    names = dashboard_metric_names()
    for name in (
        "kleinserve_model_requests_total",
        "kleinserve_model_request_seconds_bucket",
        "kleinserve_queue_seconds_bucket",
        "kleinserve_batch_size_bucket",
        "kleinserve_inference_threads_busy",
        "kleinserve_model_version_state",
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
    ):
        assert name in names
