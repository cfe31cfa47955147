"""The report of ``scripts/bench scaleout``: its tables, its plot and its summary line."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from scripts.benchmarks.tables import table


def _point(results: dict[str, Any], n: int, mode: str) -> dict[str, Any] | None:
    return next((p for p in results["points"] if p["servers"] == n and p["mode"] == mode), None)


def summary_line(results: dict[str, Any]) -> str | None:
    """``scaleout N=3: direct D req/s, proxy P req/s, ratio R``; None without both N=3 points."""
    direct, proxy = _point(results, 3, "direct"), _point(results, 3, "proxy")
    if direct is None or proxy is None or not proxy["rps"]:
        return None
    ratio = direct["rps"] / proxy["rps"]
    return f"scaleout N=3: direct {direct['rps']:.1f} req/s, proxy {proxy['rps']:.1f} req/s, ratio {ratio:.2f}"


def link_capacity_rps(results: dict[str, Any]) -> float | None:
    """Requests/s one capped link carries at its rate, counting the request bodies only."""
    rate = str(results["meta"]["rate"]).lower()
    units = {"kbit": 1e3, "mbit": 1e6, "gbit": 1e9}
    for unit, factor in units.items():
        if rate.endswith(unit):
            bits = float(rate[: -len(unit)]) * factor
            return bits / 8 / results["meta"]["request_bytes"]
    return None


def points_table(results: dict[str, Any]) -> str:
    rows = []
    for p in sorted(results["points"], key=lambda p: (p["servers"], p["mode"] != "proxy")):
        n = p["servers"]
        servers = [p["links"][f"srv{i}"]["mbit_s"] for i in range(1, n + 1)]
        rows.append(
            [
                str(n),
                "through nginx" if p["mode"] == "proxy" else "client library, direct",
                f"{p['rps']:.1f}",
                f"{p['p50_ms']:.0f}",
                f"{p['p99_ms']:.0f}",
                str(p["failed"]),
                f"{p['links']['proxy']['mbit_s']:.0f}",
                " / ".join(f"{s:.0f}" for s in servers),
                f"{p['links']['client']['mbit_s']:.0f}",
            ]
        )
    head = ["N", "path", "req/s", "p50 ms", "p99 ms", "failed", "proxy link Mbit/s",
            "each server's link Mbit/s", "client link Mbit/s"]  # fmt: skip
    return table(head, rows, True)


def failures_table(results: dict[str, Any]) -> str:
    rows = []
    for f in results["failures"]:
        rows.append(
            [
                f["failure"],
                "through nginx" if f["mode"] == "proxy" else "client library, direct",
                f"{f['failed']} / {f['calls']}",
                ", ".join(f"{k} {v}" for k, v in f["failures"].items()) or "-",
                "-" if f["client_stopped_s"] is None else f"{f['client_stopped_s']:.2f}",
                str(f["attempts_to_victim_while_failed"]) if f["mode"] == "direct" else "-",
                "-" if f["consul_critical_s"] is None else f"{f['consul_critical_s']:.2f}",
                "not within the run"
                if f["consul_passing_again_s"] is None
                else f"{f['consul_passing_again_s']:.2f}",
                f"{f['p99_ms']:.0f}",
            ]
        )
    head = ["failure of srv2", "path", "failed calls", "errors", "client stopped sending after s",
            "attempts to it while failed", "Consul critical after s",
            "passing again after s (from the undo)",
            "p99 ms"]  # fmt: skip
    return table(head, rows, True)


def balancers_table(results: dict[str, Any]) -> str:
    rows = [
        "| balancer | req/s | p50 ms | p99 ms | slow host's share | failed calls |",
        "|---|---|---|---|---|---|",
    ]
    for r in results["balancers"]:
        rows.append(
            f"| {r['balancer']} | {r['rps']:.1f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | "
            f"{r['slow_share']:.1%} | {r['failed']} |"
        )
    return "\n".join(rows)


def markdown(results: dict[str, Any]) -> str:
    meta = results["meta"]
    capacity = link_capacity_rps(results)
    lines = [
        "# Scale-out: client-side rotation against a central proxy (measured)",
        "",
        "Written by `scripts/bench scaleout`; how to read it, the topology and what limits the",
        "figures: [scaleout.md](scaleout.md).",
        "",
        f"Run `{meta['command']}` on {meta['date']}, {meta['nproc']} cores shared by every host "
        f"(load average {meta['loadavg_start'][0]} at the start). Every link capped at "
        f"{meta['rate']} each way (tc tbf), delay {meta.get('delay', '?')}; the client host's link "
        f"not capped. Requests: one float32 tensor of {meta['request_bytes'] // 1024} KiB each "
        f"to the `{meta['model']}` model (scaleout_model.py; Open Inference Protocol binary), "
        f"{meta['concurrency']} calls in flight, {meta['seconds']:g} s per point"
        + (
            f"; one capped link carries at most {capacity:.0f} such requests/s."
            if capacity
            else "."
        ),
        "",
    ]
    if results["points"]:
        line = summary_line(results)
        lines += ["## Throughput by number of servers", "", points_table(results), ""]
        if line:
            lines += [f"`{line}`", ""]
        if meta.get("plot"):
            lines += [f"![requests/s by number of servers]({meta['plot']})", ""]
    if results["failures"]:
        lines += [
            "## Failures of one server host (3 servers)",
            "",
            "Times are from the failure. *Client stopped sending*: the last attempt to the failed",
            "server before a 2 s pause in attempts to it. *Consul critical*: when it left the",
            "passing listing of the client host's agent.",
            "",
            failures_table(results),
            "",
        ]
    if results.get("balancers"):
        lines += [
            "## Balancers with one slow host (3 servers)",
            "",
            f"srv2's link capped at {results['balancers'][0]['slow_rate']} (the others at "
            f"{meta['rate']}), the client library rotating directly with each balancer. "
            "*Slow host's share*: of the calls answered, the ones srv2 answered.",
            "",
            balancers_table(results),
            "",
        ]
    lines.append(f"Kleinserve logs held {meta.get('server_errors', '?')} unexpected tracebacks.")
    return "\n".join(lines) + "\n"


def plot(results: dict[str, Any], path: Path) -> bool:
    """requests/s against N for both paths, with one link's capacity; False without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for mode, label in (("direct", "client library, direct"), ("proxy", "through nginx")):
        points = sorted(
            (p for p in results["points"] if p["mode"] == mode), key=lambda p: p["servers"]
        )
        ax.plot([p["servers"] for p in points], [p["rps"] for p in points], marker="o", label=label)
    capacity = link_capacity_rps(results)
    if capacity:
        ax.axhline(
            capacity, color="black", linestyle=":", label=f"one {results['meta']['rate']} link"
        )
    ax.set_xlabel("server hosts")
    ax.set_ylabel("requests/s")
    ax.set_xticks(sorted({p["servers"] for p in results["points"]}))
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    meta = results["meta"]
    ax.set_title(
        f"{meta['request_bytes'] // 1024} KiB/request, "
        f"c={meta['concurrency']}, {meta['nproc']} cores, {meta['date']}",
        fontsize=9,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
