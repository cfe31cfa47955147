"""The ``engine`` section: 64 submitters feeding ``service.batching.BatchingQueue`` on a real
reactor and a real inference ThreadPool, no HTTP (in a child process, ``without_http``):
batching off, and on with each ``--threads``."""

from __future__ import annotations

from typing import Any

from scripts.benchmarks.plan import HEAVY_CONCURRENCY
from scripts.benchmarks.runner import Bench


def run(bench: Bench) -> None:
    for model in bench.plan.models:
        base = bench.model(model)
        runs: dict[str, Any] = {}
        for setup in bench.setups():
            args = ["engine", str(base), "--seconds", str(bench.plan.seconds_for(model))]
            args += ["--warmup", str(bench.plan.engine_warmup)]
            args += ["--submitters", str(HEAVY_CONCURRENCY)]
            if setup.threads is not None:
                args += ["--batching-file", str(bench.batching_path(setup.threads))]
            result = bench.child(
                args,
                f"engine-{model}-{setup.key}",
                timeout=300 + 2 * bench.plan.seconds_for(model),
            )
            result["label"] = setup.label
            runs[setup.key] = result
            bench.say(
                f"  {model} {setup.label}, {HEAVY_CONCURRENCY} submitters: "
                f"{result['instances_per_s']} instances/s, mean batch {result['mean_batch']}"
                f" {result['batch_sizes']}"
                + (f", {result['errors']} errors ({result['error']})" if result["errors"] else "")
            )
        bench.results["engine"][model] = runs
