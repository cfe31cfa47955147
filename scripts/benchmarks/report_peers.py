"""The report's part for the sections that compare two servers or setups in one run: hooks
(identity hooks against none) and triton (kleinserve against Triton on the Open Inference
Protocol). ``report.py`` shows their ratios and tables."""

from __future__ import annotations

from typing import Any

from scripts.benchmarks.tables import num as _num
from scripts.benchmarks.tables import table as _table
from scripts.benchmarks.tables import title as _title


def peer_ratios(results: dict[str, Any]) -> list[tuple[str, float, float, str]]:
    """(name, a, b, unit) of each ratio a / b these sections allow."""
    out: list[tuple[str, float, float, str]] = []
    hooks = results.get("hooks", [])
    for row in hooks:
        if row["hooks"] != "identity":
            continue
        plain = next(
            (
                r
                for r in hooks
                if r["hooks"] == "none"
                and r["model"] == row["model"]
                and r["concurrency"] == row["concurrency"]
            ),
            None,
        )
        if plain is not None:
            out.append(
                (
                    f"hooks {_title(row['model'])} c={row['concurrency']}: identity pre/post hooks / "
                    "no hooks",
                    row["rps"],
                    plain["rps"],
                    "requests/s",
                )
            )
    peers = results.get("triton", [])
    for row in peers:
        if row["server"] != "kleinserve":
            continue
        theirs = next(
            (
                r
                for r in peers
                if r["server"] == "triton"
                and (r["model"], r["encoding"], r["concurrency"])
                == (row["model"], row["encoding"], row["concurrency"])
            ),
            None,
        )
        if theirs is not None:
            out.append(
                (
                    f"{row['encoding']} {_title(row['model'])} c={row['concurrency']}: kleinserve / "
                    "Triton (PyTriton)",
                    row["rps"],
                    theirs["rps"],
                    "requests/s",
                )
            )
    return out


def hooks_table(results: dict[str, Any]) -> str:
    return _load_table(results.get("hooks", []), ["hooks"], ["hooks"])


def triton_table(results: dict[str, Any]) -> str:
    return _load_table(results.get("triton", []), ["body", "server"], ["encoding", "server"])


def _load_table(rows: list[dict[str, Any]], headers: list[str], keys: list[str]) -> str:
    """One row per load run: the model, ``keys`` (under ``headers``), then its figures."""
    if not rows:
        return ""
    return _table(
        ["model", *headers, "concurrency", "requests/s", "p50 ms", "p99 ms", "errors"],
        [
            [
                _title(r["model"]),
                *(str(r[key]) for key in keys),
                str(r["concurrency"]),
                _num(r["rps"]),
                _num(r["p50_ms"]),
                _num(r["p99_ms"]),
                str(r["errors"]),
            ]
            for r in rows
        ],
        markdown=True,
    )
