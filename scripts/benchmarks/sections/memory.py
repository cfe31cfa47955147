"""The ``memory`` section: a server's RSS before and after 20 predicts of 60 MB bodies
(``request_memory``, in a process of its own)."""

from __future__ import annotations

import re
import subprocess

from harness.twistd import REPO
from scripts.benchmarks.procs import VENV_BIN, BenchError
from scripts.benchmarks.runner import Bench


def run(bench: Bench) -> None:
    requests, megabytes = (4, 60.0) if bench.plan.quick else (20, 60.0)
    command = [
        str(VENV_BIN / "python"),
        "-m",
        "scripts.benchmarks.request_memory",
        f"--requests={requests}",
        f"--mb={megabytes:g}",
    ]
    done = subprocess.run(
        command, cwd=REPO, capture_output=True, text=True, timeout=1800, check=False
    )
    for line in done.stdout.splitlines():
        bench.say(f"  {line}")
    last = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""
    match = re.match(
        r"RSS before (\d+) MiB, after \d+ x [\d.]+ MB (\d+) MiB, [\d.]+ s later (\d+) MiB", last
    )
    if done.returncode != 0 or match is None:
        raise BenchError(f"request_memory failed ({done.returncode}):\n{done.stderr[-2000:]}")
    before, after, settled = (int(x) for x in match.groups())
    bench.results["memory"] = {
        "requests": requests,
        "body_mb": megabytes,
        "rss_before_mib": before,
        "rss_after_mib": after,
        "rss_settled_mib": settled,
        "ratio_after": round(after / before, 3),
        "ratio_settled": round(settled / before, 3),
    }
