"""Client-side load balancing against a proxy: the same three servers, called directly by
``AsyncInferenceClient`` (backends from Consul) or through nginx (round-robin upstream).

    scripts/bench client --duration 10

Starts a Consul dev agent and three ``twistd`` servers of the demo digits model
(``models/digits``; ``scripts/export-demo-model`` makes it) or of the tests' ``make_linear``
(``--model linear``), and nginx in front of them. One client process at ``--concurrency``
measures, for each setup: calls per second, p50 and p99 latency, and the client's own CPU
seconds per call (``getrusage`` of this process). ``run(duration)`` returns the numbers as
a dict, for ``scripts/bench`` to include. Everything listens on 127.0.0.1 only.

Numbers from a shared 2-core machine are noisy; compare the rows of one run, not runs.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import crochet
import numpy as np
from twisted.internet import defer
from twisted.internet.defer import Deferred

from client import AsyncInferenceClient, InferenceError
from harness.consul import CONSUL_BINARY, ConsulAgent
from harness.ports import LOOPBACK, free_port
from harness.twistd import REPO, TwistdServer

NGINX_CONF = """\
worker_processes 2;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    client_max_body_size 64m;
    upstream kleinserve {{
{servers}
        keepalive 64;
    }}
    server {{
        listen {listen};
        location / {{
            proxy_pass http://kleinserve;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_next_upstream error timeout http_503 non_idempotent;
        }}
    }}
}}
"""


def say(message: str) -> None:
    print(f"bench_client: {message}", file=sys.stderr, flush=True)


# --- processes ------------------------------------------------------------------------------------


def model_folder(model: str, work: Path) -> tuple[str, Path]:
    """The model's name and base folder; make_linear is built in a child (no TensorFlow here)."""
    if model == "digits":
        base = REPO / "models" / "digits"
        if not (base / "1" / "saved_model.pb").exists():
            raise SystemExit(
                "no models/digits: run scripts/export-demo-model first (or use --model linear)"
            )
        return "digits", base
    base = work / "linear"
    code = f"from pathlib import Path; from tests.models import make_linear; make_linear(Path({str(base)!r}))"
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, capture_output=True)
    return "linear", base


def nginx_binary() -> str:
    found = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/local/sbin")
    if found:
        return found
    say("nginx is missing: installing Debian's (apt-get install -y -qq nginx)")
    env = {"DEBIAN_FRONTEND": "noninteractive", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
    subprocess.run(["apt-get", "install", "-y", "-qq", "nginx"], check=True, env=env)
    found = shutil.which("nginx", path="/usr/sbin:/usr/bin")
    if not found:
        raise SystemExit("nginx did not install")
    return found


class Nginx:
    """nginx in the foreground with a config, pid, logs and temp files in a folder of its own."""

    def __init__(self, backends: list[int], work: Path) -> None:
        self.port = free_port()
        self.tmp = work / "nginx"
        self.tmp.mkdir()
        servers = "\n".join(f"        server {LOOPBACK}:{port};" for port in backends)
        self.conf = self.tmp / "nginx.conf"
        self.conf.write_text(
            NGINX_CONF.format(tmp=self.tmp, servers=servers, listen=f"{LOOPBACK}:{self.port}")
        )
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> Nginx:
        command = [
            nginx_binary(),
            "-p", str(self.tmp), "-e", str(self.tmp / "error.log"),
            "-c", str(self.conf), "-g", "daemon off;",
        ]  # fmt: skip
        log = open(self.tmp / "stdout.log", "wb")
        self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise SystemExit(f"nginx exited: {(self.tmp / 'error.log').read_text()[-2000:]}")
            try:
                import urllib.request

                with urllib.request.urlopen(f"http://{LOOPBACK}:{self.port}/readyz", timeout=2):
                    return self
            except OSError:
                time.sleep(0.1)
        raise SystemExit("nginx did not answer within 30 s")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGQUIT)  # graceful: finish requests, then exit
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


# --- measuring ------------------------------------------------------------------------------------


class Measurement:
    """``concurrency`` workers calling predict on the reactor thread for ``seconds``."""

    def __init__(self, client: AsyncInferenceClient, model: str, inputs: np.ndarray) -> None:
        self.client = client
        self.model = model
        self.inputs = inputs
        self.latencies: list[float] = []
        self.failures: list[str] = []
        self._stop_at = 0.0

    def run(self, seconds: float, concurrency: int) -> Deferred[Any]:
        self._stop_at = time.perf_counter() + seconds
        workers = [Deferred.fromCoroutine(self._worker()) for _ in range(concurrency)]
        return defer.gatherResults(workers)

    async def _worker(self) -> None:
        while time.perf_counter() < self._stop_at:
            started = time.perf_counter()
            try:
                await self.client.predict(self.model, self.inputs, timeout=30)
            except InferenceError as e:
                self.failures.append(f"{type(e).__name__}: {e}")
                continue
            self.latencies.append(time.perf_counter() - started)


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def measure(
    make_client: Any, model: str, inputs: np.ndarray, seconds: float, concurrency: int
) -> dict[str, Any]:
    """Warm up for a second or two, then measure one setup."""
    client = crochet.run_in_reactor(make_client)().wait(30)
    try:
        warm = Measurement(client, model, inputs)
        crochet.run_in_reactor(warm.run)(min(2.0, seconds / 4), concurrency).wait(120)
        measured = Measurement(client, model, inputs)
        cpu, wall = cpu_seconds(), time.perf_counter()
        crochet.run_in_reactor(measured.run)(seconds, concurrency).wait(seconds + 120)
        cpu, wall = cpu_seconds() - cpu, time.perf_counter() - wall
        stats = client.stats
    finally:
        crochet.run_in_reactor(client.close)().wait(30)
    latencies = np.array(measured.latencies) * 1000 if measured.latencies else np.zeros(1)
    calls = len(measured.latencies)
    return {
        "calls": calls,
        "failed": len(measured.failures),
        "first_failure": measured.failures[0] if measured.failures else None,
        "calls_per_second": round(calls / wall, 1),
        "p50_ms": round(float(np.percentile(latencies, 50)), 2),
        "p99_ms": round(float(np.percentile(latencies, 99)), 2),
        "client_cpu_ms_per_call": round(1000 * cpu / max(1, calls + len(measured.failures)), 3),
        "retries": stats.retries,
    }


def run(duration: float = 10.0, *, concurrency: int = 64, model: str = "digits") -> dict[str, Any]:
    """Start everything, measure direct (p2c, round-robin) and nginx, stop everything."""
    crochet.setup()
    from twisted.internet import reactor

    work = Path(tempfile.mkdtemp(prefix="kleinserve-bench-client-"))
    consul = ConsulAgent(CONSUL_BINARY, work)
    servers: list[TwistdServer] = []
    nginx: Nginx | None = None
    finished = False
    try:
        name, base = model_folder(model, work)
        say(f"starting Consul and 3 servers of {name} (logs in {work})")
        consul.start()
        flags = [
            f"--model_name={name}",
            f"--model_base_path={base}",
            "--enable_batching",
            f"--consul={consul.http_addr}",
            "--consul_check_interval=1",
            "--drain_delay=1",
        ]
        servers = [TwistdServer(flags, work).start() for _ in range(3)]
        for server in servers:
            server.wait_ready(300)
        wait_passing(consul, {s.port for s in servers})
        nginx = Nginx([s.port for s in servers], work).start()
        inputs = (
            np.random.default_rng(1).random((1, 28, 28, 1), dtype=np.float32)
            if name == "digits"
            else np.ones((1, 3), np.float32)
        )
        # One protocol for all three, so only the path differs: REST JSON, which the figures
        # in docs/benchmarks-client.md were measured with (the client's default, "auto",
        # would send v2 to the servers found in Consul but REST to nginx, which has no tags).
        setups = {
            "direct_p2c": lambda: AsyncInferenceClient(
                consul.http_addr,
                reactor=reactor,
                connections_per_backend=concurrency,
                protocol="rest",
            ),
            "direct_round_robin": lambda: AsyncInferenceClient(
                consul.http_addr,
                reactor=reactor,
                balancer="round_robin",
                connections_per_backend=concurrency,
                protocol="rest",
            ),
            "nginx_round_robin": lambda: AsyncInferenceClient(
                backends=[(LOOPBACK, nginx.port)],
                reactor=reactor,
                connections_per_backend=concurrency,
                protocol="rest",
            ),
        }
        results: dict[str, Any] = {
            "model": name,
            "duration_s": duration,
            "concurrency": concurrency,
            "servers": 3,
        }
        for label, make in setups.items():
            say(f"measuring {label} for {duration:g} s at concurrency {concurrency}")
            results[label] = measure(make, name, inputs, duration, concurrency)
        finished = True
        return results
    finally:
        if nginx is not None:
            nginx.stop()
        for server in servers:
            server.stop()
        consul.stop(kill=True)
        if finished:
            shutil.rmtree(work, ignore_errors=True)
        else:
            say(f"logs kept in {work}")


def wait_passing(consul: ConsulAgent, ports: set[int], timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status, _, entries = consul.get("/v1/health/service/inference?passing")
        if status == 200 and {e["Service"]["Port"] for e in entries} == ports:
            return
        time.sleep(0.2)
    raise SystemExit(f"the servers were not all passing in Consul after {timeout:g} s")


def table(results: dict[str, Any]) -> str:
    rows = [("setup", "calls/s", "p50 ms", "p99 ms", "client CPU ms/call", "failed")]
    for label in ("direct_p2c", "direct_round_robin", "nginx_round_robin"):
        r = results[label]
        rows.append(
            (
                label,
                f"{r['calls_per_second']:.0f}",
                f"{r['p50_ms']:.1f}",
                f"{r['p99_ms']:.1f}",
                f"{r['client_cpu_ms_per_call']:.3f}",
                str(r["failed"]),
            )
        )
    widths = [max(len(row[n]) for row in rows) for n in range(len(rows[0]))]
    return "\n".join(
        "  ".join(
            cell.rjust(w) if n else cell.ljust(w)
            for n, (cell, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in rows
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="scripts/bench client", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per setup")
    parser.add_argument("--concurrency", type=int, default=64, help="calls in flight")
    parser.add_argument("--model", choices=("digits", "linear"), default="digits")
    parser.add_argument("--json", type=Path, help="also write the numbers to this file")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # run the cleanup in run()'s finally
    results = run(args.duration, concurrency=args.concurrency, model=args.model)
    print(
        f"\n{results['model']}, 3 servers, one client process at concurrency "
        f"{results['concurrency']}, {results['duration_s']:g} s per setup\n"
    )
    print(table(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
