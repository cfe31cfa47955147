"""The report's part for the sections that compare two servers or setups in one run: hooks
(identity hooks against none), triton (kleinserve against Triton on the Open Inference
Protocol) and front (--http_processes N against 1 and against Triton). ``report.py`` shows
their ratios and tables."""

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
    out += _front_ratios(results)
    out += _grpc_ratios(results)
    return out


def _grpc_ratios(results: dict[str, Any]) -> list[tuple[str, float, float, str]]:
    """gRPC against our REST JSON at each concurrency, and against the in-process limit."""
    rows = results.get("grpc", [])
    out: list[tuple[str, float, float, str]] = []
    for row in rows:
        if row["api"] != "grpc":
            continue
        where = f"grpc {_title(row['model'])} c={row['concurrency']}"
        rest = next(
            (
                r
                for r in rows
                if r["api"] == "rest"
                and (r["model"], r["concurrency"]) == (row["model"], row["concurrency"])
            ),
            None,
        )
        if rest is not None:
            out.append((f"{where}: gRPC / REST JSON", row["rps"], rest["rps"], "requests/s"))
        best = results.get("inprocess", {}).get(row["model"], {}).get("best_instances_per_s")
        top = max(r["concurrency"] for r in rows if r["model"] == row["model"])
        if best and row["concurrency"] == top:
            out.append((f"{where}: gRPC / in-process limit", row["rps"], best, "requests/s"))
    return out


def grpc_table(results: dict[str, Any]) -> str:
    rows = results.get("grpc", [])
    if not rows:
        return ""
    return _table(
        ["model", "API", "concurrency", "requests/s", "p50 ms", "p99 ms", "errors",
         "request bytes", "server CPU ms/req", "load generator CPU ms/req"],
        [
            [_title(r["model"]), "gRPC" if r["api"] == "grpc" else "REST JSON",
             str(r["concurrency"]), _num(r["rps"]), _num(r["p50_ms"]), _num(r["p99_ms"]),
             str(r["errors"]),
             f"{r['grpc_request_bytes' if r['api'] == 'grpc' else 'rest_request_bytes']:,}",
             _num(r["server_cpu_ms_per_request"]),
             _num(r.get("client_cpu_ms_per_request")) if r["api"] == "grpc" else "(wrk)"]
            for r in rows
        ],
        markdown=True,
    )  # fmt: skip


def _front_ratios(results: dict[str, Any]) -> list[tuple[str, float, float, str]]:
    """Each front-process count against one process, and against Triton (v2 JSON), by model
    and concurrency; and the memory of each count against one process."""
    rows = results.get("front", [])
    out: list[tuple[str, float, float, str]] = []

    def find(server: str, model: str, encoding: str, c: int) -> dict[str, Any] | None:
        return next(
            (
                r
                for r in rows
                if (r["server"], r["model"], r["encoding"], r["concurrency"])
                == (server, model, encoding, c)
            ),
            None,
        )

    for row in rows:
        if not row["server"].startswith("kleinserve N=") or row["server"].endswith("N=1"):
            continue
        where = f"{row['encoding']} {_title(row['model'])} c={row['concurrency']}"
        one = find("kleinserve N=1", row["model"], row["encoding"], row["concurrency"])
        if one is not None:
            out.append(
                (f"front {where}: {row['server']} / N=1", row["rps"], one["rps"], "requests/s")
            )
        triton = find("triton", row["model"], row["encoding"], row["concurrency"])
        if triton is not None:
            out.append(
                (
                    f"front {where}: {row['server']} / Triton",
                    row["rps"],
                    triton["rps"],
                    "requests/s",
                )
            )
            if row["concurrency"] == max(r["concurrency"] for r in rows):
                out.append(
                    (f"front {where}: {row['server']} p99 / Triton p99", row["p99_ms"] or 0,
                     triton["p99_ms"] or 0, "ms")
                )  # fmt: skip
    memory = results.get("front_memory", [])
    for row in memory:
        one = next(
            (m for m in memory if m["server"] == "kleinserve N=1" and m["model"] == row["model"]),
            None,
        )
        if one is not None and row["server"] not in ("kleinserve N=1", "triton"):
            out.append(
                (f"front memory ({_title(row['model'])} last): {row['server']} RSS / N=1 RSS",
                 row["rss_mb"], one["rss_mb"], "MB")
            )  # fmt: skip
    return out


def front_table(results: dict[str, Any]) -> str:
    rows = results.get("front", [])
    if not rows:
        return ""
    return _table(
        ["model", "body", "server", "concurrency", "requests/s", "p50 ms", "p99 ms", "errors",
         "main CPU ms/req", "front CPU ms/req"],
        [
            [_title(r["model"]), r["encoding"], r["server"], str(r["concurrency"]), _num(r["rps"]),
             _num(r["p50_ms"]), _num(r["p99_ms"]), str(r["errors"]), _num(r["main_cpu_ms"]),
             _num(r["front_cpu_ms"])]
            for r in rows
        ],
        markdown=True,
    )  # fmt: skip


def front_memory_table(results: dict[str, Any]) -> str:
    rows = results.get("front_memory", [])
    if not rows:
        return ""
    return _table(
        ["after warming", "server", "processes", "RSS MB", "PSS MB"],
        [[_title(r["model"]), r["server"], str(r["processes"]), _num(r["rss_mb"]), _num(r["pss_mb"])]
         for r in rows],
        markdown=True,
    )  # fmt: skip


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
