"""The Grafana dashboard ``deploy/grafana/kleinserve.json``: importable as it is, and every
query names metrics by a PromQL reading that can tell them from functions and labels.

Whether a real server exports each name is checked in ``tests/test_metrics_integration.py``
(``dashboard_metric_names`` against a running server's ``/metrics``).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

DASHBOARD = Path(__file__).resolve().parent.parent / "deploy" / "grafana" / "kleinserve.json"

# PromQL's functions and aggregation operators (prometheus.io/docs/prometheus/latest/querying):
# an identifier followed by "(" must be one of these; a metric name is never followed by "(".
FUNCTIONS = frozenset(
    """abs absent absent_over_time avg avg_over_time bottomk ceil changes clamp clamp_max
    clamp_min count count_over_time count_values day_of_month day_of_week day_of_year
    days_in_month delta deriv exp floor group histogram_avg histogram_count
    histogram_fraction histogram_quantile histogram_stddev histogram_stdvar histogram_sum
    holt_winters hour idelta increase irate label_join label_replace last_over_time limitk
    limit_ratio ln log10 log2 mad_over_time max max_over_time min min_over_time minute month
    predict_linear present_over_time quantile quantile_over_time rate resets round scalar sgn
    sort sort_by_label sort_by_label_desc sort_desc sqrt stddev stddev_over_time stdvar
    stdvar_over_time sum sum_over_time time timestamp topk vector year""".split()
)
# Words that are PromQL syntax, not names.
KEYWORDS = frozenset(
    "by without on ignoring group_left group_right bool and or unless offset atan2 inf nan".split()
)
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_MATCHERS = re.compile(r"\{[^{}]*\}")
_RANGE = re.compile(r"\[[^\[\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
_NAME = re.compile(r"(?<![\w:.$])[A-Za-z_:][\w:]*")


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (``…_bucket``, ``…_total`` as written).

    Strings (label values, which may hold anything) go first, then label matchers, ranges
    and ``by (…)``-style label lists; what is left is functions, keywords, numbers,
    operators and metric names. A name followed by ``(`` must be a known function.
    """
    text = _STRING.sub('""', expr)
    text = _MATCHERS.sub("{}", text)
    text = _RANGE.sub("", text)
    text = _GROUPING.sub("", text)
    names = set()
    for match in _NAME.finditer(text):
        word = match.group()
        if text[match.end() :].lstrip().startswith("("):
            if word not in FUNCTIONS:
                raise ValueError(f"{word!r} is no PromQL function, in {expr!r}")
            continue
        if word.lower() in KEYWORDS:
            continue
        names.add(word)
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
            'histogram_quantile(0.99, sum by (le, model) (rate(a_bucket{model=~"$model"}[$__rate_interval])))',
            {"a_bucket"},
        ),
        ("sum without (instance) (a) / on (model) group_left (version) b", {"a", "b"}),
        ("a offset 5m > bool 1e3 and b unless c", {"a", "b", "c"}),
        ("sum(rate(a[5m])) by (model)", {"a"}),
        (":tensorflow:serving:request_count", {":tensorflow:serving:request_count"}),
        ('{__name__="ignored"}', set()),
    ],
)
def test_metric_names_are_read_from_promql(expr: str, names: set[str]) -> None:
    """Names come out of selectors, never out of functions, labels, strings or durations."""
    assert metric_names(expr) == names


def test_an_unknown_function_is_an_error() -> None:
    """A typo in a function name is caught rather than read as a metric."""
    with pytest.raises(ValueError, match="'rat'"):
        metric_names("rat(a[5m])")


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
