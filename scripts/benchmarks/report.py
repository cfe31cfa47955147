"""Turning ``scripts/bench`` results into ratios, tables and docs/benchmarks.md (the plot: plot.py).

Everything here is a pure function of the results dict that ``runner.Bench`` fills (and saves
as JSON), so a report can be rebuilt from a saved JSON file without measuring again:

    .venv/bin/python -m scripts.benchmarks.report docs/benchmarks.json
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from scripts.benchmarks.report_peers import (
    front_memory_table,
    front_table,
    grpc_table,
    hooks_table,
    peer_ratios,
    triton_table,
)
from scripts.benchmarks.tables import CONFIG_ORDER, TITLES
from scripts.benchmarks.tables import num as _num
from scripts.benchmarks.tables import table as _table
from scripts.benchmarks.tables import title as _title

# -- lookups ---------------------------------------------------------------------------------


def http_row(results: dict[str, Any], model: str, config: str, concurrency: int) -> dict | None:
    for row in results.get("http", []):
        if (row["model"], row["config"], row["concurrency"]) == (model, config, concurrency):
            return row
    return None


def _models(results: dict[str, Any]) -> list[str]:
    return list(results.get("meta", {}).get("models", TITLES))


def _top_concurrency(results: dict[str, Any], model: str) -> int | None:
    levels = [row["concurrency"] for row in results.get("http", []) if row["model"] == model]
    return max(levels) if levels else None


# -- ratios ----------------------------------------------------------------------------------


def ratios(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Every ratio the measured sections allow, as {name, a, b, unit, value}."""
    out: list[dict[str, Any]] = []

    def add(name: str, a: float | None, b: float | None, unit: str, unit_b: str = "") -> None:
        """Ratio a / b; ``unit`` is a's unit, and b's too unless ``unit_b`` says otherwise."""
        if a is None or b is None or b == 0:
            return
        units = [unit, unit_b or unit]
        out.append({"name": name, "a": a, "b": b, "units": units, "value": round(a / b, 4)})

    for model in _models(results):
        title = _title(model)
        limit = results.get("inprocess", {}).get(model, {})
        best = limit.get("best_instances_per_s")
        single_ms = limit.get("sizes", {}).get("1", {}).get("p50_ms")
        engine = results.get("engine", {}).get(model, {})
        for key, run in engine.items():
            if key == "off":
                continue
            label = run.get("label", key)
            add(
                f"engine {title}, 64 submitters: {label} / in-process limit",
                run["instances_per_s"],
                best,
                "instances/s",
            )
            if "off" in engine:
                add(
                    f"engine {title}, 64 submitters: {label} / batching off",
                    run["instances_per_s"],
                    engine["off"]["instances_per_s"],
                    "instances/s",
                )
        top = _top_concurrency(results, model)
        if top is None:
            continue
        empty = http_row(results, model, "empty", top)
        for config in ("on", "off"):
            row = http_row(results, model, config, top)
            if row is None:
                continue
            label = row["label"]
            add(
                f"HTTP {title} c={top}, {label}: requests/s / in-process limit",
                row["rps"],
                best,
                "requests/s",
                "instances/s",
            )
            if empty is not None:
                add(
                    f"HTTP {title} c={top}, {label}: requests/s / empty Klein route (same body)",
                    row["rps"],
                    empty["rps"],
                    "requests/s",
                )
            add(f"HTTP {title} c={top}, {label}: p99 / p50", row["p99_ms"], row["p50_ms"], "ms")
        for config in ("on", "off"):
            row = http_row(results, model, config, 1)
            if row is not None:
                add(
                    f"HTTP {title} c=1, {row['label']}: p50 / one in-process batch-1 call",
                    row["p50_ms"],
                    single_ms,
                    "ms",
                )
    flask = results.get("flask", {})
    if "flask" in flask and "kleinserve" in flask:
        f, k = flask["flask"], flask["kleinserve"]
        workers = flask.get("workers", 4)
        add(
            f"memory: Flask + gunicorn -w {workers} RSS sum / kleinserve RSS",
            f["rss_sum_mb"],
            k["rss_sum_mb"],
            "MB",
        )
        add(
            f"memory: Flask + gunicorn -w {workers} PSS sum / kleinserve PSS",
            f["pss_sum_mb"],
            k["pss_sum_mb"],
            "MB",
        )
        add(
            f"throughput c={flask['concurrency']}: Flask + gunicorn -w {workers} / kleinserve",
            f["rps"],
            k["rps"],
            "requests/s",
        )
    for name, a, b, unit in peer_ratios(results):
        add(name, a, b, unit)
    soak = results.get("soak", {})
    if soak.get("samples"):
        samples = soak["samples"]
        add(
            f"soak {soak['seconds']:g} s c={soak['concurrency']}: RSS end / RSS start",
            samples[-1]["rss_mb"],
            samples[0]["rss_mb"],
            "MB",
        )
    big = results.get("memory", {})
    if big:
        add(
            f"{big['requests']} requests of {big['body_mb']:g} MB: RSS after / RSS before",
            big["rss_after_mib"],
            big["rss_before_mib"],
            "MiB",
        )
    return out


def ratio_lines(items: Sequence[dict[str, Any]]) -> list[str]:
    if not items:
        return ["(no ratios: the sections they need were not run)"]
    return [
        f"measured {r['name']} = {_num(r['a'])} {r['units'][0]} / {_num(r['b'])} {r['units'][1]}"
        f" = {r['value']:.3g}"
        for r in items
    ]


# -- tables ----------------------------------------------------------------------------------


def _sorted_http(results: dict[str, Any]) -> list[dict[str, Any]]:
    models = _models(results)

    def key(row: dict[str, Any]) -> tuple:
        config = row["config"]
        rank = CONFIG_ORDER.index(config) if config in CONFIG_ORDER else len(CONFIG_ORDER)
        model = models.index(row["model"]) if row["model"] in models else len(models)
        return (model, rank, row["concurrency"])

    return sorted(results.get("http", []), key=key)


def http_table(results: dict[str, Any], markdown: bool = False) -> str:
    rows = [
        [
            _title(r["model"]) + (" body" if r["config"] == "empty" else ""),
            r["label"],
            str(r["concurrency"]),
            f"{r['rps']:.1f}",
            _num(r["p50_ms"]),
            _num(r["p99_ms"]),
            str(r["errors"]),
            _num(r.get("mean_batch")) if "mean_batch" in r else "–",
            f"{r['model_busy']:.0%}" if "model_busy" in r else "–",
            f"{r['rss_peak_mb']:.0f}",
            f"{r['rss_end_mb']:.0f}",
        ]
        for r in _sorted_http(results)
    ]
    if not rows:
        return "(no HTTP measurements)"
    headers = [
        "model",
        "server",
        "conc.",
        "requests/s",
        "p50 ms",
        "p99 ms",
        "errors",
        "mean batch",
        "model busy",
        "RSS peak MB",
        "RSS end MB",
    ]
    return _table(headers, rows, markdown)


def inprocess_table(results: dict[str, Any]) -> str:
    rows = []
    for model, run in results.get("inprocess", {}).items():
        for size, r in run["sizes"].items():
            best = " (best)" if int(size) == run["best_size"] else ""
            rows.append(
                [
                    _title(model),
                    size,
                    f"{r['instances_per_s']:.1f}{best}",
                    _num(r["p50_ms"]),
                    str(r["calls"]),
                ]
            )
    headers = ["model", "batch", "instances/s", "ms per call (p50)", "calls"]
    return _table(headers, rows, True) if rows else ""


def engine_table(results: dict[str, Any]) -> str:
    rows = []
    for model, runs in results.get("engine", {}).items():
        for run in runs.values():
            sizes = ", ".join(f"{k}: {v}" for k, v in run["batch_sizes"].items())
            rows.append(
                [
                    _title(model),
                    run.get("label", ""),
                    f"{run['instances_per_s']:.1f}",
                    _num(run["mean_batch"]),
                    sizes,
                    str(run["errors"]),
                ]
            )
    headers = ["model", "queue", "instances/s", "mean batch", "batches by size", "errors"]
    return _table(headers, rows, True) if rows else ""


def flask_table(results: dict[str, Any]) -> str:
    flask = results.get("flask", {})
    rows = []
    for key, label in (
        ("kleinserve", "kleinserve, one process, batching on"),
        ("flask", f"Flask + gunicorn -w {flask.get('workers', 4)}"),
    ):
        if key in flask:
            r = flask[key]
            rows.append(
                [
                    label,
                    str(r["processes"]),
                    f"{r['rss_sum_mb']:.0f}",
                    f"{r['rss_peak_sum_mb']:.0f}",
                    f"{r['pss_sum_mb']:.0f}",
                    f"{r['rps']:.1f}",
                    _num(r["p50_ms"]),
                    _num(r["p99_ms"]),
                    str(r["errors"]),
                ]
            )
    headers = [
        "server",
        "processes",
        "RSS sum MB",
        "peak RSS sum MB",
        "PSS sum MB",
        "requests/s",
        "p50 ms",
        "p99 ms",
        "errors",
    ]
    return _table(headers, rows, True) if rows else ""


def soak_table(results: dict[str, Any]) -> str:
    samples = results.get("soak", {}).get("samples", [])
    rows = [[f"{s['t']:.0f}", f"{s['rss_mb']:.1f}"] for s in samples]
    return _table(["seconds", "RSS MB"], rows, True) if rows else ""


# -- markdown --------------------------------------------------------------------------------


def markdown(results: dict[str, Any]) -> str:
    meta = results["meta"]
    bodies = results.get("bodies", {})
    body_text = ", ".join(f"{_title(m)} {b['bytes']:,} bytes" for m, b in bodies.items()) or "–"
    quick = meta["mode"] == "quick"
    parts = [
        "# Benchmarks",
        "",
        "Written by `scripts/bench` (see its `--help`); rebuild this page by running it again.",
        "",
    ]
    if quick:
        parts += [
            "> **A quick smoke run**: short points, low concurrency, measured while other work ran.",
            "> Its numbers show what the bench reports, not how fast kleinserve is; the full run",
            "> (`scripts/bench` on an idle machine) replaces them.",
            "",
        ]
    parts += [
        f"- command: `{meta['command']}`",
        f"- date: {meta['date']}, {meta.get('seconds', 0) / 60:.1f} minutes",
        f"- machine: {meta['nproc']} cores ({meta['cpu']}), {meta['memory_gb']} GB;"
        f" load average {meta['loadavg_start'][0]} at the start, {meta.get('loadavg_end', ['?'])[0]} at the end",
        f"- software: Python {meta['python']}, TensorFlow {meta['tensorflow']}, Twisted {meta['twisted']},"
        f" Klein {meta['klein']}, "
        + (f"wrk {meta['wrk']}" if "wrk" in meta else f"hey {meta.get('hey', '?')}"),
        f"- request bodies: {body_text}",
        f"- {meta['duration']:g} s per point; concurrency {', '.join(map(str, meta['concurrencies']))}",
        "",
    ]
    if results.get("failures"):
        parts += [
            "**Sections that failed:** "
            + "; ".join(f"{f['section']}: {f['error'][:200]}" for f in results["failures"]),
            "",
        ]
    parts += [
        "## Ratios",
        "",
        *[f"- {line}" for line in ratio_lines(results.get("ratios", []))],
        "",
    ]
    if results.get("http"):
        parts += [
            "## HTTP: requests/s, latency, memory",
            "",
            http_table(results, markdown=True),
            "",
        ]
    if meta.get("plot"):
        parts += [f"![requests/s by concurrency]({meta['plot']})", ""]
    for title, table in (
        ("In-process limit: the signature called directly, no HTTP", inprocess_table(results)),
        ("The batching engine alone: 64 submitters, one row each, no HTTP", engine_table(results)),
        ("Memory: Flask + gunicorn vs one kleinserve process (digits)", flask_table(results)),
        ("RSS stability: batching on, digits, concurrency 64", soak_table(results)),
        (
            "TF Serving's gRPC API (tensor_content) vs our REST JSON, one server",
            grpc_table(results),
        ),
        ("Per-version hooks: identity pre/post hooks vs none, one server", hooks_table(results)),
        ("Open Inference Protocol: kleinserve and Triton (PyTriton)", triton_table(results)),
        ("Front processes (--http_processes) and Triton (PyTriton)", front_table(results)),
        ("Front processes: memory of each server", front_memory_table(results)),
    ):
        if table:
            parts += [f"## {title}", "", table, ""]
    big = results.get("memory", {})
    if big:
        parts += [
            f"## Memory across large requests: {big['requests']} predicts of {big['body_mb']:g} MB",
            "",
            f"RSS {big['rss_before_mib']} MiB before, {big['rss_after_mib']} MiB after the last "
            f"({big['ratio_after']:.2f}x), {big['rss_settled_mib']} MiB a few seconds later "
            f"({big['ratio_settled']:.2f}x). `scripts/bench request-memory` sends them one at a time "
            "to the digits model with batching on.",
            "",
        ]
    soak = results.get("soak", {})
    if soak.get("samples"):
        parts += [
            f"RSS grew {soak['growth_pct']:+.2f} % over {soak['seconds']:g} s under load "
            f"({soak['second_half_growth_pct']:+.2f} % over the second half); "
            f"{soak['rps']:.1f} requests/s, {soak['errors']} errors.",
            "",
        ]
    parts += ["## How it was measured", "", *method(results), ""]
    return "\n".join(parts)


def method(results: dict[str, Any]) -> list[str]:
    meta = results["meta"]
    threads = meta.get("threads", [1])
    params = meta.get("batching_parameters", {}).get(str(threads[0]), "")
    lines = [
        f"- **Load**: `wrk -t1 -cC -d{meta['duration']:g}s --latency -s post.lua URL` (post.lua"
        " POSTs BODY as application/json; wrk ends each run with requests in flight and closes"
        " their connections, so a server that wedges on clients leaving fails the next point)"
        + "".join(
            f" ({factor * meta['duration']:g} s for {_title(model)}, whose batches take seconds)"
            for model, factor in meta.get("duration_factors", {}).items()
            if factor != 1
        )
        + ", on the same machine and cores as the server (as any local client would be), to"
        " 127.0.0.1 only."
        " requests/s counts 2xx answers only; *errors* are other statuses plus socket errors."
        " p50/p99 are wrk's latency distribution. Each server is ready when `GET /readyz`"
        f" answers 200, then gets {meta.get('warmup_seconds', 3):g} s of warm-up load.",
        '- **Bodies**: TF Serving\'s row format, `{"instances": [image]}`, one image of random floats in'
        " [0, 1) written to 4 decimals.",
        "- **Servers**: `twistd -n inference --model_name=M --model_base_path=.cache/bench/models/M"
        " --listen=tcp:PORT:interface=127.0.0.1`, plus `--enable_batching"
        " --batching_parameters_file=F` for batching on, with F:",
        "",
        "  ```",
        *[f"  {line}" for line in params.strip().splitlines()],
        "  ```",
        "",
        "  "
        + (
            f"(`num_batch_threads` is also run at {', '.join(map(str, threads[1:]))}.) "
            if threads[1:]
            else ""
        )
        + "No `allowed_batch_sizes`: both SavedModels take any batch size, so batches run at their real"
        " size with no padding. With a timeout of 0, a batch leaves as soon as the inference thread"
        " is free, holding whatever queued while the previous batch ran.",
        "- **Memory**: VmRSS (end of the point) and VmHWM (peak since the process started, model"
        " loading included) of the twistd process, from /proc/PID/status.",
        "- **mean batch, model busy**: from the server's /metrics before and after each point:"
        " real rows per batch, and seconds spent in the model per second of wall time (above 100 %"
        " with two inference threads).",
        "- **In-process limit**: `scripts/benchmarks/without_http.py inprocess` loads the SavedModel and calls"
        " its `serving_default` function in a loop (numpy in through `tf.constant`, `.numpy()` out, as"
        " the inference thread does), one batch size at a time after 1 to 3 warm-up calls. One request"
        " carries one instance, so requests/s compares directly to instances/s.",
        "- **Engine**: `scripts/benchmarks/without_http.py engine`: the real `BatchingQueue`, `Servable` and a"
        " dedicated `ThreadPool` on a real reactor, as `service/repository/loader.py` wires them; 64"
        " coroutines each submit one row, await it and repeat. instances/s is counted over whole"
        " batches after a warm-up.",
        "- **Empty route**: `scripts/benchmarks/empty_app.py`, a Klein app on a Site set up as"
        " kleinserve's (bodies in memory, no form parsing, no access log) that reads the body and"
        " answers `{}`: the most requests/s the HTTP"
        " stack gives for that body on this machine, through the same wrk.",
        "- **Flask**: `scripts/benchmarks/flask_app.py` under `gunicorn -w 4` (sync workers, each loading"
        " TensorFlow and the model at import) vs one kleinserve process with batching on. RSS sums"
        " every process of each server (gunicorn's master included) and so counts shared library"
        " pages once per process; PSS shares them out, so its sum is the memory really used (it"
        " also shares pages with any other process that maps the same libraries, so it is only"
        " clean on an otherwise idle machine).",
        "- **Soak**: batching on, digits, concurrency 64; RSS of the twistd process every 5 s.",
        "- **gRPC**: one server per model serves REST and gRPC (batching on, the file above);"
        " at each concurrency the same image goes as the REST JSON body (wrk) and as a"
        " `PredictRequest` with `tensor_content` (`scripts/benchmarks/sections/grpc.py`:"
        " `grpc.aio` on one channel, C calls in flight, request and answer kept as raw bytes)."
        " Server CPU is the twistd process's user + system time over the point per answer; the"
        " gRPC load generator's own CPU per request is given beside it, since it shares the"
        " two cores.",
    ]
    return lines


# -- plot ------------------------------------------------------------------------------------


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(
            "usage: python -m scripts.benchmarks.report RESULTS.json  (rewrites the .md and .png beside it)",
            file=sys.stderr,
        )
        return 2
    source = Path(argv[0])
    results = json.loads(source.read_text())
    results["ratios"] = ratios(results)
    from scripts.benchmarks.plot import plot  # matplotlib, only when there is a plot to draw

    png = source.with_suffix(".png")
    if plot(results, png):
        results["meta"]["plot"] = png.name
    source.with_suffix(".md").write_text(markdown(results))
    print("\n".join(ratio_lines(results["ratios"])))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
