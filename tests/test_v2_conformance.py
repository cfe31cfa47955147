"""kleinserve answers the Open Inference Protocol as a real Triton server does, but for the
differences listed here, each with its reason (the README's v2 section lists them too).

``scripts/record-triton`` sent ``tests/v2_conformance.CALLS`` to Triton 2.51 (NVIDIA's
``nvidia-pytriton`` 0.7.0, serving the same SavedModels through PyTriton) and wrote its answers
to ``tests/data/triton/answers.json``; this test sends the same calls to a real ``twistd``
server and compares, so CI needs no Triton. What is compared: the status code, the content type
of a success, whether tensor bytes follow the JSON, the JSON's keys, every output's (and
metadata tensor's) datatype, shape and values (floats as the datatype reads them, so
``0.1`` and ``0.10000000149011612`` are the same FP32), and for an error only that both
answer ``{"error": "<some text>"}``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

from harness.twistd import TwistdServer
from tests import models
from tests.v2_conformance import CALLS, MODELS, NUMPY, RECORDING, send


@dataclass(frozen=True)
class Known:
    """A known difference: the aspects that differ (see ``differences``), kleinserve's
    status code when that is one of them, and why."""

    reason: str
    aspects: frozenset[str] = frozenset()
    status: int | None = None


def known(reason: str, *aspects: str, status: int | None = None) -> Known:
    return Known(reason, frozenset(aspects) | ({"status"} if status else set()), status)


_PLATFORM = known(
    "PyTriton serves a Python callable (platform 'python'); kleinserve serves the SavedModel "
    "itself ('tensorflow_savedmodel', as Triton's TensorFlow backend says)",
    "field platform",
)
_HEALTH = known(
    "Triton answers health with an empty text/plain body and only the status code; kleinserve "
    'adds {"live": true} / {"ready": true} (the protocol\'s JSON form, which KServe\'s client '
    "reads) as application/json",
    "content_type",
    "json_keys",
)
_ORDER = known(
    "Triton answers requested outputs in the order the model made them; kleinserve in the "
    "order they were requested (the protocol leaves the order open; clients look outputs "
    "up by name)",
    "outputs_order",
)
_JSON_500 = "Triton 2.51 answers 500 for a body its JSON reader cannot read; it is bad input: 400"

KNOWN: Mapping[str, Known] = {
    "server_metadata": known(
        "another server: its own name, version and extensions (kleinserve has no "
        "classification, sequence, shared-memory, repository, statistics, trace or logging "
        "extension)",
        "field name",
        "field version",
        "field extensions",
    ),
    "live": _HEALTH,
    "ready": _HEALTH,
    "model_ready": _HEALTH,
    "model_ready_v1": _HEALTH,
    "model_ready_unknown_model": known(
        "Triton says 400 'Model version not ready' for a model it does not have; kleinserve "
        "404, as for every other request naming an unknown model (Triton's metadata and "
        "infer say 404 too)",
        status=404,
    ),
    "model_ready_unknown_version": known(
        "as model_ready_unknown_model: an unknown version is 404 everywhere", status=404
    ),
    "metadata_multi": _PLATFORM,
    "metadata_multi_v1": _PLATFORM,
    "metadata_strings": _PLATFORM,
    "metadata_dtypes": _PLATFORM,
    "multi_outputs_reordered": _ORDER,
    "dtypes_json_but_fp16": _ORDER,
    "multi_binary_output_but_one": known(
        "binary_data_output asks for every output as binary data 'unless overridden by "
        "binary_data on a specific output' (the binary extension's text); Triton 2.51 "
        "ignores it for outputs listed in 'outputs' and answers 'count' as JSON; kleinserve "
        "does as the text says",
        "binary_follows",
        "content_type",
        "output count parameters",
    ),
    "multi_empty_batch": known(
        "PyTriton 0.7 fails on a tensor with no elements (500: its shared-memory copy cannot "
        "cast a zero-length view); kleinserve runs the model on the empty batch",
        "json_keys",
        status=200,
    ),
    "strings_non_utf8_as_json": known(
        "asked for BYTES that are not UTF-8 as JSON, Triton writes the raw bytes into the JSON "
        "(not valid UTF-8, so not valid JSON); kleinserve refuses with 400 saying to ask for "
        "binary data",
        "text",
        status=400,
    ),
    "dtypes_json": known(
        "Triton reads no FP16 from JSON ('use the binary data format'); kleinserve reads JSON "
        "numbers into float16 as into any float",
        "json_keys",
        status=200,
    ),
    "data_count_mismatch": known(_JSON_500, status=400),
    "negative_shape": known(_JSON_500, status=400),
    "strings_for_fp32": known(_JSON_500, status=400),
    "float_for_int64": known(_JSON_500, status=400),
    "int64_out_of_range": known(_JSON_500, status=400),
    "id_not_a_string": known(_JSON_500, status=400),
    "binary_data_output_not_bool": known(_JSON_500, status=400),
    "inputs_not_a_list": known(_JSON_500, status=400),
    "no_inputs": known(_JSON_500, status=400),
    "body_not_an_object": known(_JSON_500, status=400),
    "bad_json": known(_JSON_500, status=400),
    "bool_for_int64": known(_JSON_500, status=400),
    "dtypes_batch_mismatch": known(
        "Triton's batcher refuses a request to a batching model whose inputs differ in their "
        "first dimension; kleinserve runs such a request alone, unbatched, as sent, and the "
        "model decides (this one echoes its inputs)",
        "json_keys",
        status=200,
    ),
    "version_not_a_number": known(
        "Triton's routes take only digits as a version, so the URL matches no endpoint (404); "
        "kleinserve answers 400 saying the version must be a decimal number",
        status=400,
    ),
}


# ---------------------------------------------------------------------------------------------
# Comparing two answers


def differences(
    triton: Mapping[str, Any], ours: Mapping[str, Any], ordered: bool = False
) -> dict[str, str]:
    """Each aspect in which the answers differ, with what each said. ``ordered``: the request
    listed the outputs it wants, so their order counts too."""
    found: dict[str, str] = {}

    def differ(aspect: str, theirs: Any, mine: Any) -> None:
        found[aspect] = f"Triton {theirs!r}, kleinserve {mine!r}"

    if triton["status"] != ours["status"]:
        differ("status", triton["status"], ours["status"])
    for aspect in ("binary_follows", "content_type"):
        if triton[aspect] != ours[aspect] and (aspect != "content_type" or triton["status"] < 400):
            differ(aspect, triton[aspect], ours[aspect])
    if ("text" in triton) != ("text" in ours):
        differ("text", triton.get("text", "(JSON)")[:80], ours.get("text", "(JSON)")[:80])
        return found
    theirs, mine = triton.get("json"), ours.get("json")
    if isinstance(mine, dict) and "error" in mine:
        # Every kleinserve error body also names its request id (README: access log and
        # request ids); the key is an addition, not a difference in the answer.
        mine = {key: value for key, value in mine.items() if key != "request_id"}
    if isinstance(theirs, dict) and isinstance(mine, dict):
        if set(theirs) != set(mine):
            differ("json_keys", sorted(theirs), sorted(mine))
        for key in set(theirs) & set(mine):
            _compare_field(key, theirs[key], mine[key], triton, ours, differ, ordered)
    elif theirs != mine:
        differ("json_keys", theirs, mine)
    return found


def _compare_field(
    key: str, theirs: Any, mine: Any, triton: Any, ours: Any, differ: Any, ordered: bool
) -> None:
    if key == "error":
        if not (isinstance(theirs, str) and isinstance(mine, str) and mine):
            differ("error", theirs, mine)
    elif key in ("inputs", "outputs") and isinstance(theirs, list):
        names = [t["name"] for t in theirs], [t["name"] for t in mine]
        if sorted(names[0]) != sorted(names[1]):
            differ(f"{key} names", *names)
            return
        if names[0] != names[1] and ordered and key == "outputs":
            differ("outputs_order", *names)
        mine_by_name = {t["name"]: t for t in mine}
        for tensor in theirs:
            _compare_tensor(tensor, mine_by_name[tensor["name"]], triton, ours, differ)
    elif theirs != mine:
        differ(f"field {key}", theirs, mine)


def _compare_tensor(theirs: Any, mine: Any, triton: Any, ours: Any, differ: Any) -> None:
    name = theirs["name"]
    for key in ("datatype", "shape"):
        if theirs.get(key) != mine.get(key):
            differ(f"output {name} {key}", theirs.get(key), mine.get(key))
    if set(theirs) != set(mine) or set(theirs.get("parameters", {})) != set(
        mine.get("parameters", {})
    ):
        differ(f"output {name} parameters", sorted(theirs), sorted(mine))
        return
    if "parameters" in theirs or "data" in theirs:
        values = _values(theirs, triton), _values(mine, ours)
        if not _same_values(theirs["datatype"], *values):
            differ(f"output {name} data", *values)


def _values(tensor: Mapping[str, Any], answer: Mapping[str, Any]) -> Any:
    if "data" in tensor:
        return tensor["data"]
    return answer["binary"][tensor["name"]]


def _same_values(datatype: str, theirs: list[Any], mine: list[Any]) -> bool:
    if datatype == "BYTES":
        return theirs == mine
    a, b = np.array(theirs, NUMPY[datatype]), np.array(mine, NUMPY[datatype])
    return a.shape == b.shape and bool(np.array_equal(a, b, equal_nan=a.dtype.kind == "f"))


# ---------------------------------------------------------------------------------------------
# The test


def _answer(outputs: list[dict[str, Any]], status: int = 200) -> dict[str, Any]:
    doc = {"model_name": "m", "model_version": "1", "outputs": outputs}
    return {"status": status, "content_type": "application/json", "binary_follows": False,
            "json": doc}  # fmt: skip


def _fp32(name: str, data: list[Any]) -> dict[str, Any]:
    return {"name": name, "datatype": "FP32", "shape": [len(data)], "data": data}


def test_differences_reads_values_as_their_datatype() -> None:
    """0.1 and 0.10000000149011612 are one FP32; 0.1 and 0.2 are not; a datatype, a shape,
    a status and a missing key each show as their own aspect."""
    triton = _answer([_fp32("y", [0.10000000149011612, 2.0])])
    assert differences(triton, _answer([_fp32("y", [0.1, 2])])) == {}
    assert set(differences(triton, _answer([_fp32("y", [0.2, 2.0])]))) == {"output y data"}
    fp64 = {**_fp32("y", [0.1, 2.0]), "datatype": "FP64"}
    assert set(differences(triton, _answer([fp64]))) == {"output y datatype"}
    assert set(differences(triton, _answer([{**_fp32("y", [0.1, 2.0]), "shape": [1, 2]}]))) == {
        "output y shape"
    }
    other = {**_answer([_fp32("y", [0.1, 2.0])], status=201), "json": {"outputs": []}}
    assert set(differences(triton, other)) == {"status", "json_keys", "outputs names"}


def test_differences_of_errors_and_output_order() -> None:
    """Errors compare only as both having an error text; output order counts only when the
    request listed its outputs."""
    error = {"status": 400, "content_type": "text/plain", "binary_follows": False}
    assert differences({**error, "json": {"error": "a"}}, {**error, "json": {"error": "b"}}) == {}
    assert set(differences({**error, "json": {"error": "a"}}, {**error, "json": {"error": 1}})) == {
        "error"
    }
    triton = _answer([_fp32("y", [1.0]), _fp32("z", [2.0])])
    swapped = _answer([_fp32("z", [2.0]), _fp32("y", [1.0])])
    assert differences(triton, swapped) == {}
    assert set(differences(triton, swapped, ordered=True)) == {"outputs_order"}


@pytest.fixture(scope="module")
def recording() -> dict[str, Any]:
    document: dict[str, Any] = json.loads(RECORDING.read_text())
    return document


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    for name, maker in MODELS.items():
        getattr(models, maker)(root / name)
    config = root / "models.config"
    config.write_text(
        "model_config_list {\n"
        + "".join(
            f"  config {{ name: '{name}' base_path: '{root / name}' model_platform: 'tensorflow' }}\n"
            for name in MODELS
        )
        + "}\n"
    )
    started = TwistdServer(
        [f"--model_config_file={config}", "--enable_batching"], tmp_path_factory.mktemp("logs")
    ).start()
    try:
        started.wait_ready()
        yield started
    finally:
        started.stop()


def test_the_recording_is_of_these_calls(recording) -> None:
    """Every call has a recorded answer to that very request: change a call, record again."""
    answers = recording["answers"]
    assert sorted(answers) == sorted(call.name for call in CALLS)
    stale = [c.name for c in CALLS if answers[c.name]["request"] != c.digest()]
    assert not stale, f"calls changed since the recording: {stale}; run scripts/record-triton"
    assert recording["recorded_with"]["server"].startswith("triton ")
    assert set(KNOWN) <= set(answers)


@pytest.mark.integration
@pytest.mark.parametrize("call", CALLS, ids=[call.name for call in CALLS])
def test_answers_as_triton_does(server, recording, call) -> None:
    """The same answer as Triton's, or exactly the known difference (and that one still holds)."""
    triton = recording["answers"][call.name]
    ours = send("127.0.0.1", server.port, call)
    expected = KNOWN.get(call.name, Known("no difference"))
    request = call.json()
    found = differences(triton, ours, isinstance(request, dict) and "outputs" in request)
    assert set(found) == set(expected.aspects), (
        f"differences {json.dumps(found, indent=1)}; known: {sorted(expected.aspects)} "
        f"({expected.reason})"
    )
    if expected.status is not None:
        assert ours["status"] == expected.status
    if ours["status"] >= 400:
        assert 400 <= ours["status"] < 500, "bad input or an unknown name is the client's error"
        assert isinstance(ours["json"]["error"], str) and ours["json"]["error"]


@pytest.mark.integration
def test_the_server_logged_no_error(server) -> None:
    """The whole exchange, bad requests included, left no traceback in the server's log."""
    server.check_log()
