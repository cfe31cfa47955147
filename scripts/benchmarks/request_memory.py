"""Does a server give back the memory of large ``:predict`` bodies? Send N of them, watch RSS.

Starts ``twistd -n inference`` on ``models/digits`` (``scripts/export-demo-model``) with
batching (256-row batches, so TensorFlow's own working memory stays small and what is left
is the request's), sends a small predict and a 2 MB one to warm it up (TensorFlow's first
full batches), reads its RSS (``VmRSS`` of ``/proc/PID/status``), then sends ``--requests`` bodies of ``--mb`` MB, one after another
(``--concurrency`` at once), printing RSS after each and, while each is in flight, the
slowest ``/healthz`` answer seen::

    scripts/bench request-memory                    # 20 requests of 60 MB
    scripts/bench request-memory --requests 4 --concurrency 2 -- --max_inflight_request_bytes=1000000000

Arguments after ``--`` go to twistd. The last line sums up: RSS before, after the last
request, and after ``--settle`` seconds more (the server trims memory at most every few
seconds after large bodies).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from harness.twistd import REPO, TwistdServer

BATCHING = "max_batch_size { value: 256 }\nmax_enqueued_batches { value: 128 }\n"


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def make_body(megabytes: float) -> bytes:
    """A row-format digits body of about ``megabytes`` MB: 16 distinct images, repeated."""
    rng = np.random.default_rng(0)
    images = [json.dumps(np.round(rng.random((28, 28, 1)), 4).tolist()).encode() for _ in range(16)]
    count = int(megabytes * 1e6 / (len(images[0]) + 1))
    return b'{"instances": [' + b",".join(images[i % 16] for i in range(count)) + b"]}"


def post(url: str, body: bytes) -> int:
    request = urllib.request.Request(url, data=body, headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=600) as response:
            response.read()
            return response.status
    except urllib.error.HTTPError as e:
        return e.code


def slowest_healthz(server: TwistdServer, stop: threading.Event, worst: list[float]) -> None:
    """Ask /healthz every 50 ms until ``stop``; append the slowest answer's seconds."""
    slowest = 0.0
    while not stop.is_set():
        started = time.monotonic()
        server.get("/healthz")
        slowest = max(slowest, time.monotonic() - started)
        time.sleep(0.05)
    worst.append(slowest)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="scripts/bench request-memory", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--requests", type=int, default=20)
    parser.add_argument("--mb", type=float, default=60.0)
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--settle", type=float, default=6.0)
    parser.add_argument("twistd_args", nargs="*")
    args = parser.parse_args(argv)
    body = make_body(args.mb)
    with tempfile.TemporaryDirectory() as tmp:
        batching = Path(tmp) / "batching.txt"
        batching.write_text(BATCHING)
        server = TwistdServer(
            [
                f"--model_base_path={REPO / 'models' / 'digits'}",
                "--model_name=digits",
                "--enable_batching",
                f"--batching_parameters_file={batching}",
                *args.twistd_args,
            ],
            Path(tmp),
        )
        server.start().wait_ready()
        assert server.process is not None
        pid = server.process.pid
        try:
            url = server.url + "/v1/models/digits:predict"
            post(url, make_body(0.01))
            time.sleep(1)
            print(f"RSS after a small predict {rss_mib(pid):.0f} MiB", flush=True)
            post(url, make_body(2))  # TensorFlow's first full 256-row batches, the decode pool
            time.sleep(args.settle)
            before = rss_mib(pid)
            print(f"body {len(body) / 1e6:.1f} MB; RSS before {before:.0f} MiB", flush=True)
            with ThreadPoolExecutor(args.concurrency) as pool:
                for i in range(0, args.requests, args.concurrency):
                    count = min(args.concurrency, args.requests - i)
                    stop = threading.Event()
                    worst: list[float] = []
                    watcher = threading.Thread(target=slowest_healthz, args=(server, stop, worst))
                    watcher.start()
                    statuses = list(pool.map(lambda _: post(url, body), range(count)))
                    stop.set()
                    watcher.join()
                    print(
                        f"request {i + count}: {statuses} RSS {rss_mib(pid):.0f} MiB, "
                        f"slowest /healthz {worst[0] * 1000:.0f} ms",
                        flush=True,
                    )
            after = rss_mib(pid)
            time.sleep(args.settle)
            settled = rss_mib(pid)
            print(
                f"RSS before {before:.0f} MiB, after {args.requests} x {args.mb:g} MB "
                f"{after:.0f} MiB, {args.settle:g} s later {settled:.0f} MiB"
            )
        finally:
            server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
