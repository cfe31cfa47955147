"""``scripts/bench scaleout``: client-side rotation against a central proxy, on real network
stacks (``harness.cluster``: one namespace per host, every link capped with ``tc``).

For N = 1, 2, 3, 4 kleinserve hosts, the client host sends tensor predicts (float32
[1, --kib x 256] to a model that only averages them, ``scaleout_model.py``: the link, not
the CPU, must be what limits; the Open Inference Protocol's binary tensors) at a fixed
concurrency, (a) through the nginx proxy, (b) with the client library resolving
the servers from its local Consul agent and rotating across them directly. Each point
records requests/s, p50/p99 and the bytes on every host's link (the veth counters).
``--balancers`` runs, with 3 servers and one server host's link capped lower
(``--slow-rate``; this kernel has no ``sch_netem`` for a delay), the client library with each
balancer (round-robin, P2C, Peak-EWMA): requests/s, p50/p99 and the share of calls the slow
host answered. ``--failures`` then runs, with 3 servers, each of: one server host's link down, its Consul
agent killed, its kleinserve SIGSTOPped for 10 s; for each: failed calls, when the client
stopped sending to it, when Consul marked it critical; the same through the proxy.

Writes docs/scaleout-results.md, .json and .png (``--out``), and ends with the line
``scaleout N=3: direct D req/s, proxy P req/s, ratio R``. Needs root; without it the
measurement is skipped with the reason (exit 0).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from harness.cluster import AGENT, PROXY_PORT, SERVER_PORT, Cluster
from harness.netns import LinkBytes, Shaping, exec_prefix, missing_privileges
from harness.twistd import REPO
from scripts.benchmarks import scaleout_model
from scripts.benchmarks.plan import CACHE
from scripts.benchmarks.scaleout_report import markdown, plot, summary_line

VICTIM = "srv2"
FAILURE_SERVERS = 3


def say(line: str) -> None:
    print(line, flush=True)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="scripts/bench scaleout",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--servers", default="1,2,3,4", help="server counts (default %(default)s)")
    parser.add_argument("--rate", default="200mbit", help="every link's cap (default %(default)s)")
    parser.add_argument("--delay", default="1ms", help="every link's one-way delay (needs netem)")
    parser.add_argument(
        "--kib", type=int, default=512, help="tensor KiB per request (default %(default)s)"
    )
    parser.add_argument("--concurrency", type=int, default=16, help="calls in flight (default 16)")
    parser.add_argument(
        "--seconds", type=float, default=20.0, help="seconds per point (default 20)"
    )
    parser.add_argument("--failures", action="store_true", help="also the failure runs (3 servers)")
    parser.add_argument("--only-failures", action="store_true", help="only the failure runs")
    parser.add_argument(
        "--balancers", action="store_true", help="also the balancers against a slow host"
    )
    parser.add_argument(
        "--slow-rate", default="50mbit", help="the slow host's link cap (default %(default)s)"
    )
    parser.add_argument(
        "--out",
        type=Path,
        help="markdown report, .json and .png beside it (default: docs/scaleout-results.md for "
        "the whole run, N=1..4 with --failures; else .cache/bench/last/scaleout-results.md, "
        "so partial runs never overwrite docs/)",
    )
    args = parser.parse_args(argv)
    try:
        args.server_counts = sorted({int(n) for n in args.servers.split(",") if n.strip()})
    except ValueError:
        parser.error(f"--servers takes whole numbers separated by commas, not {args.servers!r}")
    if not args.server_counts or args.server_counts[0] < 1:
        parser.error("--servers needs counts of at least 1")
    if args.kib < 1 or args.concurrency < 1 or args.seconds <= 0:
        parser.error("--kib, --concurrency and --seconds must be positive")
    whole = args.server_counts == [1, 2, 3, 4] and args.failures and not args.only_failures
    args.out = args.out or (REPO / "docs" if whole else CACHE / "last") / "scaleout-results.md"
    return args


def load_command(
    cluster: Cluster,
    mode: str,
    args: argparse.Namespace,
    seconds: float,
    timeline: bool,
    balancer: str = "peak_ewma",
) -> list[str]:
    """The load generator, run inside the client host."""
    where = (
        ["--proxy", f"{cluster.host('proxy').address}:{PROXY_PORT}"]
        if mode == "proxy"
        else ["--consul", AGENT]
    )
    return [
        *exec_prefix(cluster.host("client").netns), sys.executable, "-m", "scripts.benchmarks.scaleout_load",
        *where, "--model", scaleout_model.NAME, "--shape", f"1,{args.kib * 256}",
        "--concurrency", str(args.concurrency),
        "--seconds", str(seconds), *(["--timeline"] if timeline else []),
        "--balancer", balancer,
    ]  # fmt: skip


def finish(load: subprocess.Popen[str], timeout: float) -> dict[str, Any]:
    out, err = load.communicate(timeout=timeout)
    lines = [line for line in out.splitlines() if line.startswith("{")]
    if load.returncode != 0 or not lines:
        raise RuntimeError(f"the load generator failed ({load.returncode}):\n{err[-3000:]}")
    result: dict[str, Any] = json.loads(lines[-1])
    return result


def links(
    before: dict[str, LinkBytes], after: dict[str, LinkBytes], seconds: float
) -> dict[str, Any]:
    """Per host: MB sent and received on its link, and the busier direction's Mbit/s."""
    rows = {}
    for name, end in after.items():
        delta = end - before[name]
        rows[name] = {
            "sent_mb": round(delta.sent / 1e6, 1),
            "received_mb": round(delta.received / 1e6, 1),
            "mbit_s": round(8 * max(delta.sent, delta.received) / 1e6 / seconds, 1),
        }
    return rows


def measure(cluster: Cluster, mode: str, n: int, args: argparse.Namespace) -> dict[str, Any]:
    before = cluster.counters()
    t0 = time.monotonic()
    with subprocess.Popen(load_command(cluster, mode, args, args.seconds, False), cwd=REPO, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE) as load:  # fmt: skip
        result = finish(load, args.seconds + 180)
    wall = time.monotonic() - t0  # the counters also hold the warm-up calls: per wall second
    row = {"servers": n, **result, "links": links(before, cluster.counters(), wall)}
    row.pop("failure_times", None)
    say(
        f"  N={n} {mode:<6} {row['rps']:7.1f} req/s  p50 {row['p50_ms']:6.1f} ms  p99 {row['p99_ms']:6.1f} ms  "
        f"failed {row['failed']}  proxy link {row['links']['proxy']['mbit_s']} Mbit/s  "
        f"servers {[row['links'][h.name]['mbit_s'] for h in cluster.server_hosts[:n]]} Mbit/s"
    )
    return row


def set_servers(cluster: Cluster, n: int) -> None:
    """Exactly the first ``n`` kleinserves running, passing in Consul and in nginx's upstreams."""
    hosts = [h.name for h in cluster.server_hosts]
    for name in hosts[n:]:
        cluster.stop_server(name)
    started = [name for name in hosts[:n] if name not in cluster.procs]
    for name in started:
        cluster.start_server(name)
    for name in started:
        say(f"  {name} ready in {cluster.wait_server(name):.1f} s")
    cluster.wait_passing(n)
    cluster.proxy_serves(n)


class HealthWatch:
    """Polls the client host's agent every 0.1 s: when the victim's instance leaves the
    passing listing (Consul marks it critical, or its node failed) and comes back."""

    def __init__(self, cluster: Cluster, victim: str) -> None:
        self.cluster, self.target = cluster, f"{victim}:{SERVER_PORT}"
        self.events: list[tuple[float, bool]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        last: bool | None = None
        while not self._stop.is_set():
            try:
                passing = self.target in self.cluster.passing()
            except OSError:
                passing = last if last is not None else True
            if passing != last:
                self.events.append((time.monotonic(), passing))
                last = passing
            self._stop.wait(0.1)

    def __enter__(self) -> HealthWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def left_after(self, t: float) -> float | None:
        return next((at - t for at, passing in self.events if at >= t and not passing), None)

    def back_after(self, t: float) -> float | None:
        return next((at - t for at, passing in self.events if at >= t and passing), None)


def stopped_sending(times: list[float], injected: float, gap: float = 2.0) -> float | None:
    """Seconds from ``injected`` to the last attempt before the first ``gap``-second pause in
    the attempts to the victim; None if attempts never paused that long."""
    after = [t for t in times if t >= injected]
    previous = injected
    for t in after:
        if t - previous >= gap:
            return round(previous - injected, 2)
        previous = t
    return None if after else 0.0


def inject(cluster: Cluster, kind: str) -> tuple[str, Any]:
    """Do the failure; what undoes it."""
    if kind == "link down":
        cluster.set_link(VICTIM, False)
        return "link back up", lambda: cluster.set_link(VICTIM, True)
    if kind == "agent killed":
        agent = cluster.agents[VICTIM]
        agent.stop(kill=True)
        return "agent restarted", lambda: agent.start(timeout=60)
    if kind == "SIGSTOP 10 s":
        pid = cluster.procs[VICTIM].pid
        os.kill(pid, signal.SIGSTOP)
        return "SIGCONT", lambda: os.kill(pid, signal.SIGCONT)
    raise ValueError(kind)


FAILURES = ("link down", "agent killed", "SIGSTOP 10 s")
BEFORE, HELD, AFTER = 8.0, {"link down": 15.0, "agent killed": 15.0, "SIGSTOP 10 s": 10.0}, 12.0


def failure_run(cluster: Cluster, kind: str, mode: str, args: argparse.Namespace) -> dict[str, Any]:
    victim = cluster.host(VICTIM).address
    seconds = BEFORE + HELD[kind] + AFTER
    command = load_command(cluster, mode, args, seconds, True)
    with (
        HealthWatch(cluster, victim) as health,
        subprocess.Popen(
            command, cwd=REPO, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        ) as load,
    ):
        time.sleep(BEFORE + 3)  # the load generator's start and warm-up calls come first
        injected = time.monotonic()
        undo_what, undo = inject(cluster, kind)
        time.sleep(HELD[kind])
        undone = time.monotonic()
        undo()
        result = finish(load, seconds + 180)
    times = result.get("attempt_times", {}).get(f"{victim}:{SERVER_PORT}", [])
    row = {
        "failure": kind,
        "mode": mode,
        "held_s": HELD[kind],
        "undone_by": undo_what,
        "calls": result["calls"],
        "failed": result["failed"],
        "failures": result["failures"],
        "failed_during": sum(1 for t in result["failure_times"] if injected - 1 <= t <= undone + 5),
        "rps": result["rps"],
        "p99_ms": result["p99_ms"],
        "attempt_outcomes": result["attempt_outcomes"],
        "client_stopped_s": stopped_sending(times, injected) if mode == "direct" else None,
        "attempts_to_victim_while_failed": sum(1 for t in times if injected <= t <= undone),
        "consul_critical_s": _round(health.left_after(injected)),
        "consul_passing_again_s": _round(health.back_after(undone)),
    }
    say(
        f"  {kind:<13} {mode:<6} failed {row['failed']}/{row['calls']}  client stopped after "
        f"{row['client_stopped_s']} s  Consul critical after {row['consul_critical_s']} s, passing "
        f"{row['consul_passing_again_s']} s after {undo_what}"
    )
    return row


BALANCERS = ("round_robin", "p2c", "peak_ewma")


def balancer_runs(cluster: Cluster, args: argparse.Namespace) -> list[dict[str, Any]]:
    """With ``VICTIM``'s link capped at ``--slow-rate``, each balancer's direct run: how much
    of the load the slow host answered, and the latency the client saw."""
    set_servers(cluster, FAILURE_SERVERS)
    victim = f"{cluster.host(VICTIM).address}:{SERVER_PORT}"
    cluster.set_rate(VICTIM, args.slow_rate)
    rows = []
    try:
        for balancer in BALANCERS:
            command = load_command(cluster, "direct", args, args.seconds, False, balancer)
            with subprocess.Popen(command, cwd=REPO, text=True, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE) as load:  # fmt: skip
                result = finish(load, args.seconds + 180)
            answered = result["answered_by_server"]
            row = {
                "balancer": balancer,
                "slow_rate": args.slow_rate,
                "rps": result["rps"],
                "p50_ms": result["p50_ms"],
                "p99_ms": result["p99_ms"],
                "failed": result["failed"],
                "slow_share": round(answered.get(victim, 0) / max(1, sum(answered.values())), 3),
            }
            say(
                f"  {balancer:<11} {row['rps']:7.1f} req/s  p50 {row['p50_ms']} ms  "
                f"p99 {row['p99_ms']} ms  slow host's share {row['slow_share']:.1%}  "
                f"failed {row['failed']}"
            )
            rows.append(row)
    finally:
        cluster.set_rate(VICTIM, None)
    return rows


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    why = missing_privileges()
    if why:
        say(f"scaleout: skipped: {why}")
        return 0
    signal.signal(signal.SIGTERM, _interrupted)
    model_base = scaleout_model.ensure(CACHE)
    counts = [] if args.only_failures else args.server_counts
    cluster = Cluster(
        servers=max(
            [
                *counts,
                FAILURE_SERVERS if (args.failures or args.only_failures or args.balancers) else 1,
            ]
        ),
        shaping=Shaping(args.rate, args.delay),
        client_shaping=Shaping(None, args.delay),
        workdir=CACHE / "cluster",
        model_base=model_base,
        model_name=scaleout_model.NAME,
        say=say,
    )
    results: dict[str, Any] = {
        "meta": {
            "command": shlex.join(["scripts/bench", "scaleout", *argv]),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "nproc": os.cpu_count(),
            "loadavg_start": [round(x, 2) for x in os.getloadavg()],
            "rate": args.rate,
            "model": scaleout_model.NAME,
            "request_bytes": args.kib * 1024,
            "concurrency": args.concurrency,
            "seconds": args.seconds,
        },
        "points": [],
        "failures": [],
        "balancers": [],
    }
    started = time.monotonic()
    try:
        cluster.up()
        results["meta"]["delay"] = cluster.shaping.delay or "none (no sch_netem)"
        for n in counts:
            say(f"scaleout: {n} server host(s)")
            set_servers(cluster, n)
            for mode in ("proxy", "direct"):
                results["points"].append({"mode": mode, **measure(cluster, mode, n, args)})
        if args.balancers:
            say(f"scaleout: balancers, {VICTIM}'s link capped at {args.slow_rate}")
            results["balancers"] = balancer_runs(cluster, args)
        if args.failures or args.only_failures:
            say(f"scaleout: failures of {VICTIM}, {FAILURE_SERVERS} servers")
            for kind in FAILURES:
                for mode in ("direct", "proxy"):
                    set_servers(cluster, FAILURE_SERVERS)
                    results["failures"].append(failure_run(cluster, kind, mode, args))
        results["meta"]["server_errors"] = len(cluster.server_errors())
    except KeyboardInterrupt:
        say("scaleout: interrupted; the cluster is torn down, no report written")
        return 130
    finally:
        cluster.down()
    results["meta"]["seconds_total"] = round(time.monotonic() - started, 1)
    results["meta"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    out: Path = args.out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    png = out.with_suffix(".png")
    if results["points"] and plot(results, png):
        results["meta"]["plot"] = png.name
    out.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    out.write_text(markdown(results))
    say(
        f"scaleout: wrote {out}, {out.with_suffix('.json')}"
        + (f", {png}" if results["points"] else "")
    )
    line = summary_line(results)
    if line:
        print(line)
    return 0


def _interrupted(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")
