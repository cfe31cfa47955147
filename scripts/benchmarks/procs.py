"""What ``scripts/bench`` reads off its servers: memory of a process tree, ``wrk``'s load and
summary, and the batching counters of ``/metrics``.

The servers themselves are started and stopped by ``harness.processes`` (``Proc``, ``start``,
``stop_all``), on ports from ``harness.ports.free_port``.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from harness.processes import http_get

VENV_BIN = Path(sys.executable).parent


class BenchError(RuntimeError):
    """Something the bench could not measure; the message says what, with the log's tail."""


# -- memory ----------------------------------------------------------------------------------


def _proc_field(path: str, key: str) -> int:
    """A ``Key:   123 kB`` line of a /proc file, in kB (0 if the process is gone)."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (gunicorn's master and workers)."""
    pids: list[int] = []
    todo = [pid]
    while todo and len(pids) < 1000:
        current = todo.pop()
        pids.append(current)
        try:
            tasks = os.listdir(f"/proc/{current}/task")
        except OSError:
            continue
        for task in tasks:
            try:
                with open(f"/proc/{current}/task/{task}/children") as f:
                    todo.extend(int(child) for child in f.read().split())
            except OSError:
                continue
    return pids


@dataclass(frozen=True)
class Memory:
    """Memory of a process tree in MB: resident now, peak resident, proportional share."""

    rss_mb: float  # sum of VmRSS
    hwm_mb: float  # sum of VmHWM: each process's own peak since it started
    pss_mb: float  # sum of Pss: shared pages (libtensorflow) split between the processes
    processes: int

    def as_dict(self) -> dict[str, float]:
        return {
            "rss_mb": round(self.rss_mb, 1),
            "peak_mb": round(self.hwm_mb, 1),
            "pss_mb": round(self.pss_mb, 1),
            "processes": self.processes,
        }


def memory_of(pid: int) -> Memory:
    pids = process_tree(pid)
    rss = sum(_proc_field(f"/proc/{p}/status", "VmRSS") for p in pids)
    hwm = sum(_proc_field(f"/proc/{p}/status", "VmHWM") for p in pids)
    pss = sum(_proc_field(f"/proc/{p}/smaps_rollup", "Pss") for p in pids)
    return Memory(rss / 1024, hwm / 1024, pss / 1024, len(pids))


# -- wrk -------------------------------------------------------------------------------------
#
# wrk ends every run with the requests of its last moment still in flight and closes their
# connections, as any load generator stopped by a clock does: a server that cannot take a
# client leaving mid-request shows it here as a later point with no answers (a failed point).


@dataclass
class LoadResult:
    """One wrk run: successful requests per second, latency, errors."""

    seconds: float
    ok: int  # 2xx responses
    rps: float  # 2xx responses per second
    p50_ms: float | None
    p99_ms: float | None
    errors: int  # non-2xx responses plus socket errors (connect, read, write, timeout)
    statuses: dict[str, int]  # "2xx" and "non-2xx" counts (wrk does not split by status)
    error_messages: dict[str, int]

    def as_dict(self) -> dict[str, object]:
        return {
            "rps": round(self.rps, 1),
            "p50_ms": _round(self.p50_ms),
            "p99_ms": _round(self.p99_ms),
            "ok": self.ok,
            "errors": self.errors,
            "seconds": round(self.seconds, 2),
            "statuses": dict(self.statuses),
            "error_messages": dict(list(self.error_messages.items())[:5]),
        }


def _round(value: float | None, digits: int = 2) -> float | None:
    return None if value is None else round(value, digits)


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}
_DONE = re.compile(r"^\s*(\d+) requests in ([\d.]+)(us|ms|s|m|h),", re.M)
_PERCENTILE = re.compile(r"^\s*(50|75|90|99)%\s+([\d.]+)(us|ms|s|m|h)\s*$", re.M)
_NON_2XX = re.compile(r"Non-2xx or 3xx responses:\s+(\d+)")
_SOCKET = re.compile(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)")


def parse_wrk(text: str) -> LoadResult:
    """Read wrk's summary (run with ``--latency``): requests, duration, percentiles, errors."""
    done = _DONE.search(text)
    if done is None:
        raise BenchError(f"wrk printed no summary:\n{text[-2000:]}")
    seconds = float(done.group(2)) * _UNITS[done.group(3)] / 1000
    total = int(done.group(1))
    percentiles = {int(p): float(v) * _UNITS[u] for p, v, u in _PERCENTILE.findall(text)}
    non_2xx = int(m.group(1)) if (m := _NON_2XX.search(text)) else 0
    error_messages: dict[str, int] = {}
    if socket_errors := _SOCKET.search(text):
        kinds = ("connect", "read", "write", "timeout")
        for kind, n in zip(kinds, socket_errors.groups(), strict=True):
            if int(n):
                error_messages[f"socket {kind} errors"] = int(n)
    ok = total - non_2xx
    return LoadResult(
        seconds=seconds,
        ok=ok,
        rps=ok / seconds if seconds > 0 else 0.0,
        p50_ms=percentiles.get(50),
        p99_ms=percentiles.get(99),
        errors=non_2xx + sum(error_messages.values()),
        statuses={"2xx": ok, "non-2xx": non_2xx},
        error_messages=error_messages,
    )


def _post_script(body: Path, content_type: str, headers: dict[str, str] | None = None) -> Path:
    """A wrk Lua script that POSTs ``body`` (written next to it, once per body and type) with
    ``headers`` besides its content type."""
    script = body.with_name(f"{body.name}.{content_type.replace('/', '-')}.lua")
    extra = "".join(
        f"wrk.headers[{json.dumps(name)}] = {json.dumps(value)}\n"
        for name, value in (headers or {}).items()
    )
    script.write_text(
        f"local f = assert(io.open({json.dumps(str(body))}, 'rb'))\n"
        "wrk.body = f:read('*a')\n"
        "f:close()\n"
        "wrk.method = 'POST'\n"
        f"wrk.headers['Content-Type'] = {json.dumps(content_type)}\n" + extra
    )
    return script


def wrk_command(
    url: str,
    body: Path,
    concurrency: int,
    seconds: float,
    *,
    content_type: str = "application/json",
    headers: dict[str, str] | None = None,
) -> list[str]:
    """``wrk`` for ``seconds`` with ``concurrency`` connections on one thread, POSTing ``body``."""
    return [
        "wrk",
        "-t1",
        f"-c{concurrency}",
        f"-d{max(1, round(seconds))}s",
        "--timeout=30s",
        "--latency",
        "-s",
        str(_post_script(body, content_type, headers)),
        url,
    ]


def run_wrk(
    url: str,
    body: Path,
    concurrency: int,
    seconds: float,
    *,
    content_type: str = "application/json",
    headers: dict[str, str] | None = None,
) -> LoadResult:
    """Run wrk to the end and parse its summary; a run with no answer at all is a failure."""
    command = wrk_command(
        url, body, concurrency, seconds, content_type=content_type, headers=headers
    )
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=seconds + 120, check=False
    )
    if done.returncode != 0:
        raise BenchError(f"wrk failed ({done.returncode}): {done.stderr[-2000:]}")
    result = parse_wrk(done.stdout)
    if result.ok == 0:
        raise BenchError(
            f"no successful answer in {seconds:g} s (a wedged server?):\n{done.stdout}"
        )
    return result


# -- /metrics --------------------------------------------------------------------------------

_SAMPLE = re.compile(r"^(kleinserve_[a-z_]+?)(?:\{[^}]*\})? ([-+\deE.naifNAIF]+)$", re.M)


def batch_counters(url: str) -> dict[str, float]:
    """The batching histograms' _sum and _count from a kleinserve /metrics page, summed."""
    status, body = http_get(url + "/metrics")
    counters: dict[str, float] = {}
    if status != 200:
        return counters
    for name, value in _SAMPLE.findall(body.decode(errors="replace")):
        if name.endswith(("_sum", "_count")) and name.startswith(
            ("kleinserve_batch_size", "kleinserve_batch_run_seconds", "kleinserve_queue_seconds")
        ):
            counters[name] = counters.get(name, 0.0) + float(value)
    return counters


def batch_stats(before: dict[str, float], after: dict[str, float], wall: float) -> dict[str, float]:
    """Mean batch rows, mean model time per batch, and how busy the model was, between two scrapes."""

    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    batches = delta("kleinserve_batch_size_count")
    if batches <= 0:
        return {}
    queued = delta("kleinserve_queue_seconds_count")
    return {
        "batches": int(batches),
        "mean_batch": round(delta("kleinserve_batch_size_sum") / batches, 2),
        "mean_run_ms": round(1000 * delta("kleinserve_batch_run_seconds_sum") / batches, 2),
        "model_busy": round(delta("kleinserve_batch_run_seconds_sum") / wall, 3) if wall else 0.0,
        "mean_queue_ms": round(1000 * delta("kleinserve_queue_seconds_sum") / queued, 2)
        if queued
        else 0.0,
    }
