"""The bench's measurements without HTTP, each in a process of its own (one JSON line out).

    python -m scripts.benchmarks.without_http inprocess MODEL_BASE --seconds S --sizes 1,8,32,64
        The model's serving signature called directly in a loop, one batch size at a time:
        instances/s and the median time of one call at each size. The call is what the
        server's inference thread does (numpy in, ``tf.constant``, the signature, ``.numpy()``
        out), with no queue, no thread hop and no HTTP: the most this process can get out of
        the model.

    python -m scripts.benchmarks.without_http engine MODEL_BASE --seconds S --submitters 64
            [--batching-file F]
        ``service.batching.BatchingQueue`` on a real reactor, running the real ``Servable``
        on a real dedicated ThreadPool, built as ``service/repository/loader.py`` builds them, with
        the parameters of the server's --batching_parameters_file F (batching off without).
        ``--submitters`` coroutines each submit one row, await its answer and repeat; after
        ``--warmup`` seconds, instances/s is measured for ``--seconds``.

A child process per measurement gives each a fresh reactor (it cannot be restarted) and
keeps TensorFlow's memory out of the bench process.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

MAX_CALLS = 1_000_000  # a bound on every loop besides its time limit
MIN_BATCHES = 3  # the engine's window runs past --seconds until this many batches finished in it
MAX_OVERTIME = 120.0  # ... but never longer than this past --seconds


def inprocess(base: Path, seconds: float, sizes: list[int], min_calls: int) -> dict[str, Any]:
    import numpy as np
    import tensorflow as tf

    signature = tf.saved_model.load(str(base / "1")).signatures["serving_default"]
    ((input_name, spec),) = signature.structured_input_signature[1].items()
    inner = tuple(spec.shape[1:])
    rng = np.random.default_rng(0)
    results: dict[str, Any] = {}
    for size in sizes:
        batch = rng.random((size, *inner), dtype=np.float32)

        def call(batch: np.ndarray = batch) -> None:
            outputs = signature(**{input_name: tf.constant(batch)})
            for tensor in outputs.values():
                tensor.numpy()

        # The first call at a new shape pays for oneDNN's set-up: up to 3 calls, or 1 s of them.
        warm_until = time.perf_counter() + 1.0
        for _ in range(3):
            call()
            if time.perf_counter() > warm_until:
                break
        times: list[float] = []
        started = time.perf_counter()
        # At least min_calls calls, so a slow batch still gets a median, within a time bound.
        while len(times) < MAX_CALLS:
            elapsed = time.perf_counter() - started
            if (elapsed >= seconds and len(times) >= min_calls) or elapsed >= 10 * seconds + 30:
                break
            t0 = time.perf_counter()
            call()
            times.append(time.perf_counter() - t0)
        total = time.perf_counter() - started
        results[str(size)] = {
            "instances_per_s": round(size * len(times) / total, 1),
            "calls": len(times),
            "p50_ms": round(1000 * statistics.median(times), 3),
        }
        print(f"    batch {size:>3}: {results[str(size)]}", file=sys.stderr, flush=True)
    best = max(results, key=lambda k: results[k]["instances_per_s"])
    return {
        "sizes": results,
        "best_size": int(best),
        "best_instances_per_s": results[best]["instances_per_s"],
        "tensorflow": tf.__version__,
    }


class _BatchLog:
    """A BatchObserver keeping (time finished, rows) of every successful batch."""

    def __init__(self) -> None:
        self.batches: list[tuple[float, int]] = []
        self.failed = 0

    def batch_finished(self, record: Any) -> None:
        if record.failed:
            self.failed += 1
        else:
            self.batches.append((time.perf_counter(), record.rows))


def engine(
    base: Path, seconds: float, warmup: float, submitters: int, batching_file: Path | None
) -> dict[str, Any]:
    import numpy as np
    from twisted.internet import reactor as _reactor
    from twisted.internet.defer import Deferred, gatherResults
    from twisted.internet.threads import deferToThreadPool
    from twisted.python.failure import Failure
    from twisted.python.threadpool import ThreadPool

    from service.batching import BatchingParameters, BatchingQueue
    from service.batching_config import load_batching_parameters
    from service.servables.registry import load_servable
    from wire.dtypes import DEFAULT_SIGNATURE

    reactor: Any = _reactor  # the module-level reactor, typed as what it provides

    # As the server reads --enable_batching --batching_parameters_file, or ModelConfig's default.
    params = (
        load_batching_parameters(batching_file)
        if batching_file is not None
        else BatchingParameters(enabled=False)
    )
    # As ModelRepository._load_version: a pool of num_batch_threads threads, load and warm on it.
    pool = ThreadPool(params.num_batch_threads, params.num_batch_threads, "inference-bench")
    pool.start()
    log = _BatchLog()
    state: dict[str, Any] = {"errors": 0, "answered": 0}

    def executor(f: Any, *args: Any) -> Deferred:
        return deferToThreadPool(reactor, pool, f, *args)

    async def load() -> tuple[BatchingQueue, Any]:
        servable = await executor(load_servable, "bench", 1, base / "1")
        await executor(servable.warm_up, params.allowed_batch_sizes)
        signature = servable.signature(DEFAULT_SIGNATURE)
        queue = BatchingQueue(
            lambda inputs: servable.run(DEFAULT_SIGNATURE, inputs),
            params,
            clock=reactor,
            executor=executor,
            observer=log,
        )
        return queue, signature

    def keep_going() -> bool:
        """Until --seconds are up and MIN_BATCHES batches finished in the window (bounded)."""
        if "stop_at" in state:
            return False
        now = time.perf_counter()
        in_window = sum(1 for t, _ in log.batches[-MIN_BATCHES:] if t >= state["measure_from"])
        if now < state["end"] or (in_window < MIN_BATCHES and now < state["end"] + MAX_OVERTIME):
            return True
        state["stop_at"] = now
        return False

    async def submitter(queue: BatchingQueue, row: dict[str, np.ndarray]) -> None:
        for _ in range(MAX_CALLS):
            if not keep_going():
                return
            try:
                await queue.submit(row, 1)
                state["answered"] += 1
            except Exception as e:  # a failed row ends this submitter, and is reported
                state["errors"] += 1
                state["error"] = f"{type(e).__name__}: {e}"
                return

    async def run() -> None:
        queue, signature = await load()
        rng = np.random.default_rng(0)
        rows = [
            {
                name: rng.random((1, *info.shape[1:]), dtype=np.float32)
                for name, info in signature.inputs.items()
            }
            for _ in range(submitters)
        ]
        state["start"] = time.perf_counter()
        state["measure_from"] = state["start"] + warmup
        state["end"] = state["measure_from"] + seconds
        await gatherResults([Deferred.fromCoroutine(submitter(queue, row)) for row in rows])
        state["finished"] = time.perf_counter()

    def done(result: Any) -> None:
        if isinstance(result, Failure):
            state["failure"] = result.getTraceback()
        reactor.stop()

    reactor.callWhenRunning(lambda: Deferred.fromCoroutine(run()).addBoth(done))
    reactor.callLater(warmup + seconds + MAX_OVERTIME + 600, reactor.stop)  # whatever happens
    reactor.run(installSignalHandlers=False)
    pool.stop()
    if "failure" in state or "finished" not in state:
        raise SystemExit(f"engine run failed: {state.get('failure', 'did not finish')}")

    # Throughput over whole batches: rows of the batches that finished after the first one in
    # the window, over the time between the first and the last; exact even when a batch of
    # MobileNetV2 takes a large part of the window.
    stop_at = state.get("stop_at", state["finished"])
    window = [(t, rows) for t, rows in log.batches if state["measure_from"] <= t <= stop_at]
    if len(window) >= 2:
        rate = sum(rows for _, rows in window[1:]) / (window[-1][0] - window[0][0])
    else:  # only when MAX_OVERTIME ran out: a very slow model, or a stalled one
        rate = sum(rows for _, rows in window) / (stop_at - state["measure_from"])
    sizes = [rows for _, rows in window]
    return {
        "instances_per_s": round(rate, 1),
        "batches": len(window),
        "window_seconds": round(stop_at - state["measure_from"], 2),
        "mean_batch": round(statistics.fmean(sizes), 2) if sizes else 0.0,
        "batch_sizes": _histogram(sizes),
        "errors": state["errors"] + log.failed,
        "error": state.get("error"),
        "params": {
            "enabled": params.enabled,
            "max_batch_size": params.max_batch_size,
            "batch_timeout_micros": params.batch_timeout_micros,
            "max_enqueued_batches": params.max_enqueued_batches,
            "num_batch_threads": params.num_batch_threads,
        },
    }


def _histogram(sizes: list[int]) -> dict[str, int]:
    """Batch sizes by power-of-two bucket: {"1": n, "2-3": n, "4-7": n, ...}."""
    counts: dict[str, int] = {}
    for size in sizes:
        low = 1 << (size.bit_length() - 1)
        key = str(low) if low == 1 else f"{low}-{2 * low - 1}"
        counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: int(kv[0].split("-")[0])))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", choices=["inprocess", "engine"])
    parser.add_argument("model_base", type=Path)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--sizes", default="1,8,32,64")
    parser.add_argument("--min-calls", type=int, default=5)
    parser.add_argument("--submitters", type=int, default=64)
    parser.add_argument("--batching-file", type=Path, help="batching on, with these parameters")
    args = parser.parse_args(argv)
    if args.mode == "inprocess":
        sizes = [int(s) for s in args.sizes.split(",")]
        result = inprocess(args.model_base, args.seconds, sizes, args.min_calls)
    else:
        result = engine(
            args.model_base, args.seconds, args.warmup, args.submitters, args.batching_file
        )
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
