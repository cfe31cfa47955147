"""The ``empty`` section: an empty Klein route (``empty_app``) answering ``{}`` to the same
bodies: the HTTP stack's ceiling."""

from __future__ import annotations

import sys

from harness.ports import free_port
from harness.processes import start
from scripts.benchmarks.runner import Bench


def run(bench: Bench) -> None:
    port = free_port()
    command = [sys.executable, "-m", "scripts.benchmarks.empty_app", str(port)]
    proc = start("empty-klein", command, port, bench.logs)
    try:
        ready = proc.wait_ready()
        bench.say(f"  empty Klein route ready in {ready:.1f} s (pid {proc.pid})")
        url = f"{proc.url}/v1/models/empty:predict"
        for model in bench.plan.models:
            body = bench.body(model)
            bench.warm_up(proc, url, body)
            for concurrency in bench.plan.concurrencies:
                row = bench.measure(proc, url, body, concurrency, bench.plan.duration)
                row.update(model=model, config="empty", label="empty Klein route")
                bench.results["http"].append(row)
                bench.say(bench.point_line(f"empty route, {model} body", row))
    finally:
        proc.stop()
