"""Processes for ``scripts/bench``: servers on free loopback ports, their memory, and ``hey``.

Every process the bench starts is a ``Proc``: started in a session of its own (so a server
and its workers, gunicorn's say, are one process group), logged to a file, and stopped by
group id with SIGTERM, then SIGKILL. ``stop_all`` stops whatever is still running; the
bench calls it on every way out (normal end, error, Ctrl-C, SIGTERM).

This is not ``tests/server.py``'s ``TwistdServer``: the bench also runs the empty Klein
app and gunicorn, needs the whole process tree for memory, and must not fail on assertions.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
LOOPBACK = "127.0.0.1"  # the only address the bench ever listens on or sends to


class BenchError(RuntimeError):
    """Something the bench could not measure; the message says what, with the log's tail."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def http_get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    """GET ``url``: (status, body); (0, b"") when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except OSError:
        return 0, b""


_LIVE: list[Proc] = []


@dataclass(eq=False)
class Proc:
    """One started server: its command, port, log file and process group."""

    name: str
    command: list[str]
    port: int
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self) -> Proc:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONUNBUFFERED": "1", **self.env}
        for name in ("CONSUL_HTTP_ADDR", "CONSUL_HTTP_TOKEN"):  # a bench server joins no Consul
            env.pop(name, None)
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                self.command,
                cwd=REPO,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: stopped as one, spared our Ctrl-C
            )
        _LIVE.append(self)
        return self

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def wait_ready(
        self,
        path: str = "/readyz",
        timeout: float = 180.0,
        ready: Callable[[bytes], bool] = lambda body: True,
    ) -> float:
        """Poll ``GET path`` until 200 (and ``ready(body)``); return the seconds it took."""
        started = time.monotonic()
        deadline = started + timeout
        while time.monotonic() < deadline:
            if not self.running():
                code = self.process.returncode if self.process else None
                raise BenchError(f"{self.name} exited with {code}:\n{self.log_tail()}")
            status, body = http_get(self.url + path, timeout=2.0)
            if status == 200 and ready(body):
                return time.monotonic() - started
            time.sleep(0.1)
        raise BenchError(f"{self.name} not ready after {timeout:.0f} s:\n{self.log_tail()}")

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM the process group, then SIGKILL it if it has not exited in ``timeout``."""
        if self in _LIVE:
            _LIVE.remove(self)
        if self.process is None or self.process.poll() is not None:
            return
        for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 10.0)):
            try:
                os.killpg(self.process.pid, sig)
            except ProcessLookupError:
                return
            try:
                self.process.wait(wait)
                break
            except subprocess.TimeoutExpired:
                continue
        # Workers left in the group after the leader exited (gunicorn's, if the master died first).
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def stop_all() -> None:
    for proc in list(_LIVE):
        proc.stop()


def start(name: str, command: Sequence[str], port: int, logs: Path, **env: str) -> Proc:
    return Proc(name, list(command), port, logs / f"{name}-{port}.log", dict(env)).start()


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


# -- hey -------------------------------------------------------------------------------------


@dataclass
class HeyResult:
    """One ``hey`` run: successful requests per second, latency of the successful ones, errors."""

    seconds: float
    ok: int  # 200 responses
    rps: float  # 200 responses per second
    p50_ms: float | None
    p99_ms: float | None
    errors: int  # non-200 responses plus requests that got no response
    statuses: dict[int, int]
    error_messages: dict[str, int]

    def as_dict(self) -> dict[str, object]:
        return {
            "rps": round(self.rps, 1),
            "p50_ms": _round(self.p50_ms),
            "p99_ms": _round(self.p99_ms),
            "ok": self.ok,
            "errors": self.errors,
            "seconds": round(self.seconds, 2),
            "statuses": {str(k): v for k, v in self.statuses.items()},
            "error_messages": dict(list(self.error_messages.items())[:5]),
        }


def _round(value: float | None, digits: int = 2) -> float | None:
    return None if value is None else round(value, digits)


_TOTAL = re.compile(r"^\s*Total:\s+([\d.]+) secs", re.M)
_SLOWEST = re.compile(r"^\s*Slowest:\s+([\d.]+) secs", re.M)
_PERCENTILE = re.compile(r"^\s*(\d+)% in ([\d.]+) secs", re.M)
_STATUS = re.compile(r"^\s*\[(\d+)\]\s+(\d+) responses", re.M)
_ERROR = re.compile(r"^\s*\[(\d+)\]\s+(.+)$", re.M)


def parse_hey(text: str) -> HeyResult:
    """Read hey's summary: Total, the latency distribution, status codes and errors."""
    total = _TOTAL.search(text)
    if total is None:
        raise BenchError(f"hey printed no summary:\n{text[-2000:]}")
    seconds = float(total.group(1))
    percentiles = {int(p): float(s) * 1000 for p, s in _PERCENTILE.findall(text)}
    slowest = _SLOWEST.search(text)
    if 99 not in percentiles and 50 in percentiles and slowest is not None:
        # hey prints no 99% line for fewer than 100 answers; the p99 of those is the slowest.
        percentiles[99] = float(slowest.group(1)) * 1000
    statuses = {int(code): int(n) for code, n in _STATUS.findall(text)}
    error_messages: dict[str, int] = {}
    if "Error distribution:" in text:
        tail = text.split("Error distribution:", 1)[1]
        error_messages = {message.strip(): int(n) for n, message in _ERROR.findall(tail)}
    ok = statuses.get(200, 0)
    errors = sum(n for code, n in statuses.items() if code != 200) + sum(error_messages.values())
    return HeyResult(
        seconds=seconds,
        ok=ok,
        rps=ok / seconds if seconds > 0 else 0.0,
        p50_ms=percentiles.get(50),
        p99_ms=percentiles.get(99),
        errors=errors,
        statuses=statuses,
        error_messages=error_messages,
    )


def hey_command(
    url: str,
    body: Path,
    concurrency: int,
    *,
    seconds: float | None = None,
    requests: int | None = None,
) -> list[str]:
    """``hey -z Ns`` (a timed run) or ``hey -n N`` (a counted one), POSTing ``body`` as JSON."""
    if seconds is not None:
        amount = ["-z", f"{max(1, round(seconds))}s"]
    else:
        # hey gives each worker n // c requests: round up so all of them are sent.
        amount = ["-n", str(-(-max(requests or 0, concurrency) // concurrency) * concurrency)]
    return [
        "hey",
        *amount,
        "-c",
        str(concurrency),
        "-m",
        "POST",
        "-T",
        "application/json",
        "-D",
        str(body),
        url,
    ]


def run_hey(
    url: str,
    body: Path,
    concurrency: int,
    *,
    seconds: float | None = None,
    requests: int | None = None,
) -> HeyResult:
    """Run hey to the end and parse its summary (bounded: hey's own -z/-n, plus a timeout)."""
    command = hey_command(url, body, concurrency, seconds=seconds, requests=requests)
    limit = (seconds or 0) + 120 + (requests or 0) * 0.5
    done = subprocess.run(command, capture_output=True, text=True, timeout=limit, check=False)
    if done.returncode != 0:
        raise BenchError(f"hey failed ({done.returncode}): {done.stderr[-2000:]}")
    return parse_hey(done.stdout)


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
