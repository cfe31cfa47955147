"""kleinserve's benchmark: how close the server gets to its model, its HTTP stack and Flask.

Run through ``scripts/bench`` (which installs what it needs first):

    scripts/bench                       the full run (about 15 minutes on 2 cores), results in
                                        docs/benchmarks.md, .json and .png
    scripts/bench --quick               a smoke run (2 minutes for digits, 3 for both models):
                                        short points, concurrency 1 and 8; results in
                                        .cache/bench/last/
    scripts/bench --only http,empty --models digits --duration 20

Sections (``--only``), each a measurement of its own:

    inprocess  the model's signature called directly in a loop at batch 1, 8, 32, 64: the
               in-process limit (instances/s), and the time of one batch-1 call
    engine     64 submitters feeding service.batching.BatchingQueue on a real reactor and a
               real inference ThreadPool, no HTTP: batching off, and on with each --threads
    http       twistd -n inference, batching off and on, at each concurrency: requests/s,
               p50/p99 latency, errors, server RSS (peak and end), batches seen in /metrics
    grpc       one server, batching on: REST JSON (wrk) and TF Serving's gRPC Predict with
               tensor_content (scripts/bench_grpc.py) at each concurrency: requests/s,
               p50/p99, bytes per request, server CPU per request
    empty      an empty Klein route answering {} to the same bodies: the HTTP stack's ceiling
    flask      the digits model in Flask behind gunicorn -w 4 vs one kleinserve process:
               memory of all processes, and throughput at concurrency 64
    soak       kleinserve, batching on, digits, concurrency 64 for --soak seconds: RSS every
               5 s, and its growth

Load comes from ``wrk`` (one thread, C connections) on 127.0.0.1 only; wrk ends each run
with requests in flight, so a server that mishandles clients leaving shows as a failed point. Every number is printed as it is measured, and the
ratios that matter are printed at the end as "measured X = a / b". Nothing here asserts a
timing: a benchmark is not a test.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import re
import shlex
import signal
import subprocess
import sys
import time
import traceback
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_grpc  # noqa: E402
import bench_models  # noqa: E402
import bench_report  # noqa: E402
from bench_procs import (  # noqa: E402
    LOOPBACK,
    REPO,
    VENV_BIN,
    BenchError,
    Proc,
    batch_counters,
    batch_stats,
    free_port,
    memory_of,
    parse_wrk,
    run_wrk,
    start,
    stop_all,
    wrk_command,
)

SECTIONS = ("inprocess", "engine", "http", "grpc", "empty", "flask", "soak", "memory")
SCRIPTS = REPO / "scripts"
CACHE = REPO / ".cache" / "bench"
HEAVY_CONCURRENCY = 64  # the flask comparison, the soak and the engine's submitters
GUNICORN_WORKERS = 4


@dataclass(frozen=True)
class Plan:
    """What one run measures, and for how long; derived from the command line."""

    quick: bool
    models: tuple[str, ...]
    sections: tuple[str, ...]
    concurrencies: tuple[int, ...]
    threads: tuple[int, ...]  # num_batch_threads values to try with batching on
    duration: float  # seconds per measured point
    inprocess_seconds: float  # per batch size
    engine_warmup: float
    warmup_seconds: float
    soak_seconds: float
    soak_interval: float
    inprocess_sizes: tuple[int, ...]
    out: Path
    plot: Path
    command: str

    @property
    def json_path(self) -> Path:
        return self.out.with_suffix(".json")

    def seconds_for(self, model: str) -> float:
        """Seconds of one point of ``model``'s servers and engine runs (a quick run: --duration)."""
        return self.duration * (1 if self.quick else bench_models.MODELS[model].duration_factor)


@dataclass(frozen=True)
class Setup:
    """One server configuration of the http section."""

    key: str  # "off", "on", "on-2t"
    threads: int | None  # None: batching off

    @property
    def label(self) -> str:
        if self.threads is None:
            return "batching off"
        return f"batching on, {self.threads} thread{'s' if self.threads > 1 else ''}"


def batching_file(threads: int) -> str:
    """The --batching_parameters_file the bench uses (TF Serving's text-proto)."""
    return (
        "max_batch_size { value: 64 }\n"
        "batch_timeout_micros { value: 0 }\n"
        "max_enqueued_batches { value: 64 }\n"
        f"num_batch_threads {{ value: {threads} }}\n"
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
        """Run scripts/bench_engine.py in a process of its own; its last stdout line is JSON."""
        log = self.logs / f"{log_name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("w") as err:
            done = subprocess.run(
                [sys.executable, str(SCRIPTS / "bench_engine.py"), *args],
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
            raise BenchError(
                f"bench_engine.py {' '.join(args)} failed ({done.returncode}):\n{tail}"
            )
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

    # -- sections --------------------------------------------------------------------------------

    def run(self) -> None:
        sections = {
            "inprocess": self.inprocess,
            "engine": self.engine,
            "http": self.http,
            "grpc": lambda: bench_grpc.run_section(self),
            "empty": self.empty,
            "flask": self.flask,
            "soak": self.soak,
            "memory": self.memory,
        }
        for name in self.plan.sections:
            self.say(f"== {name}")
            try:
                sections[name]()
            except (BenchError, subprocess.SubprocessError, RuntimeError, OSError, ValueError) as e:
                # One section failing must not cost the others: report it and go on.
                traceback.print_exc()
                self.say(f"!! section {name} failed: {e}")
                self.results["failures"].append({"section": name, "error": str(e)[:2000]})
            finally:
                stop_all()

    def inprocess(self) -> None:
        sizes = ",".join(str(s) for s in self.plan.inprocess_sizes)
        for model in self.plan.models:
            base = self.model(model)
            self.say(f"  {model}: signature in a loop, batch sizes {sizes}")
            result = self.child(
                [
                    "inprocess",
                    str(base),
                    "--seconds",
                    str(self.plan.inprocess_seconds),
                    "--sizes",
                    sizes,
                    "--min-calls",
                    "2" if self.plan.quick else "5",
                ],
                f"inprocess-{model}",
                # bench_engine.py bounds each size to 10 x its seconds + 30 s.
                timeout=180
                + (10 * self.plan.inprocess_seconds + 40) * len(self.plan.inprocess_sizes),
            )
            for size, row in result["sizes"].items():
                self.say(
                    f"  {model} batch {size:>2}: {row['instances_per_s']:9.1f} instances/s, "
                    f"{row['p50_ms']} ms per call ({row['calls']} calls)"
                )
            self.say(
                f"  {model} in-process limit: {result['best_instances_per_s']} instances/s "
                f"at batch {result['best_size']}"
            )
            self.results["inprocess"][model] = result

    def engine(self) -> None:
        for model in self.plan.models:
            base = self.model(model)
            runs: dict[str, Any] = {}
            for setup in self.setups():
                args = ["engine", str(base), "--seconds", str(self.plan.seconds_for(model))]
                args += ["--warmup", str(self.plan.engine_warmup)]
                args += ["--submitters", str(HEAVY_CONCURRENCY)]
                if setup.threads is not None:
                    args += ["--batching-file", str(self.batching_path(setup.threads))]
                result = self.child(
                    args,
                    f"engine-{model}-{setup.key}",
                    timeout=300 + 2 * self.plan.seconds_for(model),
                )
                result["label"] = setup.label
                runs[setup.key] = result
                self.say(
                    f"  {model} {setup.label}, {HEAVY_CONCURRENCY} submitters: "
                    f"{result['instances_per_s']} instances/s, mean batch {result['mean_batch']}"
                    f" {result['batch_sizes']}"
                    + (
                        f", {result['errors']} errors ({result['error']})"
                        if result["errors"]
                        else ""
                    )
                )
            self.results["engine"][model] = runs

    def http(self) -> None:
        for model in self.plan.models:
            body = self.body(model)
            for setup in self.setups():
                proc = self.start_kleinserve(model, setup)
                try:
                    ready = proc.wait_ready()
                    self.say(f"  {proc.name} ready in {ready:.1f} s (pid {proc.pid})")
                    url = f"{proc.url}/v1/models/{model}:predict"
                    self.check_predict(proc, model, body)
                    self.warm_up(proc, url, body)
                    for concurrency in self.plan.concurrencies:
                        seconds = self.plan.seconds_for(model)
                        row = self.measure(proc, url, body, concurrency, seconds)
                        row.update(model=model, config=setup.key, label=setup.label)
                        self.results["http"].append(row)
                        self.say(self.point_line(f"{model} {setup.key}", row))
                finally:
                    proc.stop()

    def empty(self) -> None:
        port = free_port()
        command = [sys.executable, str(SCRIPTS / "bench_empty_app.py"), str(port)]
        proc = start("empty-klein", command, port, self.logs)
        try:
            ready = proc.wait_ready()
            self.say(f"  empty Klein route ready in {ready:.1f} s (pid {proc.pid})")
            url = f"{proc.url}/v1/models/empty:predict"
            for model in self.plan.models:
                body = self.body(model)
                self.warm_up(proc, url, body)
                for concurrency in self.plan.concurrencies:
                    row = self.measure(proc, url, body, concurrency, self.plan.duration)
                    row.update(model=model, config="empty", label="empty Klein route")
                    self.results["http"].append(row)
                    self.say(self.point_line(f"empty route, {model} body", row))
        finally:
            proc.stop()

    def flask(self) -> None:
        """Flask + gunicorn -w 4 vs one kleinserve process: memory of everything, throughput."""
        model, concurrency = "digits", HEAVY_CONCURRENCY
        base, body = self.model(model), self.body(model)
        results: dict[str, Any] = {"concurrency": concurrency, "workers": GUNICORN_WORKERS}

        proc = self.start_kleinserve(model, Setup("on", 1))
        try:
            proc.wait_ready()
            url = f"{proc.url}/v1/models/{model}:predict"
            self.check_predict(proc, model, body)
            self.warm_up(proc, url, body)
            row = self.measure(proc, url, body, concurrency, self.plan.duration)
            memory = memory_of(proc.pid)
            results["kleinserve"] = {**row, **_memory_fields(memory)}
            self.say(self.point_line("kleinserve (batching on)", row))
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
            str(SCRIPTS),
            "--timeout",
            "120",
            "--graceful-timeout",
            "5",
            "bench_flask_app:app",
        ]
        proc = start("flask-gunicorn", command, port, self.logs, BENCH_MODEL_DIR=str(base / "1"))
        try:
            ready = wait_for_workers(proc, GUNICORN_WORKERS)
            self.say(f"  gunicorn -w {GUNICORN_WORKERS}: all workers ready in {ready:.1f} s")
            url = f"{proc.url}/v1/models/{model}:predict"
            self.check_predict(proc, model, body)
            self.warm_up(proc, url, body)
            row = self.measure(proc, url, body, concurrency, self.plan.duration)
            memory = memory_of(proc.pid)
            results["flask"] = {**row, **_memory_fields(memory)}
            self.say(
                self.point_line(f"flask+gunicorn ({memory.processes} processes, RSS summed)", row)
            )
        finally:
            proc.stop()
        self.results["flask"] = results

    def soak(self) -> None:
        """Batching on, digits, concurrency 64 for --soak seconds; RSS every interval."""
        model, concurrency = "digits", HEAVY_CONCURRENCY
        body = self.body(model)
        plan = self.plan
        proc = self.start_kleinserve(model, Setup("on", 1))
        try:
            proc.wait_ready()
            url = f"{proc.url}/v1/models/{model}:predict"
            self.check_predict(proc, model, body)
            self.warm_up(proc, url, body)
            command = wrk_command(url, body, concurrency, plan.soak_seconds)
            samples: list[dict[str, float]] = []
            t0 = time.monotonic()
            with subprocess.Popen(command, stdout=subprocess.PIPE, text=True) as load:
                try:
                    for _ in range(int(plan.soak_seconds / plan.soak_interval) + 2):
                        rss = memory_of(proc.pid).rss_mb
                        samples.append(
                            {"t": round(time.monotonic() - t0, 1), "rss_mb": round(rss, 1)}
                        )
                        self.say(f"  soak t={samples[-1]['t']:5.1f} s: RSS {rss:.1f} MB")
                        if load.poll() is not None:
                            break
                        deadline = time.monotonic() + plan.soak_interval
                        while load.poll() is None and time.monotonic() < deadline:
                            time.sleep(0.1)
                    output, _ = load.communicate(timeout=plan.soak_seconds + 120)
                finally:
                    if load.poll() is None:
                        load.kill()
            result = parse_wrk(output)
            end = memory_of(proc.pid)
            if time.monotonic() - t0 > samples[-1]["t"] + 1:  # else the last sample is the end
                samples.append(
                    {"t": round(time.monotonic() - t0, 1), "rss_mb": round(end.rss_mb, 1)}
                )
            first, last = samples[0]["rss_mb"], samples[-1]["rss_mb"]
            middle = samples[len(samples) // 2]["rss_mb"]
            self.results["soak"] = {
                "model": model,
                "concurrency": concurrency,
                "seconds": plan.soak_seconds,
                "interval": plan.soak_interval,
                "samples": samples,
                "growth_pct": round(100 * (last - first) / first, 2) if first else None,
                "second_half_growth_pct": round(100 * (last - middle) / middle, 2)
                if middle
                else None,
                "rss_peak_mb": round(end.hwm_mb, 1),
                **result.as_dict(),
            }
            self.say(
                f"  soak: RSS {first:.1f} -> {last:.1f} MB ({self.results['soak']['growth_pct']:+.2f} %; "
                f"second half {self.results['soak']['second_half_growth_pct']:+.2f} %), "
                f"{result.rps:.1f} req/s, {result.errors} errors"
            )
        finally:
            proc.stop()

    def memory(self) -> None:
        """RSS of a server before and after 20 predicts of 60 MB bodies (scripts/request_memory.py)."""
        requests, megabytes = (4, 60.0) if self.plan.quick else (20, 60.0)
        command = [
            str(VENV_BIN / "python"),
            str(REPO / "scripts" / "request_memory.py"),
            f"--requests={requests}",
            f"--mb={megabytes:g}",
        ]
        done = subprocess.run(command, capture_output=True, text=True, timeout=1800, check=False)
        for line in done.stdout.splitlines():
            self.say(f"  {line}")
        last = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""
        match = re.match(
            r"RSS before (\d+) MiB, after \d+ x [\d.]+ MB (\d+) MiB, [\d.]+ s later (\d+) MiB", last
        )
        if done.returncode != 0 or match is None:
            raise BenchError(
                f"request_memory.py failed ({done.returncode}):\n{done.stderr[-2000:]}"
            )
        before, after, settled = (int(x) for x in match.groups())
        self.results["memory"] = {
            "requests": requests,
            "body_mb": megabytes,
            "rss_before_mib": before,
            "rss_after_mib": after,
            "rss_settled_mib": settled,
            "ratio_after": round(after / before, 3),
            "ratio_settled": round(settled / before, 3),
        }


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


def parse_args(argv: list[str] | None) -> Plan:
    parser = argparse.ArgumentParser(
        prog="scripts/bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Sections: " + ", ".join(SECTIONS),
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: 2 s points, concurrency 1 and 8, one batch thread, 10 s soak",
    )
    parser.add_argument(
        "--duration",
        type=float,
        help="seconds per measured point (default 10; quick 2); MobileNetV2's last twice as long",
    )
    parser.add_argument("--models", default="digits,mobilenet", help="default: %(default)s")
    parser.add_argument("--only", default=",".join(SECTIONS), help="sections to run (default: all)")
    parser.add_argument(
        "--concurrency",
        help="concurrencies of the http and empty sections (default 1,8,64; quick 1,8)",
    )
    parser.add_argument(
        "--threads", help="num_batch_threads values to try with batching on (default 1,2; quick 1)"
    )
    parser.add_argument(
        "--soak", type=float, help="seconds of the soak section (default 60; quick 10)"
    )
    parser.add_argument(
        "--out",
        type=Path,
        help="markdown report; the JSON goes beside it (default: docs/benchmarks.md for a full run "
        "of everything, else .cache/bench/last/benchmarks.md, so smoke runs never overwrite docs/)",
    )
    parser.add_argument("--plot", type=Path, help="PNG plot (default: beside --out)")
    args = parser.parse_args(argv)

    def names(text: str, known: tuple[str, ...], what: str) -> tuple[str, ...]:
        chosen = tuple(n.strip() for n in text.split(",") if n.strip())
        unknown = [n for n in chosen if n not in known]
        if unknown or not chosen:
            parser.error(
                f"--{what}: unknown {', '.join(unknown) or 'empty list'}; choose from {', '.join(known)}"
            )
        return tuple(n for n in known if n in chosen)  # canonical order

    def numbers(text: str, what: str) -> tuple[int, ...]:
        try:
            values = tuple(sorted({int(n) for n in text.split(",") if n.strip()}))
        except ValueError:
            parser.error(f"--{what} takes whole numbers separated by commas, not {text!r}")
        if not values or values[0] < 1:
            parser.error(f"--{what} needs numbers of at least 1")
        return values

    models = names(args.models, tuple(bench_models.MODELS), "models")
    sections = names(args.only, SECTIONS, "only")
    quick = args.quick
    duration = args.duration or (2.0 if quick else 10.0)
    if duration <= 0:
        parser.error("--duration must be positive")
    soak = args.soak or (10.0 if quick else 60.0)
    everything = (
        not quick and set(sections) == set(SECTIONS) and set(models) == set(bench_models.MODELS)
    )
    out = args.out or (
        REPO / "docs" / "benchmarks.md" if everything else CACHE / "last" / "benchmarks.md"
    )
    command = shlex.join(["scripts/bench", *(sys.argv[1:] if argv is None else argv)])
    return Plan(
        quick=quick,
        models=models,
        sections=sections,
        concurrencies=numbers(args.concurrency or ("1,8" if quick else "1,8,64"), "concurrency"),
        threads=numbers(args.threads or ("1" if quick else "1,2"), "threads"),
        duration=duration,
        inprocess_seconds=1.0 if quick else max(1.0, duration / 2),
        engine_warmup=1.0 if quick else 3.0,
        warmup_seconds=1 if quick else 3,
        soak_seconds=soak,
        soak_interval=5.0,
        inprocess_sizes=(1, 8, 32, 64),
        out=out.resolve(),
        plot=(args.plot or out.with_suffix(".png")).resolve(),
        command=command,
    )


def main(argv: list[str] | None = None) -> int:
    plan = parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupted)  # unwinds through stop_all below, as Ctrl-C does
    bench = Bench(plan)
    bench.say(
        f"kleinserve bench ({'quick' if plan.quick else 'full'}): models {','.join(plan.models)}; "
        f"sections {','.join(plan.sections)}; concurrency {','.join(map(str, plan.concurrencies))}; "
        f"{plan.duration:g} s per point; load average {os.getloadavg()[0]:.2f}"
    )
    try:
        bench.run()
    except KeyboardInterrupt:
        bench.say("interrupted; every started process is stopped, no report written")
        return 130
    finally:
        stop_all()
    results = bench.results
    results["meta"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    results["meta"]["seconds"] = round(time.monotonic() - bench.started, 1)
    results["ratios"] = bench_report.ratios(results)
    print()
    print("\n".join(bench_report.ratio_lines(results["ratios"])))
    print()
    print(bench_report.http_table(results))
    plan.out.parent.mkdir(parents=True, exist_ok=True)
    if bench_report.plot(results, plan.plot):
        results["meta"]["plot"] = os.path.relpath(plan.plot, plan.out.parent)
    plan.json_path.write_text(json.dumps(results, indent=2) + "\n")
    plan.out.write_text(bench_report.markdown(results))
    bench.say(f"wrote {_shown(plan.out)}, {_shown(plan.json_path)}, {_shown(plan.plot)}")
    if results["failures"]:
        bench.say(f"{len(results['failures'])} section(s) failed: see above")
        return 1
    return 0


def _interrupted(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _shown(path: Path) -> str:
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


if __name__ == "__main__":
    sys.exit(main())
