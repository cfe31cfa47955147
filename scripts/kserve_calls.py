"""KServe's own Python client (``kserve.InferenceRESTClient``, protocol v2) against a server.

Run in KServe's environment (``.peers/kserve/venv``) by ``scripts/kserve_check.py``, never in
the project's: ``python scripts/kserve_calls.py BASE_URL GRPC_TARGET INPUTS.npz OUT.json``. It asks
liveness, readiness and model readiness, infers the ``dtypes`` model (every input echoed)
with the inputs of ``INPUTS.npz`` twice -- binary tensors both ways and JSON (FP16 binary even then:
the client sends no FP16 as JSON) -- and the ``strings``
model once, then asks for a model that does not exist; then the same over gRPC with
``kserve.InferenceGRPCClient`` (the inputs as raw contents and as typed contents). It writes what came back, arrays as
``.npy`` files beside ``OUT.json``, for the driver to compare.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
from kserve import InferenceGRPCClient, InferenceRESTClient, InferInput, InferRequest, RESTConfig
from kserve.protocol.infer_type import RequestedOutput

V2_OF = {
    "float32": "FP32", "float64": "FP64", "float16": "FP16", "int8": "INT8", "int16": "INT16",
    "int32": "INT32", "int64": "INT64", "uint8": "UINT8", "uint16": "UINT16",
    "uint32": "UINT32", "uint64": "UINT64", "bool": "BOOL", "object": "BYTES",
}  # fmt: skip


def request(arrays: dict[str, np.ndarray], binary: bool, model: str = "dtypes") -> InferRequest:
    inputs = []
    for name, array in arrays.items():
        tensor = InferInput(name, list(array.shape), V2_OF[array.dtype.name])
        # KServe's client refuses FP16 as JSON ("use the binary data format"): binary always.
        tensor.set_data_from_numpy(array, binary_data=binary or array.dtype == np.float16)
        inputs.append(tensor)
    # Binary both ways: every output asked for as binary data too.
    outputs = [
        RequestedOutput(f"out_{name.removeprefix('in_')}", {"binary_data": True}) for name in arrays
    ]
    return InferRequest(
        model_name=model, infer_inputs=inputs, request_outputs=outputs if binary else None
    )


async def grpc_calls(target: str, arrays: dict[str, np.ndarray], out: Path) -> dict[str, Any]:
    client = InferenceGRPCClient(target, timeout=30)
    found: dict[str, Any] = {
        "server_live": await client.is_server_live(),
        "server_ready": await client.is_server_ready(),
        "model_ready": await client.is_model_ready("dtypes"),
    }
    answer = await client.infer(request(arrays, True))
    for output in answer.outputs:
        np.save(out.parent / f"grpc-raw-{output.name}.npy", output.as_numpy(), allow_pickle=True)
    # Typed contents (``fp32_contents`` …), on ``multi``: ``dtypes`` takes an FP16 input,
    # which has no typed field.
    typed = {"a": np.array([[1.5, 2.0]], np.float32), "b": np.array([3], np.int64)}
    answer = await client.infer(request(typed, False, model="multi"))
    found["typed"] = {o.name: o.as_numpy().tolist() for o in answer.outputs}
    try:
        await client.infer(InferRequest(model_name="no-such-model", infer_inputs=[]))
    except grpc.aio.AioRpcError as e:
        found["missing_model"] = {"code": e.code().name, "message": e.details()}
    await client.close()
    return found


async def calls(base: str, arrays: dict[str, np.ndarray], out: Path) -> dict[str, Any]:
    client = InferenceRESTClient(RESTConfig(protocol="v2", timeout=30))
    found: dict[str, Any] = {
        "server_live": await client.is_server_live(base),
        "server_ready": await client.is_server_ready(base),
        "model_ready": await client.is_model_ready(base, "dtypes"),
        "missing_model_ready": await client.is_model_ready(base, "no-such-model"),
    }
    for way in ("binary", "json"):
        headers: dict[str, str] = {}
        answer = await client.infer(
            base, request(arrays, way == "binary"), model_name="dtypes", response_headers=headers
        )
        found[f"{way}_answer_binary"] = "inference-header-content-length" in headers
        for output in answer.outputs:
            array = output.as_numpy()
            np.save(out.parent / f"{way}-{output.name}.npy", array, allow_pickle=True)
        found[way] = sorted(o.name for o in answer.outputs)
    text = np.array([b"kserve", "é".encode()], dtype=object)
    words = InferInput("text", [2], "BYTES")
    words.set_data_from_numpy(text, binary_data=True)
    answer = await client.infer(
        base, InferRequest(model_name="strings", infer_inputs=[words]), model_name="strings"
    )
    found["strings"] = {o.name: o.as_numpy().tolist() for o in answer.outputs}
    # BYTES come back as str when the server answered in JSON, bytes when binary.
    found["strings"]["upper_bytes"] = [
        b if isinstance(b, str) else bytes(b).decode() for b in found["strings"]["upper_bytes"]
    ]
    try:
        await client.infer(base, request(arrays, True), model_name="no-such-model")
    except httpx.HTTPStatusError as e:
        found["missing_model"] = {"status": e.response.status_code, "message": str(e)}
    await client.close()
    return found


def main() -> None:
    base, target, inputs, out = sys.argv[1], sys.argv[2], sys.argv[3], Path(sys.argv[4])
    with np.load(inputs, allow_pickle=True) as loaded:
        arrays = {name: loaded[name] for name in loaded.files}
    found = asyncio.run(calls(base, arrays, out))
    found["grpc"] = asyncio.run(grpc_calls(target, arrays, out))
    out.write_text(json.dumps(found, indent=1))


if __name__ == "__main__":
    main()
