"""The ``http`` section: ``twistd -n inference``, batching off and on, at each concurrency:
requests/s, p50/p99 latency, errors, server RSS (peak and end), batches seen in /metrics."""

from __future__ import annotations

from scripts.benchmarks.runner import Bench


def run(bench: Bench) -> None:
    for model in bench.plan.models:
        body = bench.body(model)
        for setup in bench.setups():
            proc = bench.start_kleinserve(model, setup)
            try:
                ready = proc.wait_ready()
                bench.say(f"  {proc.name} ready in {ready:.1f} s (pid {proc.pid})")
                url = f"{proc.url}/v1/models/{model}:predict"
                bench.check_predict(proc, model, body)
                bench.warm_up(proc, url, body)
                for concurrency in bench.plan.concurrencies:
                    seconds = bench.plan.seconds_for(model)
                    row = bench.measure(proc, url, body, concurrency, seconds)
                    row.update(model=model, config=setup.key, label=setup.label)
                    bench.results["http"].append(row)
                    bench.say(bench.point_line(f"{model} {setup.key}", row))
            finally:
                proc.stop()
