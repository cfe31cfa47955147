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
               tensor_content (sections/grpc.py) at each concurrency: requests/s,
               p50/p99, bytes per request, server CPU per request
    hooks      one server, batching on, each model as it is and with identity hooks
               (examples/hooks/identity; sections/hooks.py): requests/s and p50/p99 of
               both at each concurrency
    triton     the Open Inference Protocol, v2 binary and v2 JSON bodies, to kleinserve and to
               a real Triton server (PyTriton, its dynamic batcher under the same limits) in
               the same run (sections/triton.py): requests/s and p50/p99 of each
    front      --http_processes 1, 2 and 3 and a real Triton in the same run (sections/front.py):
               TF Serving JSON and v2 JSON, requests/s, p50/p99, CPU per request of the main
               process and of the front processes, memory of each server
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
import importlib
import json
import os
import shlex
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

from harness.processes import stop_all
from harness.twistd import REPO
from scripts.benchmarks import models as bench_models
from scripts.benchmarks import plot as bench_plot
from scripts.benchmarks import report as bench_report
from scripts.benchmarks.plan import CACHE, SECTIONS, Plan
from scripts.benchmarks.runner import Bench
from scripts.benchmarks.sections import (
    empty,
    engine,
    flask,
    front,
    grpc,
    hooks,
    http,
    inprocess,
    memory,
    soak,
    triton,
)

RUN: dict[str, Callable[[Bench], None]] = {
    "inprocess": inprocess.run,
    "engine": engine.run,
    "http": http.run,
    "grpc": grpc.run,
    "hooks": hooks.run,
    "triton": triton.run,
    "front": front.run,
    "empty": empty.run,
    "flask": flask.run,
    "soak": soak.run,
    "memory": memory.run,
}

# The measurements that run on their own, not as sections: ``scripts/bench NAME ARGS…`` runs
# the module's ``main(ARGS)`` (``scripts/bench NAME --help`` lists its options).
COMMANDS = {
    "images": "scripts.benchmarks.images",
    "swap": "scripts.benchmarks.swap",
    "client": "scripts.benchmarks.client",
    "request-memory": "scripts.benchmarks.request_memory",
    "memory-cycles": "scripts.benchmarks.memory_cycles",
    "scaleout": "scripts.benchmarks.scaleout",
}


def parse_args(argv: list[str] | None) -> Plan:
    parser = argparse.ArgumentParser(
        prog="scripts/bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Sections: "
        + ", ".join(SECTIONS)
        + ". On their own: scripts/bench {"
        + ",".join(COMMANDS)
        + "} [--help | ARGS…]",
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
    args = sys.argv[1:] if argv is None else argv
    if args and args[0] in COMMANDS:
        command: Callable[[list[str]], int] = importlib.import_module(COMMANDS[args[0]]).main
        return command(args[1:])
    plan = parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupted)  # unwinds through stop_all below, as Ctrl-C does
    bench = Bench(plan)
    bench.say(
        f"kleinserve bench ({'quick' if plan.quick else 'full'}): models {','.join(plan.models)}; "
        f"sections {','.join(plan.sections)}; concurrency {','.join(map(str, plan.concurrencies))}; "
        f"{plan.duration:g} s per point; load average {os.getloadavg()[0]:.2f}"
    )
    try:
        bench.run(RUN)
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
    if bench_plot.plot(results, plan.plot):
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
