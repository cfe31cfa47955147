"""TF1 frozen graphs served like SavedModels: one Graph and one long-lived Session per version.

The layout is what TensorFlow's classic image-retraining tutorial (``retrain.py``) writes,
put in a version folder::

    flowers/1/output_graph.pb         (or frozen_graph.pb) a GraphDef with constants for weights
    flowers/1/output_labels.txt       (or labels.txt) line N = class N; may also sit in flowers/
    flowers/1/frozen_graph.json       optional (or flowers/frozen_graph.json): the tensor names

``frozen_graph.json`` names the tensors a request feeds and fetches, under the names clients
use (the signature's input and output keys)::

    {"inputs": {"image": "DecodeJpeg/contents:0"}, "outputs": {"scores": "final_result:0"}}

A name without ``:N`` means output 0 of that op. Without the file, or for a part it leaves
out, the defaults fit the retraining layout: input ``image`` is ``DecodeJpeg/contents:0`` if
the graph has it (a scalar string of JPEG bytes), else the graph's only ``Placeholder`` op
(e.g. ``input:0``, float ``[None, H, W, 3]``); output ``scores`` is ``final_result:0``.

The version is a ``Servable`` (``service.servables.base``): one ``serving_default`` signature
whose dtypes and shapes are the tensors' static ones, its SignatureDef as TF Serving's
metadata JSON, labels, ``run`` and ``warm_up``, so ``:predict``, ``/metadata`` and
``:classify_image`` serve it unchanged. A scalar string input is not batchable, so the
batching queue runs each such request alone, which is what that graph needs.

Every method blocks and runs on the version's inference thread(s); ``Session.run`` is
thread-safe, so several inference threads share the one Session.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import attrs
import numpy as np
import tensorflow as tf
from google.protobuf.message import DecodeError

from service.errors import FailedPrecondition, InvalidArgument
from service.model_files import read_model_json
from service.servables.base import LABEL_FILES, ServableBase, output_array, read_labels
from service.servables.protos import signature_def_json, signature_from_def
from wire.dtypes import DEFAULT_SIGNATURE

GRAPH_FILES = ("output_graph.pb", "frozen_graph.pb")
TENSORS_FILE = "frozen_graph.json"
FROZEN_LABEL_FILES = ("output_labels.txt", *LABEL_FILES)
DEFAULT_JPEG_INPUT = "DecodeJpeg/contents:0"
DEFAULT_OUTPUT = "final_result:0"


@attrs.frozen
class _Call:
    """The graph tensors one signature feeds and fetches, keyed by the signature's names."""

    feeds: Mapping[str, Any]
    fetches: Mapping[str, Any]


@attrs.frozen
class _Session:
    """What runs calls: the Session (it holds the Graph) and each signature's tensors."""

    session: Any
    calls: Mapping[str, _Call]


@attrs.define(eq=False)
class FrozenGraphServable(ServableBase):
    """A frozen GraphDef in a Session of its own."""

    platform: ClassVar[str] = "tensorflow_graphdef"
    _open: _Session | None  # None once closed

    @classmethod
    def load(cls, name: str, version: int, path: Path) -> FrozenGraphServable:
        """Import the graph and open its Session. Blocking: call on the inference thread."""
        graph_file = next((path / f for f in GRAPH_FILES if (path / f).is_file()), None)
        if graph_file is None:
            raise FailedPrecondition(f"{path} holds no {' or '.join(GRAPH_FILES)}")
        graph_def = tf.compat.v1.GraphDef()
        try:
            graph_def.ParseFromString(graph_file.read_bytes())
        except DecodeError as e:
            raise FailedPrecondition(f"{graph_file} is not a GraphDef: {e}") from None
        graph = tf.Graph()
        with graph.as_default():
            try:
                tf.compat.v1.import_graph_def(graph_def, name="")
            except ValueError as e:
                raise FailedPrecondition(f"{graph_file} cannot be imported: {e}") from None
            names = _tensor_names(graph, path, graph_file)
            feeds = {
                key: _tensor(graph, tensor, graph_file) for key, tensor in names["inputs"].items()
            }
            fetches = {
                key: _tensor(graph, tensor, graph_file) for key, tensor in names["outputs"].items()
            }
            build = tf.compat.v1.saved_model.utils.build_tensor_info
            proto = tf.compat.v1.saved_model.signature_def_utils.build_signature_def(
                inputs={key: build(t) for key, t in feeds.items()},
                outputs={key: build(t) for key, t in fetches.items()},
                method_name="tensorflow/serving/predict",
            )
        graph.finalize()  # shared by inference threads: nothing may add ops from now on
        session = tf.compat.v1.Session(graph=graph, config=_session_config())
        return cls(
            name=name,
            version=version,
            path=path,
            signatures={DEFAULT_SIGNATURE: signature_from_def(DEFAULT_SIGNATURE, proto)},
            signature_defs={DEFAULT_SIGNATURE: signature_def_json(proto)},
            labels=read_labels(path, FROZEN_LABEL_FILES)
            or read_labels(path.parent, FROZEN_LABEL_FILES),
            open=_Session(session, {DEFAULT_SIGNATURE: _Call(feeds, fetches)}),
        )

    def run(self, signature_name: str, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One ``Session.run`` of a (batched) request. Blocking: inference thread only."""
        opened = self._open  # one read: a concurrent close() either came before or after it
        if opened is None:
            raise self.unloaded()
        call = opened.calls[signature_name]
        feed = {call.feeds[name]: value for name, value in inputs.items()}
        try:
            values = opened.session.run(dict(call.fetches), feed_dict=feed)
        except tf.errors.InvalidArgumentError as e:
            raise InvalidArgument(e.message) from None
        return {name: output_array(value) for name, value in values.items()}

    def close(self) -> None:
        """Close the Session (its C++ state and buffers go at once) and drop it and the Graph.

        Idempotent; ``run`` raises FailedPrecondition afterwards. The Graph is a web of
        cycles (ops and tensors point back at it), freed by ``gc.collect``.
        """
        opened, self._open = self._open, None
        if opened is not None:
            opened.session.close()

    @property
    def closed(self) -> bool:
        return self._open is None


def _session_config() -> Any:
    """The process's TensorFlow threading flags, which a v1 Session does not pick up itself."""
    return tf.compat.v1.ConfigProto(
        intra_op_parallelism_threads=tf.config.threading.get_intra_op_parallelism_threads(),
        inter_op_parallelism_threads=tf.config.threading.get_inter_op_parallelism_threads(),
    )


def _tensor_names(graph: Any, path: Path, graph_file: Path) -> dict[str, dict[str, str]]:
    """{"inputs": {key: tensor name}, "outputs": {…}} from frozen_graph.json or the defaults."""
    declared: dict[str, Any] = {}
    found = read_model_json(path, TENSORS_FILE)
    if found is not None:
        file, declared = found
        _check_tensors_file(declared, file)
    names = {
        "inputs": declared.get("inputs") or _default_inputs(graph, graph_file),
        "outputs": declared.get("outputs") or {"scores": DEFAULT_OUTPUT},
    }
    return names


def _check_tensors_file(doc: Any, file: Path) -> None:
    if not isinstance(doc, dict) or set(doc) - {"inputs", "outputs"}:
        raise FailedPrecondition(f'{file}: must be an object with "inputs" and/or "outputs"')
    for part in ("inputs", "outputs"):
        value = doc.get(part, {})
        if not isinstance(value, dict) or not all(
            isinstance(k, str) and k and isinstance(v, str) and v for k, v in value.items()
        ):
            raise FailedPrecondition(
                f'{file}: "{part}" must map names to tensor names, e.g. {{"image": "input:0"}}'
            )


def _default_inputs(graph: Any, graph_file: Path) -> dict[str, str]:
    names = {op.name for op in graph.get_operations()}
    if DEFAULT_JPEG_INPUT.split(":")[0] in names:
        return {"image": DEFAULT_JPEG_INPUT}
    placeholders = [op.name for op in graph.get_operations() if op.type == "Placeholder"]
    if len(placeholders) != 1:
        raise FailedPrecondition(
            f"{graph_file} has no {DEFAULT_JPEG_INPUT} and {len(placeholders)} placeholders "
            f"({', '.join(placeholders) or 'none'}): name the input in {TENSORS_FILE}"
        )
    return {"image": f"{placeholders[0]}:0"}


def _tensor(graph: Any, name: str, graph_file: Path) -> Any:
    try:
        return graph.get_tensor_by_name(name if ":" in name else f"{name}:0")
    except (KeyError, ValueError) as e:
        raise FailedPrecondition(
            f"{graph_file} has no tensor {name!r} ({e}); name the tensors in {TENSORS_FILE}"
        ) from None
