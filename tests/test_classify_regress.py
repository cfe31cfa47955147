"""TF Serving's ``:classify`` and ``:regress``: tf.Example building, signatures, results, routes.

Unit tests build examples with ``service.examples`` and read them back with TensorFlow's own
``Example`` proto; the routes run through StubTreq against a repository of hand-built versions
whose "models" parse the serialized examples in numpy. The integration tests (marked) serve
``make_example_classifier`` from a real ``twistd -n inference`` and compare its answers with
what the same SavedModel computes in this process.
"""

from __future__ import annotations

import base64
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from tensorflow.core.example import example_pb2
from treq.testing import StubTreq
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.task import Clock

from harness.twistd import TwistdServer
from service import examples
from service.batching import BatchingParameters, BatchingQueue
from service.errors import InvalidArgument
from service.http import InferenceAPI
from service.metrics import Metrics
from service.repository import AVAILABLE, LoadedVersion, ModelConfig, ModelRepository
from service.servables.registry import load_servable
from service.signature import Signature, TensorInfo
from tests import models
from tests.deferreds import result_of
from tests.test_http import call
from tests.test_lifecycle_integration import model_entry, write_config

CLASSIFY, REGRESS = examples.METHOD_NAMES["classify"], examples.METHOD_NAMES["regress"]
PREDICT = "tensorflow/serving/predict"


def parse(serialized: bytes) -> dict[str, tuple[str | None, list[Any]]]:
    """A serialized tf.Example as {feature: (kind, values)}, read by TensorFlow's proto."""
    example = example_pb2.Example.FromString(serialized)
    out: dict[str, tuple[str | None, list[Any]]] = {}
    for name, feature in example.features.feature.items():
        kind = feature.WhichOneof("kind")
        out[name] = (kind, list(getattr(feature, kind).value) if kind else [])
    return out


def decode(doc: Any, verb: str = "classify") -> list[dict[str, tuple[str | None, list[Any]]]]:
    """The examples of a JSON body, each as ``parse`` reads it."""
    request = examples.decode_examples(json.dumps(doc).encode(), verb)
    assert request.serialized.dtype == object and request.serialized.ndim == 1
    return [parse(s) for s in request.serialized]


def refusal(doc: Any, verb: str = "classify") -> str:
    """The message of the InvalidArgument a body is refused with."""
    body = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
    with pytest.raises(InvalidArgument) as caught:
        examples.decode_examples(body, verb)
    return caught.value.message


# --- building examples ----------------------------------------------------------------------


def test_every_value_kind_becomes_its_feature_list() -> None:
    """Ints and booleans → int64_list, fractions → float_list, strings and b64 → bytes_list."""
    (example,) = decode(
        {
            "examples": [
                {
                    "n": 3,
                    "ns": [1, -2, 2**63 - 1],
                    "flags": [True, False],
                    "f": 0.5,
                    "fs": [1.0, -2.5, 1e30],
                    "s": "caf\u00e9",
                    "ss": ["a", ""],
                    "b": {"b64": base64.b64encode(b"\x00\xff").decode()},
                    "mixed_bytes": ["x", {"b64": "eQ=="}],
                    "none": [],
                }
            ]
        }
    )
    assert example == {
        "n": ("int64_list", [3]),
        "ns": ("int64_list", [1, -2, 2**63 - 1]),
        "flags": ("int64_list", [1, 0]),
        "f": ("float_list", [0.5]),
        "fs": ("float_list", [1.0, -2.5, float(np.float32(1e30))]),
        "s": ("bytes_list", ["caf\u00e9".encode()]),
        "ss": ("bytes_list", [b"a", b""]),
        "b": ("bytes_list", [b"\x00\xff"]),
        "mixed_bytes": ("bytes_list", [b"x", b"y"]),
        "none": (None, []),
    }


def test_non_finite_floats_and_unpadded_base64_are_accepted() -> None:
    """NaN and ±Infinity are float features; base64 may leave its padding off, as in TF Serving."""
    body = b'{"examples": [{"f": [NaN, Infinity, -Infinity], "b": {"b64": "eQ"}}]}'
    (serialized,) = examples.decode_examples(body, "regress").serialized
    example = parse(serialized)
    kind, values = example["f"]
    assert kind == "float_list" and math.isnan(values[0]) and values[1:] == [math.inf, -math.inf]
    assert example["b"] == ("bytes_list", [b"y"])


def test_integers_beyond_uint64_are_floats_as_in_tf_serving() -> None:
    """TF Serving's parser reads an integer beyond uint64 as a double: a float feature."""
    (example,) = decode({"examples": [{"big": 2**70, "neg": [-(2**64)]}]})
    assert example == {
        "big": ("float_list", [float(2**70)]),
        "neg": ("float_list", [-float(2**64)]),
    }


def test_context_is_merged_into_every_example_and_an_example_overrides_it() -> None:
    """Context features appear in each example; an example's own feature of that name wins."""
    decoded = decode(
        {
            "context": {"kind": "small", "shared": [1, 2]},
            "examples": [{"x": [1.0, 2.0]}, {"x": [3.0, 4.0], "kind": "big"}],
        }
    )
    assert decoded == [
        {
            "x": ("float_list", [1.0, 2.0]),
            "kind": ("bytes_list", [b"small"]),
            "shared": ("int64_list", [1, 2]),
        },
        {
            "x": ("float_list", [3.0, 4.0]),
            "kind": ("bytes_list", [b"big"]),
            "shared": ("int64_list", [1, 2]),
        },
    ]


def test_signature_name_is_read_and_empty_examples_serialize_empty() -> None:
    """signature_name is passed on; an example without features is an empty tf.Example."""
    request = examples.decode_examples(
        b'{"signature_name": "regress", "context": {}, "examples": [{}, {}]}', "regress"
    )
    assert request.signature_name == "regress"
    assert list(request.serialized) == [b"", b""]


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ({"examples": [{"x": None}]}, 'examples[0]["x"]: Feature: x has element with unexpected JSON type: Null'),
        ({"examples": [{"x": [1, [2]]}]}, 'examples[0]["x"][1]: Feature: x has element with unexpected JSON type: Array'),
        ({"examples": [{"x": {"a": "b"}}]}, 'examples[0]["x"]: Feature: x has element with unexpected JSON type: Object'),
        ({"examples": [{}, {"x": [1, "a"]}]}, 'examples[1]["x"][1]: Unexpected element type in feature: x expecting type: int64'),
        ({"examples": [{"x": ["a", 1.5]}]}, 'examples[0]["x"][1]: Unexpected element type in feature: x expecting type: bytes'),
        ({"examples": [{"x": [1, 2.5]}]}, 'examples[0]["x"][1]: Unexpected element type in feature: x expecting type: int64'),
        ({"examples": [{"x": [2.5, 1]}]}, 'examples[0]["x"][1]: Unexpected element type in feature: x expecting type: float'),
        ({"examples": [{"x": [1, 2.5, None]}]}, 'examples[0]["x"][1]: Unexpected element type'),
        ({"examples": [{"x": [True, 0.5]}]}, 'examples[0]["x"][1]: Unexpected element type in feature: x expecting type: int64'),
        ({"examples": [{"x": [2.5, {"b64": "eQ=="}]}]}, 'examples[0]["x"][1]: Unexpected element type in feature: x expecting type: float'),
        ({"examples": [{"img": {"b64": "not base64!"}}]}, 'examples[0]["img"]: Unable to base64 decode'),
        ({"examples": [{"x": [0.5, 1e39]}]}, 'examples[0]["x"][1]: Cannot convert JSON value: 1e+39 to float without loss of precision.'),
        ({"examples": [{"x": 2**63}]}, 'examples[0]["x"]: Feature: x has uint64 element. Only int64 is supported.'),
        ({"examples": [{"x": 10**400}]}, 'examples[0]["x"]: Cannot convert JSON value'),
        ({"examples": [{"t": "\ud800"}]}, 'examples[0]["t"]: Feature: t has a string that is not valid Unicode text'),
        ({"context": {"k": None}, "examples": [{}]}, 'context["k"]: Feature: k has element with unexpected JSON type: Null'),
        ({"context": [1], "examples": [{}]}, "context: Example must be JSON object but got JSON Array"),
        ({"examples": [{}, 7]}, "examples[1]: Example must be JSON object but got JSON Number"),
        ({"examples": [{"a b": None}]}, 'examples[0]["a b"]: Feature: a b has element'),
        ({}, "When method is classify, key 'examples' is expected and was not found"),
        ({"examples": {"x": 1}}, "Expecting 'examples' value to be a list/array, got JSON Object"),
        ({"examples": []}, "'examples' value is an empty array"),
        ({"signature_name": 3, "examples": [{}]}, "'signature_name' must be a string"),
        ([{"x": 1}], "the request body must be a JSON object"),
    ],
)  # fmt: skip
def test_bad_bodies_are_refused_naming_the_example_and_feature(doc: Any, message: str) -> None:
    """Every bad body raises InvalidArgument naming the place and saying TF Serving's words."""
    assert message in refusal(doc)


def test_missing_examples_names_the_verb() -> None:
    """A body without 'examples' names the method it was sent to, classify or regress."""
    assert refusal({"context": {}}, "regress").startswith("When method is regress, key 'examples'")
    assert refusal(b"{not json").startswith("malformed JSON")


# A feature and what TensorFlow reads back: (JSON value, kind, values).
INT64S = st.lists(st.integers(-(2**63), 2**63 - 1), max_size=4).map(
    lambda v: (v, "int64_list" if v else None, v)
)
FLOATS = st.lists(st.floats(width=32, allow_nan=False), max_size=4).map(
    lambda v: (v, "float_list" if v else None, v)
)
TEXTS = st.lists(st.text(max_size=6), max_size=4).map(
    lambda v: (v, "bytes_list" if v else None, [s.encode() for s in v])
)
BLOBS = st.lists(st.binary(max_size=6), max_size=4).map(
    lambda v: (
        [{"b64": base64.b64encode(b).decode()} for b in v],
        "bytes_list" if v else None,
        v,
    )
)


@st.composite
def features(draw: st.DrawFn) -> dict[str, tuple[Any, str | None, list[Any]]]:
    """Random valid features; a one-value list is sometimes sent as the bare value."""
    drawn = draw(
        st.dictionaries(st.text(max_size=5), st.one_of(INT64S, FLOATS, TEXTS, BLOBS), max_size=4)
    )
    return {
        name: (value[0] if len(value) == 1 and draw(st.booleans()) else value, kind, expected)
        for name, (value, kind, expected) in drawn.items()
    }


@given(st.lists(features(), min_size=1, max_size=3), st.one_of(st.none(), features()))
def test_valid_features_round_trip_through_tf_example(
    drawn: list[dict[str, tuple[Any, str | None, list[Any]]]],
    context: dict[str, tuple[Any, str | None, list[Any]]] | None,
) -> None:
    """Any valid features, sent as JSON, read back from tf.train.Example as sent (context merged)."""
    doc: dict[str, Any] = {"examples": [{k: v[0] for k, v in f.items()} for f in drawn]}
    if context is not None:
        doc["context"] = {k: v[0] for k, v in context.items()}
    for example, sent in zip(decode(doc), drawn, strict=True):
        merged = {**(context or {}), **sent}
        assert example.keys() == merged.keys()
        for name, (_, kind, expected) in merged.items():
            got_kind, got = example[name]
            assert got_kind == kind
            if kind == "float_list":
                np.testing.assert_array_equal(np.float32(got), np.float32(expected))
            else:
                assert got == expected


# --- signatures and results -----------------------------------------------------------------


def tensors(**specs: tuple[str, tuple[int | None, ...]]) -> dict[str, TensorInfo]:
    return {name: TensorInfo(name, dtype, shape) for name, (dtype, shape) in specs.items()}


EXAMPLES_IN = tensors(inputs=("DT_STRING", (None,)))
CLASSES_OUT = tensors(classes=("DT_STRING", (None, 2)), scores=("DT_FLOAT", (None, 2)))
SIGNATURES = {
    "serving_default": Signature("serving_default", EXAMPLES_IN, CLASSES_OUT, CLASSIFY),
    "scores_only": Signature(
        "scores_only", EXAMPLES_IN, tensors(scores=("DT_FLOAT", (None, 2))), CLASSIFY
    ),
    "classes_only": Signature(
        "classes_only", EXAMPLES_IN, tensors(classes=("DT_STRING", (None, 2))), CLASSIFY
    ),
    "regress": Signature("regress", EXAMPLES_IN, tensors(outputs=("DT_FLOAT", (None,))), REGRESS),
    "predict": Signature("predict", EXAMPLES_IN, tensors(z=("DT_FLOAT", (None,))), PREDICT),
}


@pytest.mark.parametrize(
    ("signature", "verb", "message"),
    [
        (SIGNATURES["predict"], "classify", "Expected classification signature method_name to be tensorflow/serving/classify. Was: tensorflow/serving/predict"),
        (SIGNATURES["serving_default"], "regress", "Expected regression signature method_name to be tensorflow/serving/regress. Was: tensorflow/serving/classify"),
        (Signature("s", tensors(a=("DT_STRING", (None,)), b=("DT_STRING", (None,))), CLASSES_OUT, CLASSIFY), "classify", "Expected one input Tensor."),
        (Signature("s", tensors(examples=("DT_STRING", (None,))), CLASSES_OUT, CLASSIFY), "classify", "No classification inputs found in SignatureDef: 's'"),
        (Signature("s", EXAMPLES_IN, tensors(a=("DT_FLOAT", (None,)), b=("DT_FLOAT", (None,)), c=("DT_FLOAT", (None,))), CLASSIFY), "classify", "Expected one or two output Tensors, found 3"),
        (Signature("s", EXAMPLES_IN, tensors(probabilities=("DT_FLOAT", (None, 2))), CLASSIFY), "classify", 'Expected classification signature outputs to contain at least one of "classes" or "scores"'),
        (Signature("s", EXAMPLES_IN, CLASSES_OUT, REGRESS), "regress", "Expected one output Tensor."),
        (Signature("s", EXAMPLES_IN, tensors(y=("DT_FLOAT", (None,))), REGRESS), "regress", "No regression outputs found in SignatureDef"),
        (Signature("s", tensors(inputs=("DT_FLOAT", (None, 2))), CLASSES_OUT, CLASSIFY), "classify", "input 'inputs' of signature 's' is DT_FLOAT, but it must be DT_STRING"),
    ],
)  # fmt: skip
def test_signature_checks_follow_tf_serving(signature: Signature, verb: str, message: str) -> None:
    """A signature that is not a classify/regress one of the right form is a 400 saying why."""
    with pytest.raises(InvalidArgument) as caught:
        examples.signature_for({signature.name: signature}, signature.name, verb)
    assert message in caught.value.message


def test_signature_lookup_defaults_to_serving_default() -> None:
    """No (or an empty) signature_name means serving_default; an unknown one is TF's 400."""
    assert examples.signature_for(SIGNATURES, None, "classify").name == "serving_default"
    assert examples.signature_for(SIGNATURES, "", "classify").name == "serving_default"
    assert examples.signature_for(SIGNATURES, "regress", "regress").name == "regress"
    with pytest.raises(InvalidArgument, match="No signature was found with the name: nope"):
        examples.signature_for(SIGNATURES, "nope", "classify")


def results(outputs: dict[str, np.ndarray], verb: str, rows: int) -> Any:
    return json.loads(examples.encode_results(outputs, verb, rows))["results"]


def test_classify_results_pair_labels_with_scores() -> None:
    """One [label, score] list per example; scores keep float32's shortest text."""
    classes = np.array([[b"neg", b"pos"], [b"a", b"\xff"]], dtype=object)
    scores = np.array([[0.1, 0.9], [1.0, math.nan]], np.float32)
    body = examples.encode_results({"classes": classes, "scores": scores}, "classify", 2)
    assert body == (b'{"results":[[["neg",0.1],["pos",0.9]],[["a",1.0],["\xef\xbf\xbd",NaN]]]}')


def test_classify_with_only_scores_or_only_classes() -> None:
    """Without classes the labels are "", without scores the scores are 0.0 (TF Serving's defaults)."""
    scores = np.array([[0.25, 0.75]], np.float32)
    assert results({"scores": scores}, "classify", 1) == [[["", 0.25], ["", 0.75]]]
    classes = np.array([[b"x", b"y"]], dtype=object)
    assert results({"classes": classes}, "classify", 1) == [[["x", 0.0], ["y", 0.0]]]


def test_regress_results_one_value_per_example() -> None:
    """Regression outputs of shape [k] or [k, 1] answer one number per example."""
    assert results({"outputs": np.array([1.5, -2.0], np.float32)}, "regress", 2) == [1.5, -2.0]
    assert results({"outputs": np.array([[0.1]], np.float32)}, "regress", 1) == [0.1]
    body = examples.encode_results({"outputs": np.array([math.inf], np.float32)}, "regress", 1)
    assert body == b'{"results":[Infinity]}'


@pytest.mark.parametrize(
    ("outputs", "verb", "message"),
    [
        ({"scores": np.zeros(2, np.float32)}, "classify", "Expected Tensor shape: [batch_size num_classes] but got [2]"),
        ({"scores": np.zeros((2, 2), np.float64)}, "classify", "Expected scores Tensor of DT_FLOAT. Got: DT_DOUBLE"),
        ({"classes": np.zeros((2, 2), np.int32)}, "classify", "Expected classes Tensor of DT_STRING. Got: DT_INT32"),
        ({"scores": np.zeros((3, 2), np.float32)}, "classify", "Expected scores output batch size of 2. Got: 3"),
        ({"classes": np.full((2, 3), b"a", object), "scores": np.zeros((2, 2), np.float32)}, "classify", "Tensors class and score should match in dim_size(1). Got 3 vs. 2"),
        ({"outputs": np.zeros((2, 2), np.float32)}, "regress", "Expected output Tensor shape to be either [batch_size] or [batch_size, 1] but got [2, 2]"),
        ({"outputs": np.zeros(3, np.float32)}, "regress", "Input batch size did not match output batch size: 2 vs. 3"),
        ({"outputs": np.zeros(2, np.int64)}, "regress", "Expected output Tensor of DT_FLOAT. Got: DT_INT64"),
    ],
)  # fmt: skip
def test_bad_model_outputs_are_tf_serving_errors(
    outputs: dict[str, np.ndarray], verb: str, message: str
) -> None:
    """Outputs of the wrong rank, dtype or batch size are refused with TF Serving's messages."""
    with pytest.raises(InvalidArgument) as caught:
        examples.encode_results(outputs, verb, 2)
    assert caught.value.message == message


# --- routes (StubTreq, hand-built versions) -------------------------------------------------


def z_of(serialized: np.ndarray, version: int) -> np.ndarray:
    """The fake models' number per example: x[0] + 2 x[1] + version (x defaults to [0, 0])."""
    out = []
    for s in serialized:
        feature = example_pb2.Example.FromString(s).features.feature
        x = list(feature["x"].float_list.value) if "x" in feature else [0.0, 0.0]
        out.append(x[0] + 2 * x[1] + version)
    return np.array(out, np.float32)


def fake_model(signature: str, version: int, calls: list[int]):
    """What the signature computes, in numpy; each call's batch size is recorded in ``calls``."""

    def run(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        serialized = inputs["inputs"]
        calls.append(len(serialized))
        z = z_of(serialized, version)
        classes = np.array([[b"neg", b"pos"]] * len(z), dtype=object).reshape(len(z), 2)
        scores = np.stack([-z, z], axis=1)
        return {
            "serving_default": {"classes": classes, "scores": scores},
            "scores_only": {"scores": scores},
            "classes_only": {"classes": classes},
            "regress": {"outputs": z},
            "predict": {"z": z},
        }[signature]

    return run


class FakeExampleServable:
    """The part of Servable the routes read, with the signatures of ``SIGNATURES``."""

    signatures = SIGNATURES
    signature_defs = {key: {"method_name": s.method_name} for key, s in SIGNATURES.items()}
    labels = None

    def signature(self, name: str | None) -> Signature:
        return SIGNATURES[name or "serving_default"]


def make_api(executor=maybeDeferred, labels=None) -> tuple[StubTreq, ModelRepository, list[int]]:
    """Model "m" with versions 1 and 2 AVAILABLE; every signature's batch sizes go to ``calls``."""
    repository = ModelRepository(
        [ModelConfig("m", Path("/nonexistent"), labels=labels or {})], reactor=Clock()
    )
    metrics = Metrics()
    calls: list[int] = []
    for number in (1, 2):
        version = LoadedVersion("m", number, state=AVAILABLE, servable=FakeExampleServable())  # type: ignore[arg-type]
        for key in SIGNATURES:
            version.queues[key] = BatchingQueue(
                fake_model(key, number, calls),
                BatchingParameters(max_batch_size=8),
                clock=Clock(),
                executor=executor,
                observer=metrics.batch_observer("m", number, key),
            )
        repository.add_version(version)
    api = InferenceAPI(repository, metrics=metrics)
    return StubTreq(api.resource()), repository, calls


def post(treq: StubTreq, path: str, doc: Any) -> tuple[int, Any]:
    body = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
    response, answer = call(treq, "POST", path, body)
    return response.code, answer


BODY = {"context": {"x": [1.0, 1.0]}, "examples": [{}, {"x": [0.5, 2.0]}]}
# z per example, plus the version: [3, 4.5] + version


def test_classify_route_answers_label_score_pairs() -> None:
    """POST :classify answers {"results": [[[label, score], …], …]} from the latest version."""
    treq, _, calls = make_api()
    code, doc = post(treq, "/v1/models/m:classify", BODY)
    assert code == 200
    assert doc == {"results": [[["neg", -5.0], ["pos", 5.0]], [["neg", -6.5], ["pos", 6.5]]]}
    assert calls == [2]  # the examples ran as one request of two rows


def test_regress_route_answers_one_value_per_example() -> None:
    """POST :regress with signature_name answers {"results": [value, …]}."""
    treq, _, _ = make_api()
    code, doc = post(treq, "/v1/models/m:regress", {"signature_name": "regress", **BODY})
    assert (code, doc) == (200, {"results": [5.0, 6.5]})


def test_versions_and_labels_in_the_url() -> None:
    """/versions/N and /labels/L reach that version for :classify and :regress alike."""
    treq, _, _ = make_api(labels={"stable": 1, "canary": 2})
    regress = {"signature_name": "regress", **BODY}
    assert post(treq, "/v1/models/m/versions/1:regress", regress) == (200, {"results": [4.0, 5.5]})
    assert post(treq, "/v1/models/m/labels/stable:regress", regress) == (
        200,
        {"results": [4.0, 5.5]},
    )
    code, doc = post(treq, "/v1/models/m/labels/canary:classify", BODY)
    assert code == 200 and doc["results"][0] == [["neg", -5.0], ["pos", 5.0]]
    code, doc = post(treq, "/v1/models/m/labels/beta:classify", BODY)
    assert code == 400 and doc["error"].startswith("Unrecognized servable version label: beta")
    code, doc = post(treq, "/v1/models/m/versions/7:regress", regress)
    assert code == 404 and "7" in doc["error"]


def test_scores_only_and_classes_only_signatures() -> None:
    """A classify signature with only scores answers "" labels; with only classes, 0.0 scores."""
    treq, _, _ = make_api()
    body = {"signature_name": "scores_only", "examples": [{"x": [1.0, 0.0]}]}
    assert post(treq, "/v1/models/m:classify", body) == (
        200,
        {"results": [[["", -3.0], ["", 3.0]]]},
    )
    body["signature_name"] = "classes_only"
    assert post(treq, "/v1/models/m:classify", body) == (
        200,
        {"results": [[["neg", 0.0], ["pos", 0.0]]]},
    )


def test_wrong_method_signature_is_400_naming_the_method() -> None:
    """:regress on a classify signature, or :classify on a predict one, is TF Serving's 400."""
    treq, _, calls = make_api()
    code, doc = post(treq, "/v1/models/m:regress", BODY)
    assert code == 400 and doc["error"] == (
        "Expected regression signature method_name to be tensorflow/serving/regress. "
        "Was: tensorflow/serving/classify"
    )
    code, doc = post(treq, "/v1/models/m:classify", {"signature_name": "predict", **BODY})
    assert code == 400 and doc["error"] == (
        "Expected classification signature method_name to be tensorflow/serving/classify. "
        "Was: tensorflow/serving/predict"
    )
    code, doc = post(treq, "/v1/models/m:classify", {"signature_name": "nope", **BODY})
    assert (code, doc) == (400, {"error": "No signature was found with the name: nope"})
    assert calls == []  # nothing reached a model


def test_bad_bodies_are_400_and_the_route_keeps_serving() -> None:
    """Bad bodies answer 400 naming example and feature (never 500); the next request works."""
    treq, repository, calls = make_api()
    for doc, message in [
        (b"[1, 2]", "the request body must be a JSON object"),
        ({"examples": []}, "'examples' value is an empty array"),
        ({"examples": [{"x": [1.0, None]}]}, 'examples[0]["x"][1]: Feature: x has element'),
        ({"examples": [{}, {"x": ["a", 1]}]}, 'examples[1]["x"][1]: Unexpected element type'),
        ({"examples": [{"b": {"b64": "%%%"}}]}, 'examples[0]["b"]: Unable to base64 decode'),
        (b'{"examples": [{"x": [1.0, 2.0]}', "malformed JSON"),
    ]:
        code, answer = post(treq, "/v1/models/m:classify", doc)
        assert code == 400 and message in answer["error"], doc
    assert calls == [] and repository.lookup("m", version=2).holders.count == 0
    assert post(treq, "/v1/models/m:classify", BODY)[0] == 200


def test_concurrent_classify_calls_share_a_batch_and_hold_their_version() -> None:
    """Calls queued behind a running batch run as one batch of all their rows, each leasing its version."""
    held: list = []

    def hold(f, *args):
        d: Deferred = Deferred()
        held.append((d, f, args))
        return d

    treq, repository, calls = make_api(executor=hold)
    version = repository.lookup("m", version=2)

    def send(doc: Any) -> Deferred:
        return treq.request("POST", "http://server/v1/models/m:classify", data=json.dumps(doc))

    first = send({"examples": [{}]})
    second = send({"examples": [{}, {"x": [1.0, 0.0]}]})
    third = send({"examples": [{"x": [0.0, 1.0]}]})
    assert version.holders.count == 3 and len(held) == 1  # one runs, two wait
    for _ in range(2):
        d, f, args = held.pop(0)
        d.callback(f(*args))
        treq.flush()
    assert calls == [1, 3] and held == []
    answers = [json.loads(_content(r)) for r in (first, second, third)]
    assert [len(a["results"]) for a in answers] == [1, 2, 1]
    assert answers[2]["results"][0][1] == ["pos", 4.0]
    assert version.holders.count == 0


def _content(d: Deferred) -> bytes:
    response = result_of(d)
    assert response.code == 200
    return result_of(response.content())


def test_classify_and_regress_are_routes_counted_under_their_verb() -> None:
    """:classify and :regress are routes of their own, counted under their own labels; an
    unknown verb is a 400 naming the verbs there are."""
    api = InferenceAPI(ModelRepository([], reactor=Clock()), metrics=Metrics())
    assert api.route_label(b"POST", b"/v1/models/m/labels/a:classify") == "classify"
    assert api.route_label(b"POST", b"/v1/models/m/versions/1:regress") == "regress"
    assert api.route_label(b"POST", b"/v1/models/m:classify_image") == "classify_image"
    treq, _, _ = make_api()
    code, doc = post(treq, "/v1/models/m:explode", BODY)
    assert code == 400 and ":classify, :regress" in doc["error"]


# --- integration: a real twistd serving make_example_classifier -----------------------------

JSON_BODY = {
    "context": {"kind": "small"},
    "examples": [
        {"x": [1.5, -2.0], "kind": "big"},
        {"x": [0.25, 4.0], "count": 3},
        {"x": [-7.0, 0.125]},
    ],
}


def tf_examples() -> list[bytes]:
    """JSON_BODY's examples with the context merged, built directly with TensorFlow's protos."""
    import tensorflow as tf

    def example(x: list[float], kind: bytes, count: int | None = None) -> bytes:
        feature = {
            "x": tf.train.Feature(float_list=tf.train.FloatList(value=x)),
            "kind": tf.train.Feature(bytes_list=tf.train.BytesList(value=[kind])),
        }
        if count is not None:
            feature["count"] = tf.train.Feature(int64_list=tf.train.Int64List(value=[count]))
        return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()

    return [
        example([1.5, -2.0], b"big"),
        example([0.25, 4.0], b"small", 3),
        example([-7.0, 0.125], b"small"),
    ]


def test_example_classifier_carries_tf_serving_method_names(tmp_path: Path) -> None:
    """The rewritten saved_model.pb loads; load_servable reads its method names and string input."""
    servable = load_servable("ex", 1, models.make_example_classifier(tmp_path))
    try:
        assert {k: s.method_name for k, s in servable.signatures.items()} == models.EXAMPLE_METHODS
        assert servable.signature_defs["regress"]["method_name"] == REGRESS
        for signature in servable.signatures.values():
            assert signature.inputs == {
                "inputs": TensorInfo(
                    "inputs", "DT_STRING", (None,), signature.inputs["inputs"].tensor_name
                )
            }
            assert signature.batchable
        serialized = np.array(tf_examples(), dtype=object)
        outputs = servable.run("regress", {"inputs": serialized})
        np.testing.assert_array_equal(
            outputs["outputs"], np.float32([-2.5 + 10 + 1, 8.25 + 3 + 1, -6.75 + 1])
        )
    finally:
        servable.close()


@pytest.fixture(scope="module")
def model_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("examples")
    for version in (1, 2):
        models.make_example_classifier(root / "ex", version=version)
    return root


def in_process(root: Path, version: int, signature: str) -> dict[str, np.ndarray]:
    """What version ``version``'s signature computes for tf_examples(), in this process."""
    import tensorflow as tf

    fn = tf.saved_model.load(str(root / "ex" / str(version))).signatures[signature]
    return {k: v.numpy() for k, v in fn(inputs=tf.constant(tf_examples())).items()}


@pytest.fixture(scope="module")
def server(model_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TwistdServer]:
    config = model_root / "models.conf"
    write_config(
        config,
        model_entry("ex", model_root / "ex", versions=(1, 2), labels={"stable": 1, "canary": 2}),
    )
    started = TwistdServer(
        [f"--model_config_file={config}", "--enable_batching"], tmp_path_factory.mktemp("logs")
    ).start()
    try:
        yield started.wait_ready()
    finally:
        started.stop()


def assert_classified(answer: Any, expected: dict[str, np.ndarray]) -> None:
    """A :classify answer holds exactly the model's classes and (float32) scores."""
    labels = [[label for label, _ in row] for row in answer["results"]]
    scores = [[score for _, score in row] for row in answer["results"]]
    if "classes" in expected:
        assert labels == [[c.decode() for c in row] for row in expected["classes"]]
    else:
        assert labels == [[""] * expected["scores"].shape[1]] * len(expected["scores"])
    np.testing.assert_array_equal(np.float32(scores), expected["scores"])


@pytest.mark.integration
def test_served_classify_and_regress_equal_the_model_in_process(
    server: TwistdServer, model_root: Path
) -> None:
    """:classify and :regress answers (latest version, 2) equal what the SavedModel computes."""
    code, answer = server.post_json("/v1/models/ex:classify", JSON_BODY)
    assert code == 200, answer
    assert_classified(answer, in_process(model_root, 2, "serving_default"))
    code, answer = server.post_json(
        "/v1/models/ex:classify", {"signature_name": "scores_only", **JSON_BODY}
    )
    assert code == 200, answer
    assert_classified(answer, in_process(model_root, 2, "scores_only"))
    code, answer = server.post_json(
        "/v1/models/ex:regress", {"signature_name": "regress", **JSON_BODY}
    )
    assert code == 200, answer
    np.testing.assert_array_equal(
        np.float32(answer["results"]), in_process(model_root, 2, "regress")["outputs"]
    )


@pytest.mark.integration
def test_served_versions_and_labels(server: TwistdServer, model_root: Path) -> None:
    """/versions/1 and /labels/stable reach version 1, /labels/canary version 2."""
    regress = {"signature_name": "regress", **JSON_BODY}
    v1 = in_process(model_root, 1, "regress")["outputs"]
    for path in ("ex/versions/1", "ex/labels/stable"):
        code, answer = server.post_json(f"/v1/models/{path}:regress", regress)
        assert code == 200, answer
        np.testing.assert_array_equal(np.float32(answer["results"]), v1)
    code, answer = server.post_json("/v1/models/ex/labels/canary:classify", JSON_BODY)
    assert code == 200, answer
    assert_classified(answer, in_process(model_root, 2, "serving_default"))
    code, answer = server.post_json("/v1/models/ex/versions/1:classify", JSON_BODY)
    assert code == 200, answer
    assert_classified(answer, in_process(model_root, 1, "serving_default"))


@pytest.mark.integration
def test_served_bad_bodies_are_400_and_the_server_keeps_serving(server: TwistdServer) -> None:
    """Bad bodies, a predict signature and examples the model cannot parse are all 400s."""
    for doc, message in [
        ({"examples": [{"x": [1, 2.5]}]}, 'examples[0]["x"][1]: Unexpected element type'),
        ({"examples": [{"x": None}]}, 'examples[0]["x"]: Feature: x has element'),
        ({"examples": [{"kind": {"b64": "!"}}]}, 'examples[0]["kind"]: Unable to base64 decode'),
        ({"examples": "x"}, "Expecting 'examples' value to be a list/array"),
        (
            {"signature_name": "predict", "examples": [{"x": [1.0, 2.0]}]},
            "Was: tensorflow/serving/predict",
        ),
        # What the model's tf.io.parse_example refuses: an int64 list for the float feature x,
        # and no x at all.
        ({"examples": [{"x": [1, 2]}]}, "Key: x, Index: 0.  Data types don't match"),
        ({"examples": [{"kind": "big"}]}, "Feature: x (data type: float) is required"),
    ]:
        code, answer = server.post_json("/v1/models/ex:classify", doc)
        assert code == 400 and message in answer["error"], (doc, answer)
    code, answer = server.post_json("/v1/models/ex:classify", JSON_BODY)
    assert code == 200 and len(answer["results"]) == 3
