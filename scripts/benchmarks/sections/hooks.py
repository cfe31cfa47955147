"""The ``hooks`` section of ``scripts/bench``: what per-version Python hooks cost.

One kleinserve (batching on, one batch thread, the http section's batching file,
``--enable_model_hooks``) serves each model twice: as it is, and as a copy whose version holds
``examples/hooks/identity/kleinserve_hooks.py`` (``preprocess`` decodes the same JSON with the
server's own decoder, ``postprocess`` answers ``{"predictions": …}``; both on the hook
threads). At each concurrency wrk sends the same body to one, then the other, so the ratio
of their requests/s is measured in one run on one process: the cost of two trips to the hook
threads and of running the decode and encode there.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from harness.ports import LOOPBACK, free_port
from harness.processes import start
from harness.twistd import REPO
from scripts.benchmarks.plan import CACHE
from scripts.benchmarks.procs import VENV_BIN, run_wrk
from scripts.benchmarks.runner import Bench

IDENTITY = REPO / "examples" / "hooks" / "identity" / "kleinserve_hooks.py"
HOOKS_FILE = Path("assets.extra", "kleinserve_hooks.py")


def hooked_copy(model: str, base: Path) -> Path:
    """A copy of ``base`` (the model's versions) whose every version has the identity hooks."""
    copy = CACHE / "hooks" / model
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(base, copy)
    for version in copy.iterdir():
        if version.is_dir() and version.name.isdigit():
            (version / HOOKS_FILE).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(IDENTITY, version / HOOKS_FILE)
    return copy


def run(bench: Bench) -> None:
    for model in bench.plan.models:
        body = bench.body(model)
        base = bench.model(model)
        hooked = f"{model}_hooked"
        config = CACHE / "hooks" / f"{model}.config"
        config.parent.mkdir(parents=True, exist_ok=True)
        config.write_text(
            "model_config_list {\n"
            f'  config {{ name: "{model}" base_path: "{base}" model_platform: "tensorflow" }}\n'
            f'  config {{ name: "{hooked}" base_path: "{hooked_copy(model, base)}" '
            'model_platform: "tensorflow" }\n'
            "}\n"
        )
        port = free_port()
        command = [
            str(VENV_BIN / "twistd"), "-n", "--pidfile=", "--logfile=-", "inference",
            f"--model_config_file={config}", "--enable_model_hooks", "--port=0",
            f"--listen=tcp:{port}:interface={LOOPBACK}",
            "--enable_batching", f"--batching_parameters_file={bench.batching_path(1)}",
        ]  # fmt: skip
        proc = start(f"kleinserve-{model}-hooks", command, port, bench.logs)
        try:
            bench.say(f"  {proc.name} ready in {proc.wait_ready():.1f} s (pid {proc.pid})")
            urls = {
                "none": f"{proc.url}/v1/models/{model}:predict",
                "identity": f"{proc.url}/v1/models/{hooked}:predict",
            }
            bench.check_predict(proc, model, body)
            bench.check_predict(proc, hooked, body)
            for url in urls.values():
                bench.warm_up(proc, url, body)
            for concurrency in bench.plan.concurrencies:
                seconds = bench.plan.seconds_for(model)
                for hooks, url in urls.items():
                    result = run_wrk(url, body, concurrency, seconds).as_dict()
                    row = {"model": model, "hooks": hooks, "concurrency": concurrency, **result}
                    bench.results.setdefault("hooks", []).append(row)
                    bench.say(
                        f"  {model} hooks={hooks:8} c={concurrency:>2}: {row['rps']:8.1f} req/s  "
                        f"p50 {row['p50_ms']} ms  p99 {row['p99_ms']} ms  errors {row['errors']}"
                    )
        finally:
            proc.stop()
