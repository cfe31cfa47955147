"""The ``inprocess`` section: the model's signature called directly in a loop at batch 1, 8,
32, 64 (in a child process, ``without_http``): the in-process limit (instances/s), and the
time of one batch-1 call."""

from __future__ import annotations

from scripts.benchmarks.runner import Bench


def run(bench: Bench) -> None:
    sizes = ",".join(str(s) for s in bench.plan.inprocess_sizes)
    for model in bench.plan.models:
        base = bench.model(model)
        bench.say(f"  {model}: signature in a loop, batch sizes {sizes}")
        result = bench.child(
            [
                "inprocess",
                str(base),
                "--seconds",
                str(bench.plan.inprocess_seconds),
                "--sizes",
                sizes,
                "--min-calls",
                "2" if bench.plan.quick else "5",
            ],
            f"inprocess-{model}",
            # without_http bounds each size to 10 x its seconds + 30 s.
            timeout=180
            + (10 * bench.plan.inprocess_seconds + 40) * len(bench.plan.inprocess_sizes),
        )
        for size, row in result["sizes"].items():
            bench.say(
                f"  {model} batch {size:>2}: {row['instances_per_s']:9.1f} instances/s, "
                f"{row['p50_ms']} ms per call ({row['calls']} calls)"
            )
        bench.say(
            f"  {model} in-process limit: {result['best_instances_per_s']} instances/s "
            f"at batch {result['best_size']}"
        )
        bench.results["inprocess"][model] = result
