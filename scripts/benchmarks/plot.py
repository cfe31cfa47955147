"""The plot of ``docs/benchmarks.png``: requests/s against concurrency, one panel per model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from scripts.benchmarks.report import _models, _sorted_http, _title


def plot(results: dict[str, Any], path: Path) -> bool:
    """requests/s by concurrency for each configuration, one panel per model; False if no data."""
    models = [
        m
        for m in _models(results)
        if any(r["model"] == m for r in results.get("http", []))
        or m in results.get("inprocess", {})
    ]
    if not models:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(models), figsize=(6.5 * len(models), 4.8), squeeze=False)
    for ax, model in zip(axes[0], models, strict=True):
        rows = [r for r in _sorted_http(results) if r["model"] == model]
        for config in dict.fromkeys(r["config"] for r in rows):
            points = [r for r in rows if r["config"] == config]
            style = "--" if config == "empty" else "-"
            ax.plot(
                [r["concurrency"] for r in points],
                [max(r["rps"], 1e-3) for r in points],
                style,
                marker="o",
                label=points[0]["label"] + (" (HTTP ceiling)" if config == "empty" else ""),
            )
        limit = results.get("inprocess", {}).get(model)
        if limit:
            ax.axhline(
                limit["best_instances_per_s"],
                color="black",
                linestyle=":",
                label=f"in-process limit (batch {limit['best_size']}), instances/s",
            )
        for key, run in results.get("engine", {}).get(model, {}).items():
            ax.plot(
                [64],
                [max(run["instances_per_s"], 1e-3)],
                marker="s" if key == "off" else "^",
                linestyle="none",
                label=f"engine alone, {run.get('label', key)}",
            )
        flask = results.get("flask", {})
        if model == "digits" and "flask" in flask:
            ax.plot(
                [flask["concurrency"]],
                [max(flask["flask"]["rps"], 1e-3)],
                marker="x",
                markersize=9,
                linestyle="none",
                color="red",
                label=f"Flask + gunicorn -w {flask.get('workers', 4)}",
            )
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks([1, 8, 64], labels=["1", "8", "64"])
        ax.set_xlabel("concurrent requests (engine: submitters)")
        ax.set_ylabel("requests/s (in-process, engine: instances/s)")
        ax.set_title(_title(model))
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    meta = results["meta"]
    fig.suptitle(
        f"kleinserve, {meta['nproc']} cores, {meta['mode']} run, {meta['date']}", fontsize=10
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
