"""What one run of ``scripts/bench`` measures, and for how long: derived from the command line."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from harness.twistd import REPO
from scripts.benchmarks import models as bench_models

SECTIONS = (
    "inprocess",
    "engine",
    "http",
    "grpc",
    "hooks",
    "triton",
    "front",
    "empty",
    "flask",
    "soak",
    "memory",
)
CACHE = REPO / ".cache" / "bench"
HEAVY_CONCURRENCY = 64  # the flask comparison, the soak and the engine's submitters
GUNICORN_WORKERS = 4


@dataclass(frozen=True)
class Plan:
    """What one run measures, and for how long; derived from the command line."""

    quick: bool
    models: tuple[str, ...]
    sections: tuple[str, ...]
    concurrencies: tuple[int, ...]
    threads: tuple[int, ...]  # num_batch_threads values to try with batching on
    duration: float  # seconds per measured point
    inprocess_seconds: float  # per batch size
    engine_warmup: float
    warmup_seconds: float
    soak_seconds: float
    soak_interval: float
    inprocess_sizes: tuple[int, ...]
    out: Path
    plot: Path
    command: str

    @property
    def json_path(self) -> Path:
        return self.out.with_suffix(".json")

    def seconds_for(self, model: str) -> float:
        """Seconds of one point of ``model``'s servers and engine runs (a quick run: --duration)."""
        return self.duration * (1 if self.quick else bench_models.MODELS[model].duration_factor)


@dataclass(frozen=True)
class Setup:
    """One server configuration of the http section."""

    key: str  # "off", "on", "on-2t"
    threads: int | None  # None: batching off

    @property
    def label(self) -> str:
        if self.threads is None:
            return "batching off"
        return f"batching on, {self.threads} thread{'s' if self.threads > 1 else ''}"


def batching_file(threads: int) -> str:
    """The --batching_parameters_file the bench uses (TF Serving's text-proto)."""
    return (
        "max_batch_size { value: 64 }\n"
        "batch_timeout_micros { value: 0 }\n"
        "max_enqueued_batches { value: 64 }\n"
        f"num_batch_threads {{ value: {threads} }}\n"
    )
