"""Record a real Triton server's answers to the conformance calls (``tests/v2_conformance.py``).

Run by ``scripts/record-triton`` in PyTriton's own environment (``.peers/pytriton/venv``: the
``nvidia-pytriton`` package, which bundles Triton's server binary, and TensorFlow), never in
the project's. It makes the test models with ``tests/models.py``, serves each through PyTriton
(a Python callable that runs the SavedModel's ``serving_default`` signature, bound with the
signature's inputs and outputs as tensor specs), sends every call of ``CALLS`` once and
writes the answers to ``tests/data/triton/answers.json``.

The models' dimensions: ``dtypes`` (every input [None, 2]) is bound with batching (the
batch dimension left out of its specs, a ``DynamicBatcher``), so Triton's own batching checks
answer for it; ``multi`` and ``strings`` have inputs of one dimension ([None]), which PyTriton
cannot bind with batching (Triton would need a per-row shape of [] there), so they are bound
without batching and their specs are the signature's shapes, -1 for None. Triton reports
both as kleinserve does: [-1, 2], [-1].
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from harness.ports import free_port
from tests import models, v2_conformance

REPO = Path(__file__).resolve().parent.parent

BATCHED = {"dtypes"}
MAX_BATCH_SIZE = 64


def numpy_dtype(tf_dtype: Any) -> Any:
    return np.bytes_ if tf_dtype.name == "string" else np.dtype(tf_dtype.as_numpy_dtype)


def specs(structure: Any, batched: bool) -> list[Any]:
    """PyTriton tensor specs for a signature's ``TensorSpec`` mapping, in name order."""
    from pytriton.model_config import Tensor

    tensors = []
    for name, spec in sorted(structure.items()):
        shape = [-1 if d is None else d for d in spec.shape.as_list()]
        tensors.append(
            Tensor(name=name, dtype=numpy_dtype(spec.dtype), shape=tuple(shape[batched:]))
        )
    return tensors


def infer_function(signature: Any) -> Callable[[list[Any]], list[dict[str, np.ndarray]]]:
    """Run each request (a mapping of input arrays) through the SavedModel's signature."""
    import tensorflow as tf

    def infer(requests: list[Any]) -> list[dict[str, np.ndarray]]:
        answers = []
        for request in requests:
            outputs = signature(**{name: tf.constant(array) for name, array in request.items()})
            answers.append({name: tensor.numpy() for name, tensor in outputs.items()})
        return answers

    return infer


def tidy(answer: dict[str, Any]) -> dict[str, Any]:
    """An answer with its error text cut to the first line (the test compares only that there
    is one; PyTriton's errors go on with a traceback full of this machine's paths)."""
    doc = answer.get("json")
    if isinstance(doc, dict) and isinstance(doc.get("error"), str):
        answer["json"] = {**doc, "error": doc["error"].splitlines()[0][:300]}
    return answer


def record(output: Path) -> None:
    import tensorflow as tf
    from pytriton.model_config import DynamicBatcher, ModelConfig
    from pytriton.triton import Triton, TritonConfig

    port = free_port()
    config = TritonConfig(
        http_address="127.0.0.1",
        http_port=port,
        grpc_address="127.0.0.1",
        grpc_port=free_port(),
        metrics_port=free_port(),
        log_verbose=0,
    )
    with tempfile.TemporaryDirectory() as root, Triton(config=config) as triton:
        for name, maker in v2_conformance.MODELS.items():
            folder = getattr(models, maker)(Path(root) / name)
            signature = tf.saved_model.load(str(folder)).signatures["serving_default"]
            batched = name in BATCHED
            triton.bind(
                model_name=name,
                infer_func=infer_function(signature),
                inputs=specs(signature.structured_input_signature[1], batched),
                outputs=specs(signature.structured_outputs, batched),
                config=ModelConfig(
                    batching=batched,
                    max_batch_size=MAX_BATCH_SIZE if batched else 0,
                    batcher=DynamicBatcher(max_queue_delay_microseconds=1000),
                ),
                strict=True,
            )
        triton.run()
        answers = {}
        for call in v2_conformance.CALLS:
            answers[call.name] = {
                "request": call.digest(),
                **v2_conformance.send("127.0.0.1", port, call),
            }
            print(f"{call.name}: {answers[call.name]['status']}", file=sys.stderr)
    server = answers["server_metadata"]["json"]
    document = {
        "recorded_with": {
            "server": f"{server['name']} {server['version']}",
            "nvidia-pytriton": metadata.version("nvidia-pytriton"),
            "tensorflow-cpu": tf.__version__,
            "numpy": np.__version__,
        },
        "answers": answers,
    }
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(document, indent=1, ensure_ascii=False, sort_keys=True) + "\n")
    print(f"wrote {len(answers)} answers of {document['recorded_with']['server']} to {output}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=v2_conformance.RECORDING)
    record(parser.parse_args().output)


if __name__ == "__main__":
    main()
