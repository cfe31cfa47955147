"""The ``flask`` section: the digits model in Flask behind ``gunicorn -w 4`` (``flask_app``)
vs one kleinserve process: memory of all processes, and throughput at concurrency 64."""

from __future__ import annotations

import json
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from harness.ports import LOOPBACK, free_port
from harness.processes import Proc, start
from harness.twistd import REPO
from scripts.benchmarks.plan import GUNICORN_WORKERS, HEAVY_CONCURRENCY, Setup
from scripts.benchmarks.procs import VENV_BIN, BenchError, memory_of
from scripts.benchmarks.runner import Bench


def run(bench: Bench) -> None:
    model, concurrency = "digits", HEAVY_CONCURRENCY
    base, body = bench.model(model), bench.body(model)
    results: dict[str, Any] = {"concurrency": concurrency, "workers": GUNICORN_WORKERS}

    proc = bench.start_kleinserve(model, Setup("on", 1))
    try:
        proc.wait_ready()
        url = f"{proc.url}/v1/models/{model}:predict"
        bench.check_predict(proc, model, body)
        bench.warm_up(proc, url, body)
        row = bench.measure(proc, url, body, concurrency, bench.plan.duration)
        memory = memory_of(proc.pid)
        results["kleinserve"] = {**row, **_memory_fields(memory)}
        bench.say(bench.point_line("kleinserve (batching on)", row))
    finally:
        proc.stop()

    port = free_port()
    command = [
        str(VENV_BIN / "gunicorn"),
        "-w",
        str(GUNICORN_WORKERS),
        "-b",
        f"{LOOPBACK}:{port}",
        "--chdir",
        str(REPO),
        "--timeout",
        "120",
        "--graceful-timeout",
        "5",
        "scripts.benchmarks.flask_app:app",
    ]
    proc = start("flask-gunicorn", command, port, bench.logs, BENCH_MODEL_DIR=str(base / "1"))
    try:
        ready = wait_for_workers(proc, GUNICORN_WORKERS)
        bench.say(f"  gunicorn -w {GUNICORN_WORKERS}: all workers ready in {ready:.1f} s")
        url = f"{proc.url}/v1/models/{model}:predict"
        bench.check_predict(proc, model, body)
        bench.warm_up(proc, url, body)
        row = bench.measure(proc, url, body, concurrency, bench.plan.duration)
        memory = memory_of(proc.pid)
        results["flask"] = {**row, **_memory_fields(memory)}
        bench.say(
            bench.point_line(f"flask+gunicorn ({memory.processes} processes, RSS summed)", row)
        )
    finally:
        proc.stop()
    bench.results["flask"] = results


def _memory_fields(memory: Any) -> dict[str, Any]:
    return {
        "processes": memory.processes,
        "rss_sum_mb": round(memory.rss_mb, 1),
        "rss_peak_sum_mb": round(memory.hwm_mb, 1),
        "pss_sum_mb": round(memory.pss_mb, 1),
    }


def wait_for_workers(proc: Proc, workers: int, timeout: float = 240.0) -> float:
    """Wait until ``workers`` distinct gunicorn workers have answered /readyz (each loaded TF)."""
    started = time.monotonic()
    proc.wait_ready(timeout=timeout)
    seen: set[int] = set()

    def ask(_: int) -> int | None:
        try:
            with urllib.request.urlopen(proc.url + "/readyz", timeout=5) as response:
                return int(json.loads(response.read())["pid"])
        except (OSError, ValueError, KeyError):
            return None

    with ThreadPoolExecutor(2 * workers) as pool:
        while time.monotonic() - started < timeout:
            if not proc.running():
                raise BenchError(f"gunicorn exited:\n{proc.log_tail()}")
            seen.update(pid for pid in pool.map(ask, range(4 * workers)) if pid is not None)
            if len(seen) >= workers:
                return time.monotonic() - started
            time.sleep(0.5)
    raise BenchError(f"only {len(seen)} of {workers} gunicorn workers answered:\n{proc.log_tail()}")
