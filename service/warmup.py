"""TF Serving's warm-up files: requests replayed against a version before it takes traffic.

A SavedModel version folder may hold ``assets.extra/tf_serving_warmup_requests``: a TFRecord
file of ``PredictionLog`` protos (predict, classify, regress and multi_inference logs). As in
TF Serving, each record is run ``iterations`` times (--num_request_iterations_for_warmup)
right after the load, before the version is AVAILABLE, so its first real requests do not pay
for TensorFlow's first-call work at the shapes the file names. Rules, as TF Serving's:

* no file: nothing to replay;
* a record that is not a PredictionLog fails the load ("Failed to parse warmup record");
* more than 1000 records fails the load ("Number of warmup records exceeds the maximum");
* a file that is not TFRecord fails it with DATA_LOSS ("Please verify your warmup data is in
  TFRecord format");
* a session_run log (or any other kind) fails it with UNIMPLEMENTED;
* a request the model cannot answer fails it with that request's error.

Runs on the version's inference thread with the servable directly (not through the batching
queue, which does not exist yet), as part of its load.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from service import examples
from service.errors import InvalidArgument, ServingError
from service.servables.base import Servable
from service.signature import check_inputs

REQUESTS_FILE = Path("assets.extra") / "tf_serving_warmup_requests"
MAX_RECORDS = 1000
#: How much of a record that does not parse its error shows.
SHOWN_BYTES = 100


class DataLoss(ServingError):
    code, status = "DATA_LOSS", 500


class Unimplemented(ServingError):
    code, status = "UNIMPLEMENTED", 501


def replay_warmup_requests(servable: Servable, path: Path, iterations: int = 1) -> int:
    """Replay ``path``'s warm-up file against ``servable``; the number of records run."""
    file = path / REQUESTS_FILE
    if not file.is_file():
        return 0
    import tensorflow as tf
    from tensorflow_serving.apis import prediction_log_pb2

    count = 0
    try:
        for tensor in tf.data.TFRecordDataset(str(file)):
            record = tensor.numpy()
            log = prediction_log_pb2.PredictionLog()
            try:
                log.ParseFromString(record)
            except Exception:  # protobuf's DecodeError, or a message nested too deeply
                raise InvalidArgument(
                    f"Failed to parse warmup record: {record[:SHOWN_BYTES]!r} from {file}"
                ) from None
            for _ in range(iterations):
                run_logged_request(servable, log)
            count += 1
            if count > MAX_RECORDS:
                raise InvalidArgument(
                    f"Number of warmup records exceeds the maximum ({MAX_RECORDS}) at {file}"
                )
    except tf.errors.DataLossError as e:
        raise DataLoss(
            f"{e.message}. Please verify your warmup data is in TFRecord format."
        ) from None
    return count


def run_logged_request(servable: Servable, log: Any) -> None:
    """Run the request a PredictionLog holds, checked as a live request would be."""
    kind = log.WhichOneof("log_type")
    if kind == "predict_log":
        _predict(servable, log.predict_log.request)
    elif kind == "classify_log":
        _examples(servable, log.classify_log.request, examples.CLASSIFY)
    elif kind == "regress_log":
        _examples(servable, log.regress_log.request, examples.REGRESS)
    elif kind == "multi_inference_log":
        request = log.multi_inference_log.request
        verbs = {method: verb for verb, method in examples.METHOD_NAMES.items()}
        for task in request.tasks:
            verb = verbs.get(task.method_name)
            if verb is None:
                raise InvalidArgument(f"Unsupported signature method_name: {task.method_name}")
            _run_examples(servable, task.model_spec.signature_name, request.input, verb)
    else:
        number = log.DESCRIPTOR.fields_by_name[kind].number if kind else 0
        raise Unimplemented(f"Unsupported log_type for warmup: {number}")


def _predict(servable: Servable, request: Any) -> None:
    from service.tensor_proto import to_array

    signature = servable.signature(request.model_spec.signature_name or None)
    inputs = {name: to_array(proto, name) for name, proto in request.inputs.items()}
    check_inputs(signature, inputs)
    servable.run(signature.name, inputs)


def _examples(servable: Servable, request: Any, verb: str) -> None:
    _run_examples(servable, request.model_spec.signature_name, request.input, verb)


def _run_examples(servable: Servable, signature_name: str, input_: Any, verb: str) -> None:
    import numpy as np

    signature = examples.signature_for(servable.signatures, signature_name or None, verb)
    serialized = examples.serialized_examples(input_)
    rows = np.empty(len(serialized), dtype=object)
    rows[:] = serialized
    outputs = servable.run(signature.name, {examples.INPUTS: rows})
    if verb == examples.CLASSIFY:
        examples.classifications(outputs, len(serialized))
    else:
        examples.regressions(outputs, len(serialized))
