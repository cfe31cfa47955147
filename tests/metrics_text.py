"""Reading Prometheus text as Prometheus does: with ``prometheus_client``'s own parser."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

Labels = frozenset[tuple[str, str]]


def samples(text: str, name: str) -> dict[Labels, float]:
    """Every sample called ``name`` (``…_total``, ``…_count``, ``…_bucket`` included) in
    the exposition ``text``: its labels -> its value."""
    found: dict[Labels, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                found[frozenset(sample.labels.items())] = sample.value
    return found


def sample_names(text: str) -> set[str]:
    """The names of every sample in ``text`` (a histogram's ``_bucket``, ``_sum``, ``_count``)."""
    return {s.name for family in text_string_to_metric_families(text) for s in family.samples}


def labels(**values: str) -> Labels:
    return frozenset(values.items())
