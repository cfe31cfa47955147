"""The load of ``scripts/bench scaleout``, run on the cluster's client host (in its namespace).

    python -m scripts.benchmarks.scaleout_load (--consul HOST:PORT | --proxy HOST:PORT)
        --model mean --shape 1,131072 --concurrency 16 --seconds 20

C calls in flight (for --seconds, or until --calls calls), each a ``predict`` of one float32
tensor of ``--shape`` with the client library (``AsyncInferenceClient``, the Open Inference Protocol's binary tensors):
``--consul`` resolves the servers from that agent and rotates across them directly;
``--proxy`` sends every call to the one proxy (a static backend; ``--attempts`` 1 by
default there, so that what the proxy does about a failed server is what is measured).
Prints one JSON object: calls, failures by kind, requests/s, p50/p99, the attempts each
server got (with their start times, CLOCK_MONOTONIC, with ``--timeline``).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from collections import Counter, defaultdict
from typing import Any

import numpy as np
from twisted.internet import defer, task

from client import AsyncInferenceClient
from client.dispatch import Attempt


def tensor(shape: tuple[int, ...]) -> np.ndarray:
    """The request's tensor: random float32 in [0, 1) of ``shape``, from a fixed seed."""
    rng = np.random.default_rng(20240607)
    return rng.random(shape, dtype=np.float32)


def percentile(values: list[float], q: float) -> float:
    """The ``q``-th percentile (nearest rank) of ``values``; 0 when empty."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, int(round(q / 100 * len(ordered) + 0.5)) - 1))
    return ordered[rank]


async def load(reactor: Any, args: argparse.Namespace) -> dict[str, Any]:
    attempts: dict[str, list[float]] = defaultdict(list)
    outcomes: Counter[str] = Counter()
    answered: Counter[str] = Counter()
    # Attempts carry the reactor's (wall clock) time; the report's clock is CLOCK_MONOTONIC,
    # which every namespace shares with the bench that injects the failures.
    to_monotonic = time.monotonic() - reactor.seconds()

    def on_attempt(attempt: Attempt) -> None:
        key = f"{attempt.backend.address}:{attempt.backend.port}"
        if measuring:
            attempts[key].append(round(attempt.sent_at + to_monotonic, 3))
            outcomes[attempt.outcome] += 1
            if attempt.outcome == "ok":
                answered[key] += 1

    if args.proxy:
        host, _, port = args.proxy.rpartition(":")
        client = AsyncInferenceClient(
            backends=[(host, int(port))], protocol="v2", timeout=args.timeout,
            max_attempts=args.attempts or 1, on_attempt=on_attempt, reactor=reactor,
        )  # fmt: skip
    else:
        client = AsyncInferenceClient(
            args.consul, protocol="v2", timeout=args.timeout, max_attempts=args.attempts or 3,
            on_attempt=on_attempt, reactor=reactor, balancer=args.balancer,
        )  # fmt: skip
    inputs = tensor(args.shape)
    measuring = False
    for _ in range(3):  # the signature read and connections made before the clock starts
        await client.predict(args.model, inputs, timeout=60)
    latencies: list[float] = []
    failures: Counter[str] = Counter()
    failure_times: list[float] = []
    measuring = True
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    started = time.monotonic()
    stop = started + args.seconds
    sent = 0

    async def worker() -> None:
        nonlocal sent
        while time.monotonic() < stop and (args.calls is None or sent < args.calls):
            sent += 1
            t0 = time.monotonic()
            try:
                await client.predict(args.model, inputs)
            except Exception as e:  # every failed call is counted by kind, the run goes on
                failures[type(e).__name__] += 1
                failure_times.append(round(t0, 3))
            else:
                latencies.append(time.monotonic() - t0)

    await defer.gatherResults(
        [defer.Deferred.fromCoroutine(worker()) for _ in range(args.concurrency)]
    )
    elapsed = time.monotonic() - started
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    await client.close()
    result: dict[str, Any] = {
        "mode": "proxy" if args.proxy else "direct",
        "shape": list(args.shape),
        "request_bytes": int(inputs.nbytes),
        "concurrency": args.concurrency,
        "balancer": None if args.proxy else args.balancer,
        "seconds": round(elapsed, 2),
        "started": round(started, 3),
        "calls": len(latencies) + sum(failures.values()),
        "ok": len(latencies),
        "failed": sum(failures.values()),
        "failures": dict(failures),
        "failure_times": failure_times,
        "rps": round(len(latencies) / elapsed, 1),
        "p50_ms": round(1000 * percentile(latencies, 50), 1),
        "p99_ms": round(1000 * percentile(latencies, 99), 1),
        "attempt_outcomes": dict(outcomes),
        "attempts_by_server": {k: len(v) for k, v in sorted(attempts.items())},
        "answered_by_server": dict(sorted(answered.items())),
        "client_cpu_s": round(cpu1.ru_utime + cpu1.ru_stime - cpu0.ru_utime - cpu0.ru_stime, 2),
    }
    if args.timeline:
        result["attempt_times"] = {k: v for k, v in sorted(attempts.items())}
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scripts.benchmarks.scaleout_load")
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--consul", help="the local Consul agent: rotate across its servers")
    where.add_argument("--proxy", help="HOST:PORT of the proxy: every call goes there")
    parser.add_argument("--model", default="mean")
    parser.add_argument(
        "--shape",
        type=lambda text: tuple(int(n) for n in text.split(",")),
        default=(1, 131072),
        help="the tensor's shape, e.g. 64,28,28,1 for digits (default 1,131072: 512 KiB)",
    )
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--calls", type=int, help="stop after this many calls (default: none)")
    parser.add_argument("--timeout", type=float, default=6.0, help="each call's deadline")
    parser.add_argument("--attempts", type=int, help="max attempts (default: 3 direct, 1 proxy)")
    parser.add_argument("--timeline", action="store_true", help="every attempt's start time")
    parser.add_argument(
        "--balancer",
        default="peak_ewma",
        help="the client's balancer (direct; default: the client's)",
    )
    args = parser.parse_args(argv)

    async def body(reactor: Any) -> None:
        print(json.dumps(await load(reactor, args)), flush=True)

    task.react(lambda reactor: defer.Deferred.fromCoroutine(body(reactor)))  # exits the process
    return 0


if __name__ == "__main__":
    sys.exit(main())
