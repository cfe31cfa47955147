"""The two models ``scripts/bench`` serves, and one real request body for each.

    digits     the demo CNN, trained and exported by scripts/export_demo_model.py's export()
               image float32 [None, 28, 28, 1] -> probabilities float32 [None, 10]
    mobilenet  keras.applications.MobileNetV2(weights=None), random weights from a fixed seed
               image float32 [None, 224, 224, 3] -> probabilities float32 [None, 1000]

Both are cached in TF Serving's layout under ``.cache/bench/models/NAME/1`` and exported
only when missing. Exporting runs in a child process (``python -m scripts.benchmarks.models
NAME BASE``): it imports TensorFlow, and the digits export turns on op determinism for the rest
of its process, which must not leak into anything the bench measures.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from harness.twistd import REPO

VERSION = 1
SEED = 20240607


@dataclass(frozen=True)
class ModelSpec:
    name: str
    title: str
    image_shape: tuple[int, int, int]
    # Points of this model's servers last this many times --duration: a MobileNetV2 batch of
    # 64 takes seconds on 2 cores, and a point must hold several of them.
    duration_factor: float = 1.0


MODELS = {
    "digits": ModelSpec("digits", "digits CNN (28x28x1)", (28, 28, 1)),
    "mobilenet": ModelSpec("mobilenet", "MobileNetV2 (224x224x3)", (224, 224, 3), 2.0),
}


def ensure_model(name: str, cache: Path, log: Path) -> Path:
    """The model's base folder (holding ``1/``), exporting it first when it is missing."""
    base = cache / "models" / name
    if (base / str(VERSION) / "saved_model.pb").is_file():
        return base
    print(f"  exporting {name} into {base} (once; cached afterwards)", flush=True)
    started = time.monotonic()
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("wb") as out:
        done = subprocess.run(
            [sys.executable, "-m", "scripts.benchmarks.models", name, str(base)],
            cwd=REPO,
            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
            stdout=out,
            stderr=subprocess.STDOUT,
            timeout=900,
            check=False,
        )
    if done.returncode != 0 or not (base / str(VERSION) / "saved_model.pb").is_file():
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
        raise RuntimeError(f"exporting {name} failed ({done.returncode}):\n{tail}")
    print(f"  exported {name} in {time.monotonic() - started:.0f} s", flush=True)
    return base


def write_body(spec: ModelSpec, path: Path) -> int:
    """Write ``{"instances": [image]}``, random floats in [0, 1) to 4 decimals; return its size."""
    import numpy as np

    rng = np.random.default_rng(SEED)
    image = np.round(rng.random(spec.image_shape), 4).tolist()
    data = json.dumps({"instances": [image]}, separators=(",", ":")).encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return len(data)


# -- exporting (in the child process) --------------------------------------------------------


def export_digits(base: Path) -> None:
    """Train and export the demo CNN with scripts/export_demo_model.py's own ``export``."""
    from scripts import export_demo_model

    export_demo_model.export(base, samples=None)


def export_mobilenet(base: Path) -> None:
    """MobileNetV2 with seeded random weights, as a SavedModel with the serving names."""
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(SEED)
    model = keras.applications.MobileNetV2(
        weights=None, input_shape=MODELS["mobilenet"].image_shape
    )
    module = tf.Module()
    module.model = model  # tracked, so its variables are saved

    @tf.function(input_signature=[tf.TensorSpec([None, 224, 224, 3], tf.float32, name="image")])
    def serve(image: tf.Tensor) -> dict[str, tf.Tensor]:
        return {"probabilities": model(image, training=False)}

    module.serve = serve
    save_version(module, serve, base)


def save_version(module: object, serve: object, base: Path) -> None:
    """Save ``module`` with ``serve`` as its serving_default signature into ``base/1``."""
    import tensorflow as tf

    base.mkdir(parents=True, exist_ok=True)
    # Written beside its final place and renamed in, so a half-written model is never cached.
    staged = Path(tempfile.mkdtemp(prefix=f".{VERSION}.tmp-", dir=base))
    try:
        tf.saved_model.save(module, str(staged), signatures={"serving_default": serve})
        staged.chmod(0o755)
        target = base / str(VERSION)
        if target.exists():
            shutil.rmtree(target)
        staged.rename(target)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    print(f"exported {base / str(VERSION)}")


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in MODELS:
        print(
            f"usage: python -m scripts.benchmarks.models {{{','.join(MODELS)}}} BASE_FOLDER",
            file=sys.stderr,
        )
        return 2
    name, base = argv[0], Path(argv[1])
    {"digits": export_digits, "mobilenet": export_mobilenet}[name](base)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
