"""The ``grpc`` section of ``scripts/bench``: TF Serving's gRPC API against our own REST JSON.

One kleinserve per model (batching on, one batch thread, the http section's batching file)
serves both APIs; at each concurrency the same image is sent as a REST JSON body (wrk) and
as a gRPC ``PredictRequest`` with ``tensor_content`` (this file's ``load``). Each point
records requests/s, p50/p99, the request's bytes, the server's CPU time per request (from
``/proc/PID/stat``) and, for gRPC, the load generator's own CPU per request, since it shares
the machine's two cores with the server.

The gRPC load generator is ``grpc.aio`` on one channel with C calls in flight. It sends the
serialized request as raw bytes and keeps the answer as raw bytes (no protobuf work per
call), the way wrk sends a fixed body: what it measures is the server.

Children (run by the section, each its own process):

    python -m scripts.benchmarks.sections.grpc payload MODEL OUT
        write MODEL's PredictRequest to OUT
    python -m scripts.benchmarks.sections.grpc load TARGET FILE C S
        C calls in flight for S seconds; prints one JSON line
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from harness.ports import LOOPBACK, free_port
from harness.processes import start
from harness.twistd import REPO
from scripts.benchmarks import models as bench_models
from scripts.benchmarks.procs import VENV_BIN, memory_of, run_wrk
from scripts.benchmarks.runner import Bench

PREDICT = "/tensorflow.serving.PredictionService/Predict"


def write_payload(model: str, out: Path) -> int:
    """The same image as the REST body (``bench_models.write_body``), as a PredictRequest."""
    import numpy as np
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2

    spec = bench_models.MODELS[model]
    rng = np.random.default_rng(bench_models.SEED)
    image = np.round(rng.random(spec.image_shape), 4).astype(np.float32)[None]
    request = predict_pb2.PredictRequest()
    request.model_spec.name = model
    request.inputs["image"].CopyFrom(tf.make_tensor_proto(image))
    data = request.SerializeToString()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(data)
    return len(data)


async def load(target: str, payload: bytes, concurrency: int, seconds: float) -> dict[str, Any]:
    import grpc

    options = [("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)]
    latencies: list[float] = []
    errors: dict[str, int] = {}
    answer_bytes = 0
    async with grpc.aio.insecure_channel(target, options=options) as channel:
        call = channel.unary_unary(PREDICT)  # bytes in, bytes out
        await call(payload, timeout=120)  # connected and answering before the clock starts
        loop = asyncio.get_running_loop()
        cpu0 = resource.getrusage(resource.RUSAGE_SELF)
        started = loop.time()
        stop = started + seconds

        async def worker() -> None:
            nonlocal answer_bytes
            while loop.time() < stop:
                t0 = time.perf_counter()
                try:
                    answer = await call(payload, timeout=120)
                except grpc.aio.AioRpcError as e:
                    errors[e.code().name] = errors.get(e.code().name, 0) + 1
                    continue
                latencies.append(time.perf_counter() - t0)
                answer_bytes = len(answer)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = loop.time() - started
        cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    latencies.sort()
    ok = len(latencies)

    def pct(p: float) -> float | None:
        return round(latencies[min(ok - 1, int(p * ok))] * 1000, 2) if ok else None

    cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    return {
        "ok": ok,
        "errors": sum(errors.values()),
        "error_codes": errors,
        "seconds": round(wall, 2),
        "rps": round(ok / wall, 1) if wall else 0.0,
        "p50_ms": pct(0.50),
        "p99_ms": pct(0.99),
        "client_cpu_ms_per_request": round(cpu * 1000 / ok, 3) if ok else None,
        "answer_bytes": answer_bytes,
    }


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run(bench: Bench) -> None:
    """Start one server per model and measure REST JSON and gRPC at each concurrency."""
    for model in bench.plan.models:
        body = bench.body(model)
        payload = bench_models_cache() / "bodies" / f"{model}.grpc"
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "scripts.benchmarks.sections.grpc",
                "payload",
                model,
                str(payload),
            ],
            cwd=REPO,
            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"writing the gRPC payload failed:\n{done.stderr[-2000:]}")
        sizes = {
            "rest_request_bytes": body.stat().st_size,
            "grpc_request_bytes": payload.stat().st_size,
        }
        bench.say(
            f"  {model}: REST body {sizes['rest_request_bytes']} B, gRPC request {sizes['grpc_request_bytes']} B"
        )
        port, grpc_port = free_port(), free_port()
        command = [
            str(VENV_BIN / "twistd"), "-n", "--pidfile=", "--logfile=-", "inference",
            f"--model_name={model}", f"--model_base_path={bench.model(model)}",
            f"--listen=tcp:{port}:interface={LOOPBACK}", f"--grpc_listen={LOOPBACK}:{grpc_port}",
            "--enable_batching", f"--batching_parameters_file={bench.batching_path(1)}",
        ]  # fmt: skip
        proc = start(f"kleinserve-{model}-grpc", command, port, bench.logs)
        try:
            bench.say(f"  {proc.name} ready in {proc.wait_ready():.1f} s (pid {proc.pid})")
            url = f"{proc.url}/v1/models/{model}:predict"
            bench.check_predict(proc, model, body)
            bench.warm_up(proc, url, body)
            target = f"{LOOPBACK}:{grpc_port}"
            _grpc_load(target, payload, 8, bench.plan.warmup_seconds)  # warm the gRPC path too
            for concurrency in bench.plan.concurrencies:
                seconds = bench.plan.seconds_for(model)
                for api in ("rest", "grpc"):
                    before = cpu_seconds(proc.pid)
                    if api == "rest":
                        result = run_wrk(url, body, concurrency, seconds).as_dict()
                    else:
                        result = _grpc_load(target, payload, concurrency, seconds)
                    used = cpu_seconds(proc.pid) - before
                    row = {
                        "model": model,
                        "api": api,
                        "concurrency": concurrency,
                        **result,
                        **sizes,
                        "server_cpu_ms_per_request": round(used * 1000 / result["ok"], 3)
                        if result["ok"]
                        else None,
                        "rss_end_mb": round(memory_of(proc.pid).rss_mb, 1),
                    }
                    bench.results.setdefault("grpc", []).append(row)
                    client = (
                        f", load generator {row['client_cpu_ms_per_request']} ms CPU/req"
                        if api == "grpc"
                        else ""
                    )
                    bench.say(
                        f"  {model} {api:4} c={concurrency:>2}: {row['rps']:8.1f} req/s  "
                        f"p50 {row['p50_ms']} ms  p99 {row['p99_ms']} ms  errors {row['errors']}  "
                        f"server {row['server_cpu_ms_per_request']} ms CPU/req{client}"
                    )
        finally:
            proc.stop()


def bench_models_cache() -> Path:
    return REPO / ".cache" / "bench"


def _grpc_load(target: str, payload: Path, concurrency: int, seconds: float) -> dict[str, Any]:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "scripts.benchmarks.sections.grpc",
            "load",
            target,
            str(payload),
            str(concurrency),
            str(seconds),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=seconds + 300,
        check=False,
    )
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"the gRPC load generator failed:\n{done.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(lines[-1])
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    payload = commands.add_parser("payload")
    payload.add_argument("model", choices=sorted(bench_models.MODELS))
    payload.add_argument("out", type=Path)
    run = commands.add_parser("load")
    run.add_argument("target")
    run.add_argument("payload", type=Path)
    run.add_argument("concurrency", type=int)
    run.add_argument("seconds", type=float)
    args = parser.parse_args(argv)
    if args.command == "payload":
        print(write_payload(args.model, args.out))
    else:
        data = args.payload.read_bytes()
        print(json.dumps(asyncio.run(load(args.target, data, args.concurrency, args.seconds))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
