"""The ``triton`` section of ``scripts/bench``: the Open Inference Protocol against Triton's own.

Two servers run side by side, each with every model: kleinserve (batching on, one batch
thread, the http section's batching file: batches of up to 64 rows, no timeout) and a real
Triton server (PyTriton's bundled ``tritonserver``, ``scripts/benchmarks/triton_peer.py``, in
PyTriton's own environment made by ``scripts/pytriton``), with its dynamic batcher under the
same limits. Both serve the models under the same names, input ``image`` and output
``probabilities``, so the very same v2 request bodies go to both:

* v2 binary: a JSON header with ``binary_data_size`` and the image's float32 bytes after it,
  the output asked for as binary data (``Inference-Header-Content-Length``);
* v2 JSON: the image as a JSON list of numbers, the output as JSON.

At each concurrency wrk sends each body to each server in turn (one server idles while the
other is measured); every row records requests/s and p50/p99. The image is the http section's.
"""

from __future__ import annotations

import json
from pathlib import Path

from harness.ports import LOOPBACK, free_port
from harness.processes import start
from harness.twistd import REPO
from scripts.benchmarks import models as bench_models
from scripts.benchmarks.plan import CACHE
from scripts.benchmarks.procs import VENV_BIN, BenchError, run_wrk
from scripts.benchmarks.runner import Bench

PYTRITON = REPO / "scripts" / "pytriton"
HEADER_LENGTH = "Inference-Header-Content-Length"


def write_v2_bodies(model: str) -> dict[str, tuple[Path, str, dict[str, str]]]:
    """The model's v2 binary and JSON bodies: (path, content type, extra headers) by encoding."""
    import numpy as np

    spec = bench_models.MODELS[model]
    rng = np.random.default_rng(bench_models.SEED)  # the same image as the http section's body
    image = np.round(rng.random(spec.image_shape), 4).astype(np.float32)[None]
    folder = CACHE / "bodies"
    folder.mkdir(parents=True, exist_ok=True)
    tensor = {"name": "image", "shape": list(image.shape), "datatype": "FP32"}
    data = image.astype("<f4").tobytes()
    header = json.dumps(
        {
            "inputs": [{**tensor, "parameters": {"binary_data_size": len(data)}}],
            "outputs": [{"name": "probabilities", "parameters": {"binary_data": True}}],
        },
        separators=(",", ":"),
    ).encode()
    binary = folder / f"{model}.v2.bin"
    binary.write_bytes(header + data)
    text = folder / f"{model}.v2.json"
    text.write_bytes(
        json.dumps(
            {
                "inputs": [{**tensor, "data": image.ravel().tolist()}],
                "outputs": [{"name": "probabilities", "parameters": {"binary_data": False}}],
            },
            separators=(",", ":"),
        ).encode()
    )
    return {
        "v2-binary": (binary, "application/octet-stream", {HEADER_LENGTH: str(len(header))}),
        "v2-json": (text, "application/json", {}),
    }


def write_models_config(path: Path, folders: dict[str, Path]) -> Path:
    """TF Serving's model config file serving each model of ``folders`` (name -> base path)."""
    path.write_text(
        "model_config_list {\n"
        + "".join(
            f'  config {{ name: "{m}" base_path: "{folder}" model_platform: "tensorflow" }}\n'
            for m, folder in folders.items()
        )
        + "}\n"
    )
    return path


def run(bench: Bench) -> None:
    if not PYTRITON.exists():
        raise BenchError(f"{PYTRITON} is missing")
    bodies = {model: write_v2_bodies(model) for model in bench.plan.models}
    folders = {model: bench.model(model) for model in bench.plan.models}
    config = write_models_config(CACHE / "triton-section.config", folders)
    port, triton_port, triton_grpc = free_port(), free_port(), free_port()
    ours = start(
        "kleinserve-v2",
        [
            str(VENV_BIN / "twistd"), "-n", "--pidfile=", "--logfile=-", "inference",
            f"--model_config_file={config}", "--port=0",
            f"--listen=tcp:{port}:interface={LOOPBACK}",
            "--enable_batching", f"--batching_parameters_file={bench.batching_path(1)}",
        ],
        port,
        bench.logs,
    )  # fmt: skip
    bench.say("  starting Triton (PyTriton; its environment is made on first use)")
    triton = start(
        "triton",
        [
            str(PYTRITON), "scripts.benchmarks.triton_peer",
            f"--http-port={triton_port}", f"--grpc-port={triton_grpc}",
            *(f"{m}={folder}" for m, folder in folders.items()),
        ],
        triton_port,
        bench.logs,
    )  # fmt: skip
    try:
        bench.say(f"  {ours.name} ready in {ours.wait_ready():.1f} s (pid {ours.pid})")
        took = max(  # Triton's /v2/health/ready is 200 before PyTriton has bound a model
            triton.wait_ready(f"/v2/models/{model}/ready", timeout=900)
            for model in bench.plan.models
        )
        bench.say(f"  {triton.name} ready in {took:.1f} s (pid {triton.pid})")
        servers = {"kleinserve": ours, "triton": triton}
        for model in bench.plan.models:
            for encoding, (body, content_type, headers) in bodies[model].items():
                for name, proc in servers.items():
                    url = f"{proc.url}/v2/models/{model}/infer"
                    check = run_wrk(
                        url, body, 4, 2, content_type=content_type, headers=headers
                    )  # it answers, and is warm
                    if check.errors:
                        raise BenchError(f"{name} {model} {encoding}: {check.errors} errors")
            for concurrency in bench.plan.concurrencies:
                seconds = bench.plan.seconds_for(model)
                for encoding, (body, content_type, headers) in bodies[model].items():
                    for name, proc in servers.items():
                        url = f"{proc.url}/v2/models/{model}/infer"
                        result = run_wrk(
                            url, body, concurrency, seconds, content_type=content_type,
                            headers=headers,
                        ).as_dict()  # fmt: skip
                        row = {
                            "model": model,
                            "server": name,
                            "encoding": encoding,
                            "concurrency": concurrency,
                            "request_bytes": body.stat().st_size,
                            **result,
                        }
                        bench.results.setdefault("triton", []).append(row)
                        bench.say(
                            f"  {model} {encoding:9} {name:10} c={concurrency:>2}: "
                            f"{row['rps']:8.1f} req/s  p50 {row['p50_ms']} ms  "
                            f"p99 {row['p99_ms']} ms  errors {row['errors']}"
                        )
    finally:
        triton.stop()
        ours.stop()
