"""Image uploads to MobileNetV2: images/s over HTTP vs the in-process decode + model limit.

Run as ``scripts/bench images [--duration 20]`` after ``scripts/bench``
has installed wrk and exported the model once (it reuses ``.cache/bench/models/mobilenet``).
Writes ``docs/benchmarks-images.md``. One 224×224 JPEG is sent with ``wrk`` as the raw body
(``Content-Type: image/jpeg``) to ``:classify_image`` at concurrency 8 and 64; the limit is
this process decoding the same JPEG with Pillow and calling the model, at batch 1 and 8.
Traffic goes to 127.0.0.1 only. Nothing here asserts a timing.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from PIL import Image

from harness.ports import LOOPBACK, free_port
from harness.processes import start, stop_all
from harness.twistd import REPO
from scripts.benchmarks.models import ensure_model
from scripts.benchmarks.plan import CACHE
from scripts.benchmarks.procs import run_wrk


def make_jpeg(path: Path) -> bytes:
    """A 224×224 photo-like JPEG (smooth gradients, shapes, mild noise), quality 90."""
    rng = np.random.default_rng(3)
    y, x = np.mgrid[0:224, 0:224].astype(np.float32)
    image = np.stack([x / 224 * 255, y / 224 * 255, (x + y) / 448 * 255], axis=-1)
    image[60:160, 70:150] = [200, 40, 40]
    image += rng.normal(0, 6, image.shape)
    data = io.BytesIO()
    Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(data, "JPEG", quality=90)
    path.write_bytes(data.getvalue())
    return data.getvalue()


def json_size_of_same_image() -> int:
    """Bytes of the TF Serving JSON body for one 224×224×3 float image (4 decimals)."""
    pixels = np.random.default_rng(3).random((1, 224, 224, 3)).round(4)
    return len(('{"instances": ' + str(pixels.tolist()) + "}").encode())


def in_process_limit(base: Path, jpeg: bytes, seconds: float) -> dict[int, float]:
    """Images/s decoding the JPEG (Pillow, as the server) and calling the model, per batch size."""
    import tensorflow as tf

    serve = tf.saved_model.load(str(base / "1")).signatures["serving_default"]

    def decode() -> np.ndarray:
        with Image.open(io.BytesIO(jpeg)) as img:
            return np.asarray(img.convert("RGB"), np.float32) / np.float32(255)

    serve(image=tf.constant(np.stack([decode()])))  # first call: tracing, not measured
    rates = {}
    for batch in (1, 8):
        done, started = 0, time.monotonic()
        while time.monotonic() - started < seconds:
            serve(image=tf.constant(np.stack([decode() for _ in range(batch)])))
            done += batch
        rates[batch] = done / (time.monotonic() - started)
        print(
            f"  in-process decode + model, batch {batch}: {rates[batch]:.1f} images/s", flush=True
        )
    return rates


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/bench images", description=__doc__)
    parser.add_argument("--duration", type=float, default=20.0, help="seconds per point")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks-images.md")
    args = parser.parse_args(argv)
    logs = CACHE / "logs"
    base = ensure_model("mobilenet", CACHE, logs / "export-mobilenet.log")
    jpeg_path = CACHE / "bodies" / "photo.jpg"
    jpeg_path.parent.mkdir(parents=True, exist_ok=True)
    jpeg = make_jpeg(jpeg_path)
    json_bytes = json_size_of_same_image()
    print(
        f"  JPEG {len(jpeg)} bytes; the same image as a JSON float array {json_bytes} bytes",
        flush=True,
    )
    limits = in_process_limit(base, jpeg, args.duration / 2)
    limit = max(limits.values())

    batching = CACHE / "batching-images.txt"
    batching.write_text(
        "max_batch_size { value: 8 }\nmax_enqueued_batches { value: 64 }\nnum_batch_threads { value: 2 }\n"
    )
    port = free_port()
    command = [
        str(REPO / ".venv" / "bin" / "twistd"), "-n", "--pidfile=", "--logfile=-", "inference",
        "--model_name=mobilenet", f"--model_base_path={base}", f"--listen=tcp:{port}:interface={LOOPBACK}", "--port=0",
        "--enable_batching", f"--batching_parameters_file={batching}",
    ]  # fmt: skip
    server = start("kleinserve-mobilenet-images", command, port, logs)
    results = {}
    try:
        server.wait_ready()
        url = f"{server.url}/v1/models/mobilenet:classify_image"
        run_wrk(url, jpeg_path, 8, 3, content_type="image/jpeg")  # warm-up
        for concurrency in (8, 64):
            result = run_wrk(url, jpeg_path, concurrency, args.duration, content_type="image/jpeg")
            results[concurrency] = result
            print(
                f"  upload c={concurrency}: {result.rps:.1f} images/s, p50 {result.p50_ms} ms, "
                f"p99 {result.p99_ms} ms, errors {result.errors}",
                flush=True,
            )
    finally:
        server.stop()
        stop_all()
    ratio = results[64].rps / limit
    lines = [
        "# Image uploads: MobileNetV2, 224×224 JPEG",
        "",
        f"- command: `scripts/bench images --duration {args.duration:g}`",
        f"- date: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC; {os.cpu_count()} cores; load average "
        f"{os.getloadavg()[0]:.2f} at the end",
        "- server: batching on (max_batch_size 8, 2 batch threads), `--image_decode_threads` 2",
        "",
        "| what | images/s | p50 ms | p99 ms | errors |",
        "|---|---|---|---|---|",
        *(
            f"| in-process, one thread: decode then model, batch {b} | {r:.1f} | | | |"
            for b, r in limits.items()
        ),
        *(
            f"| upload over HTTP, concurrency {c} | {r.rps:.1f} | {r.p50_ms} | {r.p99_ms} | {r.errors} |"
            for c, r in results.items()
        ),
        "",
        f"- measured uploads c=64 / in-process limit = {results[64].rps:.1f} / {limit:.1f} = {ratio:.2f}",
        f"- measured request size: JSON float array / JPEG = {json_bytes} / {len(jpeg)} bytes = {json_bytes / len(jpeg):.0f}×",
        "",
    ]
    args.out.write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
