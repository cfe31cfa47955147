"""Check kleinserve against KServe's own Python client, which the project does not install.

``scripts/kserve-check`` runs this with the project's environment. It makes the ``dtypes``
and ``strings`` test models (``tests/models.py``), serves them from a real ``twistd``, runs
``scripts/kserve_calls.py`` in KServe's environment (its REST and gRPC clients; the gRPC one sends raw contents, and typed contents to
``multi``) (``.peers/kserve/venv``: the ``kserve``
package brings Kubernetes' client, FastAPI, uvicorn, pandas, grpcio-tools and about 60 more
packages, 450 MB, so it is not in the project's test dependencies), and compares what the
client got with what was sent: every dtype echoed exactly, over binary tensors and JSON.
It prints one line per check and exits 1 if any fails.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from harness.twistd import REPO, TwistdServer
from tests import models

KSERVE_PYTHON = REPO / ".peers" / "kserve" / "venv" / "bin" / "python"


def checks(found: dict, arrays: dict[str, np.ndarray], out: Path) -> list[tuple[str, bool]]:
    results = [
        ("server live", found["server_live"] is True),
        ("server ready", found["server_ready"] is True),
        ("model ready", found["model_ready"] is True),
        ("a missing model is not ready", found["missing_model_ready"] is False),
        ("binary outputs asked for come back binary", found["binary_answer_binary"] is True),
        ("JSON outputs come back as JSON", found["json_answer_binary"] is False),
        (
            "a missing model's infer is a 404 with the server's message",
            found.get("missing_model", {}).get("status") == 404
            and "no-such-model" in found["missing_model"]["message"],
        ),
        (
            "strings: lengths and upper-cased bytes",
            found["strings"] == {"length": [6, 2], "upper_bytes": ["KSERVE", "é"]},
        ),
    ]
    grpc = found["grpc"]
    results += [
        ("gRPC: server live", grpc["server_live"] is True),
        ("gRPC: server ready", grpc["server_ready"] is True),
        ("gRPC: model ready", grpc["model_ready"] is True),
        (
            "gRPC: typed contents (fp32_contents, int64_contents) read",
            grpc["typed"] == {"sum": [[4.5, 5.0]], "count": [6]},
        ),
        (
            "gRPC: a missing model's infer is NOT_FOUND with the server's message",
            grpc.get("missing_model", {}).get("code") == "NOT_FOUND"
            and "no-such-model" in grpc["missing_model"]["message"],
        ),
    ]
    for way in ("binary", "json", "grpc-raw"):
        for name, sent in arrays.items():
            output = f"out_{name.removeprefix('in_')}"
            got = np.load(out / f"{way}-{output}.npy", allow_pickle=True)
            same = got.shape == sent.shape and (
                [v.encode() if isinstance(v, str) else bytes(v) for v in got.ravel()]
                == list(sent.ravel())
                if sent.dtype == object
                else got.dtype == sent.dtype and np.array_equal(got, sent)
            )
            results.append((f"{way}: {output} echoed exactly ({sent.dtype})", bool(same)))
    return results


def main() -> int:
    if not KSERVE_PYTHON.exists():
        print(
            f"no KServe environment at {KSERVE_PYTHON}: run scripts/kserve-check", file=sys.stderr
        )
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        models.make_all_dtypes(root / "dtypes")
        models.make_strings(root / "strings")
        models.make_multi_io(root / "multi")
        config = root / "models.config"
        config.write_text(
            "model_config_list {\n"
            + "".join(
                f"  config {{ name: '{n}' base_path: '{root / n}' model_platform: 'tensorflow' }}\n"
                for n in ("dtypes", "strings", "multi")
            )
            + "}\n"
        )
        arrays = {f"in_{d}": models.edge_sample(d) for d in models.ALL_DTYPES}
        np.savez(root / "inputs.npz", **arrays)
        out = root / "out"
        out.mkdir()
        server = TwistdServer([f"--model_config_file={config}"], root).start()
        try:
            server.wait_ready()
            subprocess.run(
                [str(KSERVE_PYTHON), str(REPO / "scripts" / "kserve_calls.py"), server.url,
                 server.grpc_target, str(root / "inputs.npz"), str(out / "found.json")],
                check=True,
            )  # fmt: skip
        finally:
            server.stop()
        found = json.loads((out / "found.json").read_text())
        results = checks(found, arrays, out)
    for what, ok in results:
        print(f"{'ok  ' if ok else 'FAIL'} {what}")
    failed = sum(not ok for _, ok in results)
    print(f"kserve-check: {len(results) - failed} of {len(results)} checks passed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
