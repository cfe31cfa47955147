"""What every section of ``scripts/bench`` does with its servers: ``Bench``, one per run.

It holds the plan and the results, makes the models and request bodies once, starts
kleinserve with the bench's batching files, runs the children that measure without HTTP,
and measures one point of load (wrk, then memory and batch counters).
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import time
import traceback
import urllib.request
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from harness.ports import LOOPBACK, free_port
from harness.processes import Proc, start, stop_all
from harness.twistd import REPO
from scripts.benchmarks import models as bench_models
from scripts.benchmarks.plan import CACHE, HEAVY_CONCURRENCY, Plan, Setup, batching_file
from scripts.benchmarks.procs import (
    VENV_BIN,
    BenchError,
    batch_counters,
    batch_stats,
    memory_of,
    run_wrk,
)


class Bench:
    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.started = time.monotonic()
        self.logs = CACHE / "logs"
        self.results: dict[str, Any] = {
            "meta": machine_facts(plan),
            "bodies": {},
            "inprocess": {},
            "engine": {},
            "http": [],
            "flask": {},
            "soak": {},
            "memory": {},
            "failures": [],
        }
        self._models: dict[str, Path] = {}
        self._bodies: dict[str, Path] = {}

    # -- small helpers ---------------------------------------------------------------------------

    def say(self, message: str) -> None:
        print(f"[{time.monotonic() - self.started:6.1f}s] {message}", flush=True)

    def model(self, name: str) -> Path:
        if name not in self._models:
            self._models[name] = bench_models.ensure_model(
                name, CACHE, self.logs / f"export-{name}.log"
            )
        return self._models[name]

    def body(self, name: str) -> Path:
        if name not in self._bodies:
            path = CACHE / "bodies" / f"{name}.json"
            size = bench_models.write_body(bench_models.MODELS[name], path)
            self.results["bodies"][name] = {"bytes": size, "path": str(path.relative_to(REPO))}
            self.say(f"request body for {name}: {size} bytes ({path.relative_to(REPO)})")
            self._bodies[name] = path
        return self._bodies[name]

    def setups(self) -> list[Setup]:
        return [Setup("off", None)] + [
            Setup("on" if t == 1 else f"on-{t}t", t) for t in self.plan.threads
        ]

    def batching_path(self, threads: int) -> Path:
        path = CACHE / f"batching-{threads}t.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(batching_file(threads))
        return path

    def start_kleinserve(self, model: str, setup: Setup) -> Proc:
        base = self.model(model)
        port = free_port()
        command = [
            str(VENV_BIN / "twistd"),
            "-n",
            "--pidfile=",
            "--logfile=-",
            "inference",
            f"--model_name={model}",
            f"--model_base_path={base}",
            f"--listen=tcp:{port}:interface={LOOPBACK}",
            "--port=0",  # REST only: no gRPC port to share between runs
        ]
        if setup.threads is not None:
            params = self.batching_path(setup.threads)
            command += ["--enable_batching", f"--batching_parameters_file={params}"]
        return start(f"kleinserve-{model}-{setup.key}", command, port, self.logs)

    def child(self, args: list[str], log_name: str, timeout: float) -> dict[str, Any]:
        """Run ``without_http`` in a process of its own; its last stdout line is JSON."""
        log = self.logs / f"{log_name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("w") as err:
            done = subprocess.run(
                [sys.executable, "-m", "scripts.benchmarks.without_http", *args],
                cwd=REPO,
                stdout=subprocess.PIPE,
                stderr=err,
                text=True,
                timeout=timeout,
                check=False,
            )
        lines = done.stdout.strip().splitlines()
        if done.returncode != 0 or not lines:
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-20:])
            raise BenchError(f"without_http {' '.join(args)} failed ({done.returncode}):\n{tail}")
        return json.loads(lines[-1])

    def check_predict(self, proc: Proc, model: str, body: Path) -> None:
        """One request by hand before any load: a 200 with predictions, or stop with the reason."""
        request = urllib.request.Request(
            f"{proc.url}/v1/models/{model}:predict",
            data=body.read_bytes(),
            headers={"content-type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                answer = json.loads(response.read())
        except OSError as e:
            raise BenchError(f"{proc.name}: a single predict failed: {e}\n{proc.log_tail()}") from e
        if "predictions" not in answer:
            raise BenchError(f"{proc.name}: unexpected answer {str(answer)[:200]}")

    def warm_up(self, proc: Proc, url: str, body: Path) -> None:
        concurrency = min(max(self.plan.concurrencies), HEAVY_CONCURRENCY)
        result = run_wrk(url, body, concurrency, self.plan.warmup_seconds)
        self.say(
            f"  warmed up {proc.name}: {result.ok} requests at c={concurrency}"
            + (f", {result.errors} errors" if result.errors else "")
        )

    def measure(
        self, proc: Proc, url: str, body: Path, concurrency: int, seconds: float
    ) -> dict[str, Any]:
        """One point: wrk for ``seconds`` at ``concurrency``, then memory and batch counters."""
        before = batch_counters(proc.url)
        t0 = time.monotonic()
        result = run_wrk(url, body, concurrency, seconds)
        wall = time.monotonic() - t0
        memory = memory_of(proc.pid)
        row: dict[str, Any] = {
            "concurrency": concurrency,
            **result.as_dict(),
            "rss_peak_mb": round(memory.hwm_mb, 1),
            "rss_end_mb": round(memory.rss_mb, 1),
            "pss_end_mb": round(memory.pss_mb, 1),
        }
        row.update(batch_stats(before, batch_counters(proc.url), wall))
        if result.errors:
            self.say(f"  !! {result.errors} errors: {result.error_messages or result.statuses}")
        return row

    def point_line(self, name: str, row: dict[str, Any]) -> str:
        batch = f", mean batch {row['mean_batch']}" if "mean_batch" in row else ""
        busy = f", model busy {row['model_busy']:.0%}" if "model_busy" in row else ""
        return (
            f"  {name} c={row['concurrency']:>2}: {row['rps']:8.1f} req/s  p50 {row['p50_ms']} ms"
            f"  p99 {row['p99_ms']} ms  errors {row['errors']}  RSS {row['rss_end_mb']:.0f} MB"
            f" (peak {row['rss_peak_mb']:.0f}){batch}{busy}"
        )

    def run(self, sections: Mapping[str, Callable[[Bench], None]]) -> None:
        """Run each section of the plan, stopping every process it started after it."""
        for name in self.plan.sections:
            self.say(f"== {name}")
            try:
                sections[name](self)
            except (BenchError, subprocess.SubprocessError, RuntimeError, OSError, ValueError) as e:
                # One section failing must not cost the others: report it and go on.
                traceback.print_exc()
                self.say(f"!! section {name} failed: {e}")
                self.results["failures"].append({"section": name, "error": str(e)[:2000]})
            finally:
                stop_all()


def machine_facts(plan: Plan) -> dict[str, Any]:
    def version(*names: str) -> str:
        for name in names:
            try:
                return importlib.metadata.version(name)
            except importlib.metadata.PackageNotFoundError:
                continue
        return "?"

    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory_gb = 0.0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory_gb = int(line.split()[1]) / 1024 / 1024
    except OSError:
        pass
    wrk = subprocess.run(
        ["dpkg-query", "-W", "-f", "${Version}", "wrk"], capture_output=True, text=True, check=False
    ).stdout.strip()
    return {
        "command": plan.command,
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "mode": "quick" if plan.quick else "full",
        "nproc": len(os.sched_getaffinity(0)),
        "cpu": cpu,
        "memory_gb": round(memory_gb, 1),
        "python": platform.python_version(),
        "tensorflow": version("tensorflow-cpu", "tensorflow"),
        "twisted": version("twisted"),
        "klein": version("klein"),
        "wrk": wrk or "?",
        "loadavg_start": [round(x, 2) for x in os.getloadavg()],
        "duration": plan.duration,
        "warmup_seconds": plan.warmup_seconds,
        "duration_factors": {
            m: 1 if plan.quick else bench_models.MODELS[m].duration_factor for m in plan.models
        },
        "concurrencies": list(plan.concurrencies),
        "threads": list(plan.threads),
        "models": list(plan.models),
        "sections": list(plan.sections),
        "batching_parameters": {str(t): batching_file(t) for t in plan.threads},
    }
