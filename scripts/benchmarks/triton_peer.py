"""A Triton server (PyTriton's bundled ``tritonserver``) serving the bench's SavedModels: the
peer of ``scripts/bench``'s triton section. Runs in PyTriton's own environment::

    scripts/pytriton scripts.benchmarks.triton_peer --http-port P --grpc-port G NAME=DIR …

Each model is its SavedModel's ``serving_default`` (DIR holds the version folders; the highest
is served) bound with the same names kleinserve serves (input ``image``, output
``probabilities``), so one request body goes to both servers, and with Triton's dynamic
batcher under the same limits as kleinserve's batching file in the bench: batches of up to
64 rows, no queue delay. Imports only what PyTriton's environment has (numpy < 2,
TensorFlow, pytriton), nothing of the project.
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path
from typing import Any

MAX_BATCH_SIZE = 64  # kleinserve's bench batching file: max_batch_size 64
QUEUE_DELAY_US = 0  # and batch_timeout_micros 0


def infer_function(signature: Any) -> Any:
    import numpy as np
    import tensorflow as tf
    from pytriton.decorators import batch

    @batch
    def infer(image: np.ndarray) -> dict[str, np.ndarray]:
        outputs = signature(image=tf.constant(image.astype(np.float32, copy=False)))
        return {"probabilities": outputs["probabilities"].numpy()}

    return infer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--http-port", type=int, required=True)
    parser.add_argument("--grpc-port", type=int, required=True)
    parser.add_argument("models", nargs="+", help="NAME=DIR, DIR holding version folders")
    args = parser.parse_args(argv)

    import numpy as np
    import tensorflow as tf
    from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
    from pytriton.triton import Triton, TritonConfig

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # `with Triton` then stops the server
    config = TritonConfig(
        http_address="127.0.0.1",
        http_port=args.http_port,
        grpc_address="127.0.0.1",
        grpc_port=args.grpc_port,
        allow_metrics=False,
    )
    with Triton(config=config) as triton:
        for spec in args.models:
            name, _, folder = spec.partition("=")
            versions = [p for p in Path(folder).iterdir() if p.name.isdigit()]
            latest = max(versions, key=lambda p: int(p.name))
            signature = tf.saved_model.load(str(latest)).signatures["serving_default"]
            image = signature.structured_input_signature[1]["image"]
            scores = signature.structured_outputs["probabilities"]
            triton.bind(
                model_name=name,
                infer_func=infer_function(signature),
                inputs=[Tensor(name="image", dtype=np.float32, shape=tuple(image.shape[1:]))],
                outputs=[
                    Tensor(name="probabilities", dtype=np.float32, shape=tuple(scores.shape[1:]))
                ],
                config=ModelConfig(
                    max_batch_size=MAX_BATCH_SIZE,
                    batcher=DynamicBatcher(max_queue_delay_microseconds=QUEUE_DELAY_US),
                ),
                strict=False,
            )
        print("READY", flush=True)
        triton.serve()
    return 0


if __name__ == "__main__":
    sys.exit(main())
