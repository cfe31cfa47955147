"""The ``front`` section of ``scripts/bench``: front processes (``--http_processes=N``) against
one process and against Triton, in one run.

Servers, each with every model, side by side: kleinserve with ``--http_processes`` 1, 2 and 3
(batching on, one batch thread, the http section's batching file), and a real Triton server
(PyTriton's ``tritonserver``, as in the ``triton`` section) with its dynamic batcher under
the same limits. At each concurrency wrk sends each body to each server in turn (the others
idle): TF Serving's ``:predict`` JSON (kleinserve only) and the Open Inference Protocol's v2
JSON (all of them; Triton speaks no TF Serving JSON). Every row records requests/s, p50/p99
and the CPU seconds per request of the server's main process and of its front processes
(kleinserve) or of the whole process tree (Triton), so a shortfall can be told apart: the main
process (TensorFlow, the queues) or the front doors (HTTP, JSON). Each server's memory is read
once warm (RSS and PSS of its process tree).
"""

from __future__ import annotations

import os
from pathlib import Path

from harness.ports import LOOPBACK, free_port
from harness.processes import Proc, start
from scripts.benchmarks.plan import CACHE
from scripts.benchmarks.procs import VENV_BIN, BenchError, memory_of, process_tree, run_wrk
from scripts.benchmarks.runner import Bench
from scripts.benchmarks.sections.triton import PYTRITON, write_models_config, write_v2_bodies

PROCESSES = (1, 2, 3)


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of one process so far (0 if it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_split(pid: int) -> dict[str, float]:
    """CPU seconds so far of a server's main process (``pid``) and of the rest of its tree."""
    tree = process_tree(pid)
    return {
        "main": cpu_seconds(pid),
        "children": sum(cpu_seconds(p) for p in tree if p != pid),
    }


def run(bench: Bench) -> None:
    if not PYTRITON.exists():
        raise BenchError(f"{PYTRITON} is missing")
    folders = {model: bench.model(model) for model in bench.plan.models}
    bodies = {}
    for model in bench.plan.models:
        v2_json = write_v2_bodies(model)["v2-json"]
        bodies[model] = {
            "tfserving-json": (bench.body(model), "application/json", {}),
            "v2-json": v2_json,
        }
    config = write_models_config(CACHE / "front-section.config", folders)
    servers: dict[str, Proc] = {}
    try:
        for n in PROCESSES:
            port = free_port()
            servers[f"kleinserve N={n}"] = start(
                f"kleinserve-front-{n}",
                [
                    str(VENV_BIN / "twistd"), "-n", "--pidfile=", "--logfile=-", "inference",
                    f"--model_config_file={config}", "--port=0",
                    f"--listen=tcp:{port}:interface={LOOPBACK}", f"--http_processes={n}",
                    "--enable_batching", f"--batching_parameters_file={bench.batching_path(1)}",
                ],
                port,
                bench.logs,
            )  # fmt: skip
        triton_port, triton_grpc = free_port(), free_port()
        bench.say("  starting Triton (PyTriton; its environment is made on first use)")
        servers["triton"] = start(
            "triton-front",
            [
                str(PYTRITON), "scripts.benchmarks.triton_peer",
                f"--http-port={triton_port}", f"--grpc-port={triton_grpc}",
                *(f"{m}={folder}" for m, folder in folders.items()),
            ],
            triton_port,
            bench.logs,
        )  # fmt: skip
        for name, proc in servers.items():
            if name == "triton":
                took = max(  # Triton's /v2/health/ready is 200 before a model is bound
                    proc.wait_ready(f"/v2/models/{model}/ready", timeout=900)
                    for model in bench.plan.models
                )
            else:
                took = proc.wait_ready()
            bench.say(f"  {name} ready in {took:.1f} s (pid {proc.pid})")
        _measure(bench, servers, bodies)
    finally:
        for proc in servers.values():
            proc.stop()


def _url(name: str, proc: Proc, model: str, encoding: str) -> str:
    if encoding == "v2-json":
        return f"{proc.url}/v2/models/{model}/infer"
    return f"{proc.url}/v1/models/{model}:predict"


def _measure(bench: Bench, servers: dict[str, Proc], bodies: dict) -> None:
    for model in bench.plan.models:
        for encoding, (body, content_type, headers) in bodies[model].items():
            for name, proc in servers.items():
                if name == "triton" and encoding != "v2-json":
                    continue
                url = _url(name, proc, model, encoding)
                check = run_wrk(url, body, 8, 3, content_type=content_type, headers=headers)
                if check.errors or not check.ok:
                    raise BenchError(f"{name} {model} {encoding}: {check.errors} errors")
        for name, proc in servers.items():  # warm, every front process has answered
            memory = memory_of(proc.pid)
            bench.results.setdefault("front_memory", []).append(
                {"model": model, "server": name, "rss_mb": round(memory.rss_mb, 1),
                 "pss_mb": round(memory.pss_mb, 1), "processes": memory.processes}
            )  # fmt: skip
        for concurrency in bench.plan.concurrencies:
            seconds = bench.plan.seconds_for(model)
            for encoding, (body, content_type, headers) in bodies[model].items():
                for name, proc in servers.items():
                    if name == "triton" and encoding != "v2-json":
                        continue
                    before = cpu_split(proc.pid)
                    result = run_wrk(
                        _url(name, proc, model, encoding), body, concurrency, seconds,
                        content_type=content_type, headers=headers,
                    ).as_dict()  # fmt: skip
                    after = cpu_split(proc.pid)
                    answered = max(1, result["ok"])
                    row = {
                        "model": model,
                        "server": name,
                        "encoding": encoding,
                        "concurrency": concurrency,
                        **result,
                        "main_cpu_ms": round(1000 * (after["main"] - before["main"]) / answered, 3),
                        "front_cpu_ms": round(
                            1000 * (after["children"] - before["children"]) / answered, 3
                        ),
                    }
                    bench.results.setdefault("front", []).append(row)
                    bench.say(
                        f"  {model} {encoding:14} {name:14} c={concurrency:>2}: "
                        f"{row['rps']:8.1f} req/s  p50 {row['p50_ms']} ms  p99 {row['p99_ms']} ms"
                        f"  cpu/req main {row['main_cpu_ms']} front {row['front_cpu_ms']} ms"
                        f"  errors {row['errors']}"
                    )
