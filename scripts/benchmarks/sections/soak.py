"""The ``soak`` section: kleinserve, batching on, digits, concurrency 64 for ``--soak``
seconds: RSS every 5 s, and its growth."""

from __future__ import annotations

import subprocess
import time

from scripts.benchmarks.plan import HEAVY_CONCURRENCY, Setup
from scripts.benchmarks.procs import memory_of, parse_wrk, wrk_command
from scripts.benchmarks.runner import Bench


def run(bench: Bench) -> None:
    model, concurrency = "digits", HEAVY_CONCURRENCY
    body = bench.body(model)
    plan = bench.plan
    proc = bench.start_kleinserve(model, Setup("on", 1))
    try:
        proc.wait_ready()
        url = f"{proc.url}/v1/models/{model}:predict"
        bench.check_predict(proc, model, body)
        bench.warm_up(proc, url, body)
        command = wrk_command(url, body, concurrency, plan.soak_seconds)
        samples: list[dict[str, float]] = []
        t0 = time.monotonic()
        with subprocess.Popen(command, stdout=subprocess.PIPE, text=True) as load:
            try:
                for _ in range(int(plan.soak_seconds / plan.soak_interval) + 2):
                    rss = memory_of(proc.pid).rss_mb
                    samples.append({"t": round(time.monotonic() - t0, 1), "rss_mb": round(rss, 1)})
                    bench.say(f"  soak t={samples[-1]['t']:5.1f} s: RSS {rss:.1f} MB")
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
            samples.append({"t": round(time.monotonic() - t0, 1), "rss_mb": round(end.rss_mb, 1)})
        first, last = samples[0]["rss_mb"], samples[-1]["rss_mb"]
        middle = samples[len(samples) // 2]["rss_mb"]
        bench.results["soak"] = {
            "model": model,
            "concurrency": concurrency,
            "seconds": plan.soak_seconds,
            "interval": plan.soak_interval,
            "samples": samples,
            "growth_pct": round(100 * (last - first) / first, 2) if first else None,
            "second_half_growth_pct": round(100 * (last - middle) / middle, 2) if middle else None,
            "rss_peak_mb": round(end.hwm_mb, 1),
            **result.as_dict(),
        }
        bench.say(
            f"  soak: RSS {first:.1f} -> {last:.1f} MB ({bench.results['soak']['growth_pct']:+.2f} %; "
            f"second half {bench.results['soak']['second_half_growth_pct']:+.2f} %), "
            f"{result.rps:.1f} req/s, {result.errors} errors"
        )
    finally:
        proc.stop()
