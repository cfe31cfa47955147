"""Does unloading a model version give its memory back? Load, run and unload it N times.

Each cycle does what the server does for one version: start a thread pool of the version's
own, load the version on it (``load_servable``), warm it up (batch sizes 1 and 8) and run it
a few times there, stop the pool; then unload: ``close()``, drop the servable, release memory.
After every cycle it prints the process's RSS (``VmRSS`` of ``/proc/self/status``), how many
functions TensorFlow's eager context holds, how many loaded versions are still alive (by
weak reference) and how long the release step took::

    scripts/bench memory-cycles                       # models/digits/1
    scripts/bench memory-cycles --make linear         # tests.models.make_linear
    scripts/bench memory-cycles --make frozen         # a TF1 frozen graph
    scripts/bench memory-cycles --make wide           # 48 MiB of weights
    scripts/bench memory-cycles --freeze --release refreeze

``--freeze`` calls ``gc.freeze()`` after the first load, as ``ModelRepository`` does once
its first versions are up (``--freeze before``: before it, with only TensorFlow imported).
``--release`` picks the unload recipe: ``collect`` (``gc.collect()``), ``refreeze``
(``gc.unfreeze(); gc.collect(); gc.freeze()``), ``service`` (``service.memory.
release_memory()``) or ``service-no-unfreeze`` (its ``unfreeze=False``); ``--trim`` adds
glibc's ``malloc_trim(0)`` to the first two. The counter-experiments: ``--no-close`` skips
``close()``, ``--keep`` keeps every servable object (a stale reference somewhere),
``--overlap`` loads version N+1 before unloading N (a hot reload, as the server will),
``--remove-functions`` also removes by hand the context functions each load added.

One model per process: run it once per case. The last line sums up; ``--json`` prints it
as JSON too.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from harness.twistd import REPO

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow's first import, below

from twisted.python.failure import Failure  # noqa: E402
from twisted.python.threadpool import ThreadPool  # noqa: E402

from service.servables import Servable  # noqa: E402
from service.servables.registry import load_servable  # noqa: E402 (imports TensorFlow)

RUNS = 5


def rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS in /proc/self/status")


def function_names() -> set[str]:
    from tensorflow.python.eager import context

    return set(context.context().list_function_names())


def on_pool(pool: ThreadPool, f: Callable[..., Any], *args: Any) -> Any:
    """Run ``f`` on one of the pool's threads and wait for it, as the server's Deferreds do."""
    done = threading.Event()
    outcome: list[Any] = []

    def finished(ok: bool, value: Any) -> None:
        outcome[:] = [ok, value]
        done.set()

    pool.callInThreadWithCallback(finished, f, *args)
    done.wait()
    ok, value = outcome
    if not ok:
        assert isinstance(value, Failure)
        value.raiseException()
    return value


def exercise(servable: Servable, rng: np.random.Generator) -> None:
    """Warm up and run every batchable numeric signature a few times with random rows."""
    servable.warm_up((1, 8))
    for key, signature in servable.signatures.items():
        if not signature.batchable or any(
            t.dtype == "DT_STRING" for t in signature.inputs.values()
        ):
            continue
        for size in range(1, RUNS + 1):
            inputs = {
                name: rng.random((size, *(d or 1 for d in t.shape[1:]))).astype(t.np_dtype)  # type: ignore[index]
                for name, t in signature.inputs.items()
            }
            servable.run(key, inputs)


def load_version(path: Path, number: int, threads: int, rng: np.random.Generator) -> Servable:
    pool = ThreadPool(threads, threads, f"inference-cycles-{number}")
    pool.start()
    try:
        servable = on_pool(pool, load_servable, "cycles", number, path)
        on_pool(pool, exercise, servable, rng)
    finally:
        pool.stop()  # joins its threads, as LoadedVersion's pool is stopped on unload
    return servable


def release(recipe: str, trim: bool) -> None:
    if recipe == "collect":
        gc.collect()
    elif recipe == "refreeze":
        gc.unfreeze()
        gc.collect()
        gc.freeze()
    elif recipe in ("service", "service-no-unfreeze"):
        from service.memory import release_memory

        release_memory(unfreeze=recipe == "service")
        return
    if trim:
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def make_model(kind: str, root: Path) -> Path:
    """Make the model in a child process, so saving it leaves nothing in this one's memory."""
    code = f"from scripts.benchmarks.memory_cycles import _make; _make({kind!r}, {str(root)!r})"
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)
    return root / kind / "1"


def _make(kind: str, root: str) -> None:
    from tests import models

    base = Path(root) / kind
    if kind == "linear":
        models.make_linear(base)
    elif kind == "frozen":
        models.make_frozen_float_graph(base)
    elif kind == "wide":
        models.make_wide(base)
    else:
        raise ValueError(kind)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="scripts/bench memory-cycles", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--model", type=Path, default=REPO / "models" / "digits" / "1")
    parser.add_argument("--make", choices=("linear", "frozen", "wide"), help="make a model instead")
    parser.add_argument("--cycles", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1, help="inference threads per version")
    parser.add_argument(
        "--freeze",
        nargs="?",
        const="after",
        choices=("after", "before"),
        help="gc.freeze() after the 1st load (as the server does), or before it",
    )
    parser.add_argument(
        "--release",
        choices=("collect", "refreeze", "service", "service-no-unfreeze"),
        default="collect",
    )
    parser.add_argument("--trim", action="store_true", help="malloc_trim(0) after releasing")
    parser.add_argument("--no-close", action="store_true", help="do not call close()")
    parser.add_argument("--keep", action="store_true", help="keep every servable object")
    parser.add_argument("--overlap", action="store_true", help="load N+1 before unloading N")
    parser.add_argument(
        "--remove-functions",
        action="store_true",
        help="remove the context functions each load added (context.remove_function)",
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        path = make_model(args.make, Path(tmp)) if args.make else args.model
        if not path.is_dir():
            parser.error(f"{path} does not exist (scripts/export-demo-model makes the digits)")
        return cycles(path, args)


def cycles(path: Path, args: argparse.Namespace) -> int:
    from tensorflow.python.eager import context

    rng = np.random.default_rng(0)
    kept: list[Servable] = []
    alive: list[weakref.ref[Any]] = []
    rows: list[dict[str, Any]] = []
    current: tuple[Servable, set[str]] | None = None
    rss_before = rss_kib() / 1024  # TensorFlow imported, no model loaded yet
    if args.freeze == "before":
        gc.collect()
        gc.freeze()
    for number in range(1, args.cycles + 1):
        before = function_names()
        servable = load_version(path, number, args.threads, rng)
        added = function_names() - before
        loaded_mib = rss_kib() / 1024
        alive.append(weakref.ref(servable._loaded))
        if number == 1 and args.freeze == "after":
            gc.collect()
            gc.freeze()  # what ModelRepository._loaded_all does once the first versions are up
        if args.overlap:
            previous, current = current, (servable, added)
            del servable
            if previous is None:
                continue
            servable, added = previous
        # Unload.
        if not args.no_close:
            servable.close()
        if args.keep:
            kept.append(servable)
        del servable
        if args.overlap:
            del previous
        if args.remove_functions:
            for name in added & function_names():
                context.context().remove_function(name)
        started = time.perf_counter()
        release(args.release, args.trim)
        release_ms = (time.perf_counter() - started) * 1000
        row = {
            "cycle": number,
            "loaded_mib": round(loaded_mib, 1),
            "rss_mib": round(rss_kib() / 1024, 1),
            "functions": len(function_names()),
            "added": len(added),
            "alive": sum(ref() is not None for ref in alive),
            "release_ms": round(release_ms, 1),
            "gc_objects": len(gc.get_objects()),
            "frozen": gc.get_freeze_count(),
        }
        rows.append(row)
        print(
            "cycle {cycle:2}  loaded {loaded_mib:7.1f}  unloaded {rss_mib:7.1f} MiB  "
            "functions {functions:4} (+{added})  versions alive {alive:2}  release {release_ms:6.1f} ms  "
            "gc objects {gc_objects}  frozen {frozen}".format(**row),
            flush=True,
        )
    first, last = rows[0], rows[-1]
    summary = {
        "model": str(path),
        "options": {k: v for k, v in vars(args).items() if k not in ("model", "json")},
        "rss_before_mib": round(rss_before, 1),
        "rss_first_mib": first["rss_mib"],
        "rss_last_mib": last["rss_mib"],
        "growth": round(last["rss_mib"] / first["rss_mib"] - 1, 3),
        "functions_first": first["functions"],
        "functions_last": last["functions"],
        "alive_last": last["alive"],
        "release_ms_median": sorted(r["release_ms"] for r in rows)[len(rows) // 2],
    }
    print(
        f"RSS before loading: {rss_before:.1f} MiB, after cycle {first['cycle']}: "
        f"{first['rss_mib']} MiB, after cycle "
        f"{last['cycle']}: {last['rss_mib']} MiB ({summary['growth']:+.1%}); context functions "
        f"{first['functions']} -> {last['functions']}; versions alive at the end: "
        f"{last['alive']}; release median {summary['release_ms_median']} ms"
    )
    if args.json:
        print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
