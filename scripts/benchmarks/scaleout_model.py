"""The model of ``scripts/bench scaleout``: many bytes in, almost no compute.

    mean   x float32 [None, None] -> mean float32 [None]: each row's mean

The claim under test is about links, not models: a request must be large (hundreds of KiB)
while its compute stays negligible, so that on this machine's two shared cores a 200 Mbit/s
link fills before the CPUs do. The digits CNN costs ~10 ms of CPU per 200 KiB (64 images);
this one costs microseconds per MiB. Exported once into ``.cache/bench/models/mean/1`` by a
child process (``python -m scripts.benchmarks.scaleout_model BASE``), since it imports
TensorFlow.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from harness.twistd import REPO
from scripts.benchmarks.models import VERSION, save_version

NAME = "mean"


def ensure(cache: Path) -> Path:
    """The model's base folder (holding ``1/``), exporting it first when it is missing."""
    base = cache / "models" / NAME
    if not (base / str(VERSION) / "saved_model.pb").is_file():
        subprocess.run(
            [sys.executable, "-m", "scripts.benchmarks.scaleout_model", str(base)],
            cwd=REPO,
            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
            check=True,
            timeout=600,
        )
    return base


def export(base: Path) -> None:
    import tensorflow as tf

    module = tf.Module()

    @tf.function(input_signature=[tf.TensorSpec([None, None], tf.float32, name="x")])
    def serve(x: tf.Tensor) -> dict[str, tf.Tensor]:
        return {"mean": tf.reduce_mean(x, axis=1)}

    module.serve = serve
    save_version(module, serve, base)


if __name__ == "__main__":
    export(Path(sys.argv[1]))
