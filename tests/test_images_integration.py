"""Image uploads to a real ``twistd -n inference`` serving the demo digits model the test exports.

Uploads go through the real ``curl`` binary (``curl -F data=@…``) and through urllib with a
multipart body built here; every answer is compared with the SavedModel called in this process
on the array the server should have made of the same bytes (decoded here as the exporter's
training preprocessing does).
"""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import uuid
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from harness.twistd import TwistdServer
from tests import models

pytestmark = pytest.mark.integration

SAMPLE_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
MAX_PIXELS = 250_000
MAX_BYTES = 2_000_000


def multipart_body(
    parts: list[tuple[str, str | None, bytes]], content_type: str = "image/png"
) -> tuple[bytes, str]:
    """A multipart/form-data body as a browser or curl -F sends it, and its content type."""
    boundary = uuid.uuid4().hex
    chunks = []
    for name, filename, data in parts:
        head = f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"'
        if filename is not None:
            head += f'; filename="{filename}"\r\nContent-Type: {content_type}'
        chunks.append(head.encode() + b"\r\n\r\n" + data + b"\r\n")
    return b"".join(chunks) + f"--{boundary}--\r\n".encode(), (
        f"multipart/form-data; boundary={boundary}"
    )


def curl(*args: str) -> tuple[int, Any]:
    """Run the real curl; the status code and the JSON it received."""
    done = subprocess.run(
        ["curl", "-sS", "-w", "\n%{http_code}", *args],
        capture_output=True,
        check=True,
        timeout=60,
    )
    body, _, code = done.stdout.rpartition(b"\n")
    return int(code), json.loads(body)


def upload(server: TwistdServer, path: str, parts, **kwargs) -> tuple[int, dict[str, str], Any]:
    """POST a multipart body built here (urllib); the status, headers and JSON answer."""
    body, ctype = multipart_body(parts, **kwargs)
    status, headers, answer = server.request("POST", path, body, {"content-type": ctype})
    return status, headers, json.loads(answer)


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Any:
    """The exported digits model, its samples, the in-process signature and a server."""
    if shutil.which("curl") is None:
        pytest.skip("the curl binary is not installed")
    import tensorflow as tf

    root = tmp_path_factory.mktemp("images")
    exporter = models.load_exporter()
    exporter.export(root / "digits", root / "samples")
    server = TwistdServer(
        [
            "--model_name=digits",
            f"--model_base_path={root / 'digits'}",
            f"--max_image_pixels={MAX_PIXELS}",
            f"--max_request_bytes={MAX_BYTES}",
        ],
        root,
    ).start()
    serve = tf.saved_model.load(str(root / "digits" / "1")).signatures["serving_default"]

    class Digits:
        samples = root / "samples"
        url = server.url
        files = root

        @staticmethod
        def sample(name: str) -> bytes:
            return (root / "samples" / f"{name}.png").read_bytes()

        @staticmethod
        def expected(*datas: bytes) -> np.ndarray:
            """What the SavedModel answers in this process for these image files, as one batch."""
            arrays = []
            for data in datas:
                with Image.open(io.BytesIO(data)) as img:
                    arrays.append(exporter.to_model_input(img))
            batch = tf.constant(np.stack(arrays))
            return serve(image=batch)["probabilities"].numpy()

    Digits.server = server  # type: ignore[attr-defined]
    try:
        server.wait_ready()
        yield Digits
    finally:
        server.stop()


def check_answer(predictions: list[dict[str, Any]], expected: np.ndarray, k: int) -> None:
    """Top k labels in the model's order, and each score the float32 the model computed."""
    order = np.argsort(-expected, kind="stable")[:k]
    assert [p["label"] for p in predictions] == [str(i) for i in order]
    assert [np.float32(p["score"]) for p in predictions] == [expected[i] for i in order]


def test_every_sample_with_curl_matches_the_model_in_process(digits) -> None:
    """curl -F data=@sample.png to POST / answers what the SavedModel answers on that PNG."""
    right = 0
    for digit, name in enumerate(SAMPLE_NAMES):
        png = digits.samples / f"{name}.png"
        code, doc = curl("-F", f"data=@{png}", f"{digits.url}/")
        assert code == 200 and (doc["model"], doc["version"]) == ("digits", "1")
        expected = digits.expected(png.read_bytes())[0]
        check_answer(doc["predictions"], expected, 5)
        if int(expected.argmax()) == digit:  # where the model is right in-process, so is the server
            assert doc["predictions"][0]["label"] == str(digit)
            right += 1
    assert right >= 8


def test_urllib_multipart_upload_to_classify_image(digits) -> None:
    """A multipart body built by hand, in field "image", reaches :classify_image with top_k."""
    data = (digits.samples / "four.png").read_bytes()
    status, _, doc = upload(
        digits.server,
        "/v1/models/digits/versions/1:classify_image",
        [("image", "four.png", data), ("top_k", None, b"3")],
    )
    assert status == 200
    check_answer(doc["predictions"], digits.expected(data)[0], 3)


def test_raw_png_body_with_top_k_in_the_query(digits) -> None:
    """The PNG itself as the body (Content-Type image/png), ?top_k=2."""
    data = (digits.samples / "two.png").read_bytes()
    status, _, answer = digits.server.request(
        "POST", "/v1/models/digits:classify_image?top_k=2", data, {"content-type": "image/png"}
    )
    assert status == 200
    check_answer(json.loads(answer)["predictions"], digits.expected(data)[0], 2)
    code, doc = curl(
        "-H", "Content-Type: image/png", "--data-binary", f"@{digits.samples / 'two.png'}",
        f"{digits.url}/?top_k=1",
    )  # fmt: skip
    assert code == 200 and len(doc["predictions"]) == 1


def test_several_files_in_one_request_are_one_batch(digits) -> None:
    """Three files in one form answer three results, in order, equal to one batch of three."""
    names = ("eight", "one", "six")
    args = [a for name in names for a in ("-F", f"data=@{digits.samples / name}.png")]
    code, doc = curl(*args, "-F", "top_k=10", f"{digits.url}/v1/models/digits:classify_image")
    assert code == 200 and set(doc) == {"model", "version", "results"}
    expected = digits.expected(*[(digits.samples / f"{n}.png").read_bytes() for n in names])
    assert len(doc["results"]) == 3
    for result, row in zip(doc["results"], expected, strict=True):
        check_answer(result["predictions"], row, 10)
        scores = [p["score"] for p in result["predictions"]]
        assert scores == sorted(scores, reverse=True)


@pytest.mark.parametrize(
    ("fmt", "mode", "size", "save"),
    [
        ("JPEG", "L", (28, 28), {"quality": 90}),
        ("GIF", "L", (28, 28), {}),
        ("BMP", "L", (28, 28), {}),
        ("WEBP", "L", (28, 28), {"lossless": True}),
        ("PNG", "RGB", (84, 70), {}),  # colour and another size: converted and resized
    ],
)
def test_other_formats_colours_and_sizes(digits, fmt, mode, size, save) -> None:
    """JPEG, GIF, BMP, WebP and a larger RGB PNG answer what the model says on their decoding."""
    with Image.open(digits.samples / "three.png") as img:
        converted = img.convert(mode).resize(size)
    out = io.BytesIO()
    converted.save(out, format=fmt, **save)
    data = out.getvalue()
    path = digits.files / f"three.{fmt.lower()}"
    path.write_bytes(data)
    code, doc = curl("-F", f"file=@{path}", f"{digits.url}/")
    assert code == 200
    check_answer(doc["predictions"], digits.expected(data)[0], 5)


def _png(size: tuple[int, int]) -> bytes:
    out = io.BytesIO()
    Image.new("L", size, 0).save(out, format="PNG")
    return out.getvalue()


def _bomb() -> bytes:
    """A 1x1 PNG whose header claims 100000 x 100000 pixels (CRC fixed up)."""
    import zlib

    data = bytearray(_png((1, 1)))
    data[16:24] = (100_000).to_bytes(4, "big") * 2
    data[29:33] = zlib.crc32(bytes(data[12:29])).to_bytes(4, "big")
    return bytes(data)


def _noisy(fmt: str) -> bytes:
    out = io.BytesIO()
    pixels = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(out, format=fmt)
    return out.getvalue()


BAD_UPLOADS = [
    ("no file field", "/", [("picture", "x.png", b"PNG")], 400, "no image in the form"),
    ("empty file", "/", [("data", "empty.png", b"")], 400, "is empty"),
    ("not an image", "/", [("data", "notes.txt", b"hello, world")], 415, "not an image"),
    ("truncated PNG", "/", [("data", "t.png", _noisy("PNG")[:2000])], 400, "truncated or corrupt"),
    ("truncated JPEG", "/", [("data", "t.jpg", _noisy("JPEG")[:1500])], 400, "truncated or corrupt"),
    ("corrupt PNG", "/", [("data", "c.png", b"\x89PNG\r\n\x1a\n" + bytes(64))], 400, "starts like a PNG"),
    ("too many pixels", "/", [("data", "big.png", _png((600, 600)))], 413, f"limit of {MAX_PIXELS}"),
    ("decompression bomb", "/", [("data", "bomb.png", _bomb())], 413, "--max_image_pixels"),
    ("top_k zero", "/", [("data", "s.png", b"x"), ("top_k", None, b"0")], 400, "top_k"),
    ("top_k text", "/", [("data", "s.png", b"x"), ("top_k", None, b"three")], 400, "top_k"),
    ("top_k query", "/?top_k=-2", [("data", "s.png", b"x")], 400, "top_k"),
    ("unknown model", "/v1/models/cats:classify_image", [("data", "s.png", b"x")], 404, "cats"),
    ("version label", "/v1/models/digits/labels/stable:classify_image", [("data", "s.png", b"x")], 400, "stable"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("what", "path", "parts", "status", "message"), BAD_UPLOADS, ids=[b[0] for b in BAD_UPLOADS]
)
def test_bad_uploads_are_4xx_and_the_server_keeps_serving(
    digits, what, path, parts, status, message
) -> None:
    """Each bad upload gets its 4xx and an error naming the problem; the next upload works."""
    code, _, doc = upload(digits.server, path, parts)
    assert code == status and message in doc["error"], (code, doc)
    assert upload(digits.server, "/", [("data", "s.png", digits.sample("five"))])[0] == 200


def test_body_over_the_limit_and_wrong_content_type(digits) -> None:
    """A body over --max_request_bytes is 413; a text/plain body is 415 saying what to send."""
    code, _, doc = upload(digits.server, "/", [("data", "huge.png", bytes(MAX_BYTES + 1))])
    assert code == 413 and f"limit of {MAX_BYTES} bytes" in doc["error"]
    status, _, answer = digits.server.request("POST", "/", b"hello", {"content-type": "text/plain"})
    assert status == 415 and "multipart/form-data" in json.loads(answer)["error"]
    assert upload(digits.server, "/", [("data", "s.png", digits.sample("five"))])[0] == 200


def test_predict_metadata_and_metrics_still_work(digits) -> None:
    """JSON :predict and metadata are unchanged; /metrics counts classify_image requests."""
    status, doc = digits.server.post_json(
        "/v1/models/digits:predict", {"instances": np.zeros((1, 28, 28, 1)).tolist()}
    )
    assert status == 200 and len(doc["predictions"][0]) == 10
    assert digits.server.get("/v1/models/digits/metadata")[0] == 200
    status, text = digits.server.get("/metrics")
    assert 'kleinserve_requests_total{code="200",route="classify_image"}' in text


FUZZ_SOURCES = [_noisy("PNG"), _noisy("JPEG"), _noisy("GIF")]


@given(
    source=st.sampled_from(FUZZ_SOURCES),
    cut=st.integers(min_value=0, max_value=20000),
    noise=st.binary(max_size=64),
    raw=st.booleans(),
)
@settings(max_examples=25)
def test_random_and_truncated_uploads_never_5xx(digits, source, cut, noise, raw) -> None:
    """Truncated images and random bytes, as a form or a raw body, answer 200 or 4xx, never 5xx."""
    data = source[:cut] + noise
    if raw:
        status, _, answer = digits.server.request("POST", "/", data, {"content-type": "image/jpeg"})
        doc = json.loads(answer)
    else:
        status, _, doc = upload(digits.server, "/", [("data", "fuzz", data)])
    assert status == 200 or (400 <= status < 500 and doc["error"]), (status, doc)


def test_the_server_survived_everything(digits) -> None:
    """After every test above the process still runs, answers, and logged no unexpected error."""
    assert digits.server.process.poll() is None
    assert digits.server.get("/healthz")[0] == 200
    log = digits.server.log()
    assert "unexpected error" not in log and "Unhandled" not in log, log[-3000:]
