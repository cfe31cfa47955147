"""Image uploads without a server: form parsing, plans, decoding, ranking, the decode pool, routes.

Routes go through StubTreq with a numpy "model" and synchronous executors (``maybeDeferred``)
for both the decode pool and the batching queue, so every status and error body is checked
without sockets, threads or TensorFlow.
"""

from __future__ import annotations

import gc
import io
import json
import queue
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from treq.testing import StubTreq
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher
from twisted.python import usage

from service.batching import BatchingParameters, BatchingQueue
from service.errors import FailedPrecondition, InvalidArgument, ServingError
from service.http import InferenceAPI, InferenceSite
from service.images import (
    Abandonment,
    ImageDecoder,
    ImagePlan,
    Preprocessing,
    UploadedImage,
    build_plan,
    class_scores,
    decode_image,
    parse_top_k,
    parse_upload,
    read_preprocessing,
    top_predictions,
)
from service.metrics import Metrics
from service.repository import AVAILABLE, LoadedVersion, ModelConfig, ModelRepository
from service.signature import Signature, TensorInfo
from service.tap import Options
from tests import models

REPO = Path(__file__).resolve().parent.parent
SAMPLES = REPO / "samples"

# -- helpers ------------------------------------------------------------------------------------


def image_bytes(
    size: tuple[int, int] = (4, 4), mode: str = "L", color: Any = 128, fmt: str = "PNG", **save: Any
) -> bytes:
    """An image of one colour, encoded."""
    out = io.BytesIO()
    Image.new(mode, size, color).save(out, format=fmt, **save)
    return out.getvalue()


def gradient(size: tuple[int, int] = (12, 10), mode: str = "RGB") -> Image.Image:
    """An image whose pixels all differ, so resizing and conversion are visible."""
    width, height = size
    rng = np.random.default_rng(1)
    channels = {"L": 1, "RGB": 3}[mode]
    pixels = rng.integers(0, 256, (height, width, channels), dtype=np.uint8)
    return Image.fromarray(pixels[..., 0] if mode == "L" else pixels, mode)


def encode(img: Image.Image, fmt: str = "PNG", **save: Any) -> bytes:
    out = io.BytesIO()
    img.save(out, format=fmt, **save)
    return out.getvalue()


def form(
    parts: list[tuple[str, str | None, bytes]], boundary: str = "b0undary"
) -> tuple[bytes, str]:
    """A multipart/form-data body (as curl -F builds it) and its content type."""
    chunks = []
    for name, filename, data in parts:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        head = f"--{boundary}\r\nContent-Disposition: {disposition}\r\n"
        if filename:
            head += "Content-Type: application/octet-stream\r\n"
        chunks.append(head.encode() + b"\r\n" + data + b"\r\n")
    body = b"".join(chunks) + f"--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def signature(inputs: dict[str, tuple[str, Any]], outputs: dict[str, tuple[str, Any]]) -> Signature:
    return Signature(
        "serving_default",
        inputs={k: TensorInfo(k, dtype, shape) for k, (dtype, shape) in inputs.items()},
        outputs={k: TensorInfo(k, dtype, shape) for k, (dtype, shape) in outputs.items()},
    )


GRAY4 = signature(
    {"image": ("DT_FLOAT", (None, 4, 4, 1))}, {"probabilities": ("DT_FLOAT", (None, 3))}
)


def plan_of(sig: Signature, prep: Preprocessing | None = None, labels=None) -> ImagePlan:
    return build_plan({"serving_default": sig}, labels, prep or Preprocessing(), "m")


def upload(data: bytes, name: str = "data", filename: str | None = "x.png") -> UploadedImage:
    return UploadedImage(name, filename, data)


# -- parsing the request --------------------------------------------------------------------------


def test_form_fields_data_image_file_are_images_in_order() -> None:
    """Files in fields data, image and file are the images, in body order; other fields are ignored."""
    body, ctype = form(
        [
            ("image", "b.png", b"B"),
            ("note", None, b"hello"),
            ("data", "a.png", b"A"),
            ("file", None, b"C"),
            ("top_k", None, b"2"),
        ]
    )
    parsed = parse_upload(body, ctype)
    assert [(i.field, i.filename, i.data) for i in parsed.images] == [
        ("image", "b.png", b"B"),
        ("data", "a.png", b"A"),
        ("file", None, b"C"),
    ]
    assert parsed.top_k == 2


def test_form_top_k_overrides_the_query_and_default_is_5() -> None:
    """top_k: the form field wins over ?top_k=, and without either it is 5."""
    body, ctype = form([("data", "a.png", b"A"), ("top_k", None, b"3")])
    assert parse_upload(body, ctype, "7").top_k == 3
    body, ctype = form([("data", "a.png", b"A")])
    assert parse_upload(body, ctype, "7").top_k == 7
    assert parse_upload(body, ctype).top_k == 5


def test_raw_image_body_is_one_image() -> None:
    """A non-form body is the one image; top_k comes from the query string."""
    parsed = parse_upload(b"\x89PNG...", "image/png", "1")
    assert [(i.field, i.data) for i in parsed.images] == [("body", b"\x89PNG...")]
    assert parsed.top_k == 1


@pytest.mark.parametrize(
    ("body_ctype", "message"),
    [
        (form([("note", None, b"x")]), "no image in the form"),
        (form([]), "no image in the form"),
        (form([("data", "a.png", b"")]), "is empty"),
        (
            (
                b'--b\r\nContent-Disposition: form-data; name="data"\r\n\r\nA',
                "multipart/form-data; boundary=b",
            ),
            "malformed multipart",
        ),
        ((b"whatever", "multipart/form-data"), "no boundary"),
        ((b"", "image/png"), "body is empty"),
    ],
)
def test_bad_uploads_are_400(body_ctype, message) -> None:
    """Missing file field, empty file, broken form, no boundary, empty body: each a 400 saying so."""
    body, ctype = body_ctype
    with pytest.raises(InvalidArgument, match=message):
        parse_upload(body, ctype)


@pytest.mark.parametrize("text", ["0", "-1", "abc", "1.5", "", " ", "\uff13", "9" * 30, "+2"])
def test_top_k_must_be_a_positive_whole_number(text: str) -> None:
    """top_k that is not a positive whole number is a 400 naming top_k."""
    with pytest.raises(InvalidArgument, match="top_k must be a positive whole number"):
        parse_top_k(text)


def test_top_k_accepts_whole_numbers() -> None:
    """Whole numbers, with surrounding spaces, are accepted as given."""
    assert [parse_top_k(t) for t in ("1", " 7 ", "1000")] == [1, 7, 1000]


# -- the preprocessing file and the plan ----------------------------------------------------------


def test_preprocessing_file_keys() -> None:
    """Every documented key is read; scale null means raw pixels."""
    prep = Preprocessing.from_json(
        {
            "color": "RGB",
            "size": [10, 12],
            "resize": "nearest",
            "scale": [-1, 1],
            "input": "x",
            "output": "y",
            "signature": "s",
        },
        "f",
    )
    assert prep == Preprocessing("RGB", (10, 12), "nearest", (-1.0, 1.0), "x", "y", "s")
    assert Preprocessing.from_json({"scale": None, "resize": None}, "f").scale is None


@pytest.mark.parametrize(
    ("doc", "key"),
    [
        ([], "JSON object"),
        ({"colour": "L"}, "unknown key"),
        ({"color": "CMYK"}, '"color"'),
        ({"size": [28]}, '"size"'),
        ({"size": [0, 4]}, '"size"'),
        ({"resize": "smooth"}, '"resize"'),
        ({"scale": [1, 1]}, '"scale"'),
        ({"scale": "0..1"}, '"scale"'),
        ({"input": 3}, '"input"'),
    ],
)
def test_bad_preprocessing_files_name_the_key(doc, key) -> None:
    """A bad preprocessing file is refused with the file and the key at fault."""
    with pytest.raises(FailedPrecondition, match=key) as raised:
        Preprocessing.from_json(doc, "/m/1/preprocessing.json")
    assert "/m/1/preprocessing.json" in str(raised.value)


def test_version_folder_preprocessing_wins_over_the_base_folder(tmp_path: Path) -> None:
    """preprocessing.json is read from the version folder, else the base folder, else defaults."""
    version = tmp_path / "1"
    version.mkdir()
    assert read_preprocessing(version) == Preprocessing()
    (tmp_path / "preprocessing.json").write_text('{"color": "L"}')
    assert read_preprocessing(version).color == "L"
    (version / "preprocessing.json").write_text('{"color": "RGB"}')
    assert read_preprocessing(version).color == "RGB"
    (version / "preprocessing.json").write_text("{not json")
    with pytest.raises(FailedPrecondition, match="not valid JSON"):
        read_preprocessing(version)


def test_plan_inferred_from_image_signatures() -> None:
    """[None,H,W,1] is grayscale, [None,H,W,3] RGB, resized to H x W, floats scaled to [0, 1]."""
    plan = plan_of(GRAY4, labels=("a", "b", "c"))
    assert (plan.input, plan.output, plan.color, plan.size, plan.scale) == (
        "image",
        "probabilities",
        "L",
        (4, 4),
        (0.0, 1.0),
    )
    assert plan.batched and not plan.encoded and plan.labels == ("a", "b", "c")
    rgb = plan_of(
        signature({"x": ("DT_FLOAT", (None, 224, 200, 3))}, {"y": ("DT_FLOAT", (None, 5))})
    )
    assert (rgb.color, rgb.size, rgb.output) == ("RGB", (224, 200), "y")
    one = plan_of(signature({"x": ("DT_FLOAT", (1, 8, 8, 3))}, {"y": ("DT_FLOAT", (1, 5))}))
    assert not one.batched and one.add_batch_axis
    raw = plan_of(signature({"x": ("DT_UINT8", (None, 8, 8, 3))}, {"y": ("DT_FLOAT", (None, 5))}))
    assert raw.scale is None and raw.dtype == np.uint8


def test_plan_for_string_inputs_passes_bytes() -> None:
    """A scalar string input takes one image per call; a [None] string input takes a batch."""
    scalar = plan_of(signature({"image": ("DT_STRING", ())}, {"scores": ("DT_FLOAT", (1, 3))}))
    assert scalar.encoded and not scalar.batched
    batch = plan_of(signature({"b": ("DT_STRING", (None,))}, {"p": ("DT_FLOAT", (None, 2))}))
    assert batch.encoded and batch.batched


def test_preprocessing_overrides_inference() -> None:
    """The file's size, scale, resize and color are used where the signature leaves room."""
    sig = signature({"x": ("DT_FLOAT", (None, None, None, 3))}, {"y": ("DT_FLOAT", (None, 2))})
    plan = plan_of(sig, Preprocessing(size=(5, 6), scale=(-1.0, 1.0), resize="nearest"))
    assert (plan.size, plan.scale, plan.resample) == ((5, 6), (-1.0, 1.0), Image.Resampling.NEAREST)
    no_channels = signature({"x": ("DT_FLOAT", (None, 28, 28))}, {"y": ("DT_FLOAT", (None, 2))})
    assert not plan_of(no_channels, Preprocessing(color="L")).channel_axis


@pytest.mark.parametrize(
    ("sig", "prep", "message"),
    [
        (
            signature(
                {"a": ("DT_FLOAT", (None, 4, 4, 1)), "b": ("DT_FLOAT", (None, 1))},
                {"y": ("DT_FLOAT", (None, 2))},
            ),
            Preprocessing(),
            "takes 2 inputs",
        ),
        (
            signature({"x": ("DT_FLOAT", (None, 3))}, {"y": ("DT_FLOAT", (None, 2))}),
            Preprocessing(),
            "not \\[batch, height",
        ),
        (
            signature({"x": ("DT_FLOAT", (None, 4, 4, 2))}, {"y": ("DT_FLOAT", (None, 2))}),
            Preprocessing(),
            "2 channels",
        ),
        (
            signature({"x": ("DT_FLOAT", (None, 4, 4, None))}, {"y": ("DT_FLOAT", (None, 2))}),
            Preprocessing(),
            "unknown channel count",
        ),
        (
            signature({"x": ("DT_FLOAT", (None, 4, 4))}, {"y": ("DT_FLOAT", (None, 2))}),
            Preprocessing(),
            '"color": "L"',
        ),
        (
            signature({"x": ("DT_FLOAT", (None, 4, 4, 1))}, {"y": ("DT_FLOAT", (None, 2))}),
            Preprocessing(color="RGB"),
            "1 channel",
        ),
        (
            signature({"x": ("DT_UINT8", (None, 4, 4, 1))}, {"y": ("DT_FLOAT", (None, 2))}),
            Preprocessing(scale=(0.0, 1.0)),
            "only raw",
        ),
        (
            signature(
                {"x": ("DT_FLOAT", (None, 4, 4, 1))},
                {"a": ("DT_FLOAT", (None, 2)), "b": ("DT_FLOAT", (None, 2))},
            ),
            Preprocessing(),
            '"output"',
        ),
        (GRAY4, Preprocessing(input="pixels"), "no input 'pixels'"),
        (GRAY4, Preprocessing(signature="other"), "no signature 'other'"),
        (
            signature({"x": ("DT_BOOL", (None, 4, 4, 1))}, {"y": ("DT_FLOAT", (None, 2))}),
            Preprocessing(),
            "DT_BOOL",
        ),
    ],
)
def test_models_that_do_not_take_images_are_refused(sig, prep, message) -> None:
    """A signature that is no image classifier, or contradicts the file, is a 400 saying why."""
    with pytest.raises(FailedPrecondition, match=message):
        plan_of(sig, prep)


def test_score_output_rule() -> None:
    """The one output; else probabilities, then scores, then final_result; the file's output wins."""
    outs = {
        "logits": ("DT_FLOAT", (None, 2)),
        "scores": ("DT_FLOAT", (None, 2)),
        "final_result": ("DT_FLOAT", (None, 2)),
    }
    sig = signature({"x": ("DT_FLOAT", (None, 4, 4, 1))}, outs)
    assert plan_of(sig).output == "scores"
    sig = signature(
        {"x": ("DT_FLOAT", (None, 4, 4, 1))}, {**outs, "probabilities": ("DT_FLOAT", (None, 2))}
    )
    assert plan_of(sig).output == "probabilities"
    assert plan_of(sig, Preprocessing(output="logits")).output == "logits"


# -- decoding ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["zero", "three", "seven", "nine"])
def test_decoding_repeats_the_demo_models_training_preprocessing(name: str) -> None:
    """A sample PNG decodes bit for bit to the exporter's to_model_input (what training saw)."""
    exporter = models.load_exporter()
    plan = plan_of(
        signature(
            {"image": ("DT_FLOAT", (None, 28, 28, 1))}, {"probabilities": ("DT_FLOAT", (None, 10))}
        )
    )
    data = (SAMPLES / f"{name}.png").read_bytes()
    with Image.open(io.BytesIO(data)) as img:
        expected = exporter.to_model_input(img)
    decoded = decode_image(upload(data), plan, 10**6)
    assert decoded.dtype == np.float32 and decoded.shape == (28, 28, 1)
    np.testing.assert_array_equal(decoded, expected)
    bigger = encode(Image.open(io.BytesIO(data)).resize((56, 40)))  # resized like training too
    with Image.open(io.BytesIO(bigger)) as img:
        np.testing.assert_array_equal(
            decode_image(upload(bigger), plan, 10**6), exporter.to_model_input(img)
        )


@pytest.mark.parametrize(
    ("fmt", "save", "lossless"),
    [
        ("PNG", {}, True),
        ("BMP", {}, True),
        ("GIF", {}, True),
        ("WEBP", {"lossless": True}, True),
        ("JPEG", {"quality": 95}, False),
    ],
)
def test_every_supported_format_decodes(fmt, save, lossless) -> None:
    """JPEG, PNG, GIF, BMP and WebP decode; lossless ones to exactly the source pixels."""
    source = gradient((4, 4), "L")
    decoded = decode_image(upload(encode(source, fmt, **save)), plan_of(GRAY4), 10**6)
    assert decoded.shape == (4, 4, 1)
    expected = np.asarray(source, np.float32)[..., None] / np.float32(255)
    if lossless:
        np.testing.assert_array_equal(decoded, expected)
    else:
        assert np.abs(decoded - expected).max() < 0.25


def test_gif_first_frame_is_used() -> None:
    """An animated GIF is classified by its first frame."""
    frames = [Image.new("L", (4, 4), 0), Image.new("L", (4, 4), 255)]
    out = io.BytesIO()
    frames[0].save(out, format="GIF", save_all=True, append_images=frames[1:], duration=10)
    decoded = decode_image(upload(out.getvalue()), plan_of(GRAY4), 10**6)
    assert decoded.max() == 0.0


def test_color_conversion_and_resizing_follow_pillow() -> None:
    """RGB to a grayscale model and gray to an RGB model convert, then resize, with Pillow."""
    source = gradient((12, 10), "RGB")
    decoded = decode_image(upload(encode(source)), plan_of(GRAY4), 10**6)
    expected = np.asarray(source.convert("L").resize((4, 4), Image.Resampling.BILINEAR), np.float32)
    np.testing.assert_array_equal(decoded[..., 0], expected / np.float32(255))
    rgb = plan_of(signature({"x": ("DT_FLOAT", (None, 3, 5, 3))}, {"y": ("DT_FLOAT", (None, 2))}))
    decoded = decode_image(upload(image_bytes((9, 9), "L", 51)), rgb, 10**6)
    assert decoded.shape == (3, 5, 3) and np.all(decoded == np.float32(51) / np.float32(255))


def test_scales_and_raw_pixels() -> None:
    """Scale [-1, 1] maps 0..255 onto -1..1; scale null keeps 0..255; integer inputs stay integers."""
    data = encode(Image.fromarray(np.array([[0, 255], [255, 0]], np.uint8)))
    sig = signature({"x": ("DT_FLOAT", (None, 2, 2, 1))}, {"y": ("DT_FLOAT", (None, 2))})
    assert decode_image(
        upload(data), plan_of(sig, Preprocessing(scale=(-1.0, 1.0))), 100
    ).ravel().tolist() == [-1, 1, 1, -1]
    raw = decode_image(upload(data), plan_of(sig, Preprocessing(scale=None)), 100)
    assert raw.dtype == np.float32 and raw.ravel().tolist() == [0, 255, 255, 0]
    ints = plan_of(signature({"x": ("DT_UINT8", (None, 2, 2, 1))}, {"y": ("DT_FLOAT", (None, 2))}))
    assert decode_image(upload(data), ints, 100).dtype == np.uint8


def test_a_model_configured_not_to_resize_refuses_other_sizes() -> None:
    """With "resize": null an image of another size is a 400 naming both sizes."""
    plan = plan_of(GRAY4, Preprocessing(resize=None))
    assert decode_image(upload(image_bytes((4, 4))), plan, 100).shape == (4, 4, 1)
    with pytest.raises(InvalidArgument, match="5x4 pixels.*4x4"):
        decode_image(upload(image_bytes((5, 4))), plan, 100)


def test_string_inputs_get_the_bytes_unchanged() -> None:
    """A string input receives the uploaded bytes themselves, as a scalar or a [1] row."""
    data = image_bytes((4, 4), "RGB", (1, 2, 3), "JPEG")
    scalar = plan_of(signature({"image": ("DT_STRING", ())}, {"scores": ("DT_FLOAT", (1, 3))}))
    decoded = decode_image(upload(data), scalar, 100)
    assert decoded.shape == () and decoded.dtype == object and decoded[()] == data
    row = plan_of(signature({"image": ("DT_STRING", (1,))}, {"scores": ("DT_FLOAT", (1, 3))}))
    assert decode_image(upload(data), row, 100).tolist() == [data]


def _bomb_png(width: int, height: int) -> bytes:
    """A PNG whose header claims a huge size, with a tiny body (what a decompression bomb looks like)."""
    data = bytearray(image_bytes((1, 1)))
    data[16:24] = width.to_bytes(4, "big") + height.to_bytes(4, "big")
    import zlib

    crc = zlib.crc32(bytes(data[12:29])).to_bytes(4, "big")
    data[29:33] = crc
    return bytes(data)


@pytest.mark.parametrize(
    ("data", "status", "message"),
    [
        (b"", 400, "is empty"),
        (b"just some text, not a picture", 415, "not an image in a supported format"),
        (encode(gradient((8, 8)), "TIFF"), 415, "not an image in a supported format"),
        (encode(gradient((40, 40)))[:200], 400, "truncated or corrupt"),
        (encode(gradient((40, 40)), "JPEG")[:300], 400, "truncated or corrupt"),
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, 400, "starts like a PNG"),
        (b"\xff\xd8\xff\xe0" + b"\x13" * 40, 400, "truncated or corrupt"),
        (image_bytes((101, 100)), 413, "more than the limit of 10000"),
        (_bomb_png(100000, 100000), 413, "--max_image_pixels"),
    ],
    ids=[
        "empty",
        "text",
        "tiff",
        "truncated-png",
        "truncated-jpeg",
        "corrupt-png",
        "corrupt-jpeg",
        "over-limit",
        "bomb",
    ],
)
def test_bad_images_are_4xx_naming_the_problem(data, status, message) -> None:
    """Empty, not an image, truncated, corrupt, too many pixels, bombs: each its 4xx and message."""
    from service.images import configure_pillow

    configure_pillow(10000)
    try:
        for plan in (
            plan_of(GRAY4),
            plan_of(signature({"i": ("DT_STRING", ())}, {"s": ("DT_FLOAT", (1, 3))})),
        ):
            if plan.encoded and status == 400 and "truncated" in message:
                continue  # bytes for a string input are only checked up to their header
            with pytest.raises(ServingError, match=message) as raised:
                decode_image(upload(data), plan, 10000)
            assert raised.value.status == status
    finally:
        configure_pillow(40_000_000)


def _check_decodes_or_4xx(data: bytes) -> None:
    try:
        decoded = decode_image(upload(data), plan_of(GRAY4), 10**6)
    except ServingError as e:
        assert 400 <= e.status < 500, e
    else:
        assert decoded.shape == (4, 4, 1) and decoded.dtype == np.float32


@given(st.binary(max_size=2000))
def test_random_bytes_decode_or_are_4xx(data: bytes) -> None:
    """Any bytes either decode to the plan's shape or raise a 4xx ServingError, nothing else."""
    _check_decodes_or_4xx(data)


VALID_IMAGES = [
    encode(gradient((20, 16)), fmt, **save)
    for fmt, save in [("PNG", {}), ("JPEG", {}), ("GIF", {}), ("BMP", {}), ("WEBP", {})]
]


@given(
    st.sampled_from(VALID_IMAGES),
    st.integers(min_value=0, max_value=4000),
    st.lists(st.tuples(st.integers(0, 4000), st.integers(0, 255)), max_size=4),
)
def test_truncated_and_damaged_images_decode_or_are_4xx(valid: bytes, cut: int, flips) -> None:
    """Valid images cut short or with bytes overwritten decode or raise a 4xx, nothing else."""
    data = bytearray(valid[: max(cut, 1)] if cut < len(valid) else valid)
    for position, value in flips:
        if position < len(data):
            data[position] = value
    _check_decodes_or_4xx(bytes(data))


# -- scores to labels ----------------------------------------------------------------------------


def test_top_predictions_sorted_by_score_with_labels() -> None:
    """Best first, ties by class index, k clamped to the class count, float32 kept."""
    scores = np.array([0.1, 0.4, 0.1, 0.4], np.float32)
    top = top_predictions(scores, ("a", "b", "c", "d"), 3)
    assert [(p["label"], float(p["score"])) for p in top] == [
        ("b", 0.4000000059604645),
        ("d", 0.4000000059604645),
        ("a", 0.10000000149011612),
    ]
    assert [p["label"] for p in top_predictions(scores, None, 10)] == ["1", "3", "0", "2"]
    assert [p["label"] for p in top_predictions(scores, ("a",), 2)] == ["1", "3"]


def test_class_scores_per_image() -> None:
    """[k, N] gives k rows; [1, N] or [N] for one image; anything else is refused."""
    assert len(class_scores(np.zeros((3, 5)), 3)) == 3
    assert class_scores(np.zeros((1, 5)), 1)[0].shape == (5,)
    assert class_scores(np.zeros(5), 1)[0].shape == (5,)
    with pytest.raises(FailedPrecondition, match="one score per class"):
        class_scores(np.zeros((2, 5, 5)), 2)


# -- the decode pool -----------------------------------------------------------------------------


def test_decoder_bounds_queued_images() -> None:
    """Past max_enqueued queued images a request is 503 + Retry-After; more than it ever is 413."""
    held: list[Deferred] = []

    def hold(f, *args):
        d: Deferred = Deferred()
        held.append(d)
        return d

    decoder = ImageDecoder(reactor=Clock(), max_enqueued=3, executor=hold)
    plan = plan_of(GRAY4)
    first = Deferred.fromCoroutine(decoder.decode(plan, [upload(b"1"), upload(b"2")]))
    busy = Deferred.fromCoroutine(decoder.decode(plan, [upload(b"3"), upload(b"4")]))
    error = busy.result.value  # failed at once, synchronously
    busy.addErrback(lambda _: None)
    assert error.status == 503 and error.retry_after == 1 and "busy decoding" in error.message
    too_many = Deferred.fromCoroutine(decoder.decode(plan, [upload(b"x")] * 4))
    assert too_many.result.value.status == 413
    too_many.addErrback(lambda _: None)
    assert decoder.queued == 2
    for d in held:
        d.callback(np.zeros((4, 4, 1), np.float32))
    assert len(first.result) == 2 and decoder.queued == 0


def test_decoder_reports_the_first_failure_and_frees_its_slots() -> None:
    """One bad image fails the request with its own error; every slot is released."""
    decoder = ImageDecoder(reactor=Clock(), max_enqueued=4, executor=maybeDeferred)
    good = upload(image_bytes((4, 4)))
    d = Deferred.fromCoroutine(
        decoder.decode(plan_of(GRAY4), [good, upload(b"nope", filename="b.txt"), good])
    )
    failure = d.result
    d.addErrback(lambda _: None)
    assert failure.value.status == 415 and "b.txt" in failure.value.message
    assert decoder.queued == 0


def test_decodes_of_an_abandoned_request_are_skipped() -> None:
    """Once the client has gone, decode jobs not yet started fail fast (499) instead of decoding."""
    decoder = ImageDecoder(reactor=Clock(), executor=maybeDeferred)
    gone = Abandonment()
    gone.set()
    d = Deferred.fromCoroutine(decoder.decode(plan_of(GRAY4), [upload(image_bytes())], gone))
    failure = d.result
    d.addErrback(lambda _: None)
    assert failure.value.status == 499 and decoder.queued == 0


class _ThreadReactor:
    """Just enough reactor for deferToThreadPool: results are handed back to the test thread."""

    def __init__(self) -> None:
        self.calls: queue.Queue = queue.Queue()

    def callFromThread(self, f, *args, **kwargs) -> None:
        self.calls.put((f, args, kwargs))


def test_decoding_runs_on_the_decoders_own_threads(monkeypatch) -> None:
    """decode_image runs on an "image-decode" pool thread, never the calling (reactor) thread."""
    import service.images as images

    threads: list[str] = []
    real = images.decode_image

    def recording(*args):
        threads.append(threading.current_thread().name)
        return real(*args)

    monkeypatch.setattr(images, "decode_image", recording)
    reactor = _ThreadReactor()
    decoder = ImageDecoder(reactor=reactor, threads=2)
    decoder.startService()
    try:
        d = Deferred.fromCoroutine(decoder.decode(plan_of(GRAY4), [upload(image_bytes())] * 3))
        while not d.called:
            f, args, kwargs = reactor.calls.get(timeout=10)
            f(*args, **kwargs)
        assert [a.shape for a in d.result] == [(4, 4, 1)] * 3
    finally:
        decoder.stopService()
    assert len(threads) == 3 and all("image-decode" in name for name in threads)
    assert threading.current_thread().name not in threads
    assert not decoder.pool.started


# -- routes --------------------------------------------------------------------------------------


class FakeImageServable:
    """A grayscale 4x4 classifier: the scores are (mean, 1 - mean, 0.25) of the pixels."""

    signatures = {"serving_default": GRAY4}
    signature_defs = {"serving_default": {"method_name": "tensorflow/serving/predict"}}
    labels = ("light", "dark", "middle")
    path = None

    def signature(self, name: str | None) -> Signature:
        if name not in (None, "serving_default"):
            raise InvalidArgument(f"serving signature name: {name!r} not found")
        return GRAY4


class LinearServable(FakeImageServable):
    """A model that takes no images."""

    signatures = {
        "serving_default": signature({"x": ("DT_FLOAT", (None, 3))}, {"y": ("DT_FLOAT", (None, 2))})
    }

    def signature(self, name: str | None) -> Signature:
        return self.signatures["serving_default"]


def scores(inputs):
    mean = inputs["image"].reshape(len(inputs["image"]), -1).mean(axis=1).astype(np.float32)
    return {"probabilities": np.stack([mean, 1 - mean, np.full_like(mean, 0.25)], axis=1)}


def make_api(
    decoder_executor=maybeDeferred,
    models=("m",),
    servable=None,
    max_enqueued=8,
    max_body_bytes=100_000,
):
    calls: list[tuple] = []

    def model(inputs):
        calls.append(inputs["image"].shape if "image" in inputs else None)
        return scores(inputs)

    repository = ModelRepository(
        [ModelConfig(name, Path("/nonexistent")) for name in models], reactor=Clock()
    )
    metrics = Metrics()
    for name in models:
        version = LoadedVersion(name, 3, state=AVAILABLE, servable=servable or FakeImageServable())  # type: ignore[arg-type]
        version.queues["serving_default"] = BatchingQueue(
            model, BatchingParameters(max_batch_size=8), clock=Clock(), executor=maybeDeferred
        )
        repository.add_version(version)
    decoder = ImageDecoder(reactor=Clock(), max_enqueued=max_enqueued, executor=decoder_executor)
    api = InferenceAPI(repository, metrics=metrics, images=decoder)
    treq = StubTreq(api.resource())
    # Serve through the server's own Site, as twistd does: bounded bodies, and Twisted does not
    # parse forms itself (StubTreq's plain Site would answer a malformed form with its own 400).
    treq._agent._serverFactory = InferenceSite(api, max_body_bytes=max_body_bytes)
    return treq, calls, decoder


def post(treq: StubTreq, path: str, body: bytes, content_type: str) -> tuple[int, dict, Any]:
    results: list = []
    d = treq.request(
        "POST", "http://server" + path, data=body, headers={"content-type": [content_type]}
    )
    d.addCallback(lambda r: r.content().addCallback(lambda c: results.append((r, c))))
    d.addErrback(results.append)
    assert results, "the request did not complete synchronously"
    if hasattr(results[0], "raiseException"):
        results[0].raiseException()
    response, content = results[0]
    return response.code, response.headers, json.loads(content)


def light(value: int = 255, size=(4, 4)) -> bytes:
    return image_bytes(size, "L", value)


def test_post_root_classifies_with_the_only_model() -> None:
    """POST / with a form upload answers model, version and the top 5 (here 3) labels, best first."""
    treq, calls, _ = make_api()
    code, _, doc = post(treq, "/", *form([("data", "w.png", light(255))]))
    assert code == 200
    assert doc == {
        "model": "m",
        "version": "3",
        "predictions": [
            {"label": "light", "score": 1.0},
            {"label": "middle", "score": 0.25},
            {"label": "dark", "score": 0.0},
        ],
    }
    assert calls == [(1, 4, 4, 1)]


def test_several_files_are_one_batch_and_answer_results() -> None:
    """k files are one queued request of k rows, answered as results in upload order."""
    treq, calls, _ = make_api()
    body, ctype = form(
        [("data", "a.png", light(255)), ("image", "b.png", light(0, (9, 7))), ("top_k", None, b"1")]
    )
    code, _, doc = post(treq, "/v1/models/m:classify_image", body, ctype)
    assert code == 200 and calls == [(2, 4, 4, 1)]
    assert doc["results"] == [
        {"predictions": [{"label": "light", "score": 1.0}]},
        {"predictions": [{"label": "dark", "score": 1.0}]},
    ]


def test_raw_image_body_with_query_top_k_and_version_url() -> None:
    """An image/png body is one image; ?top_k=2 limits the answer; /versions/3 is honoured."""
    treq, _, _ = make_api()
    code, _, doc = post(
        treq, "/v1/models/m/versions/3:classify_image?top_k=2", light(0), "image/png"
    )
    assert code == 200 and [p["label"] for p in doc["predictions"]] == ["dark", "middle"]
    code, _, doc = post(
        treq, "/v1/models/m/versions/3:classify_image", light(0), "application/octet-stream"
    )
    assert code == 200


@pytest.mark.parametrize(
    ("path", "body_ctype", "status", "message"),
    [
        ("/", form([("other", "a.png", light())]), 400, "no image in the form"),
        ("/", form([("data", "a.png", b"")]), 400, "is empty"),
        ("/", form([("data", "a.txt", b"hello there")]), 415, "not an image"),
        (
            "/",
            form([("data", "a.png", encode(gradient((40, 40)))[:300])]),
            400,
            "truncated or corrupt",
        ),
        ("/", form([("data", "a.png", b"\x89PNG" + bytes(200_000))]), 413, "100000 bytes"),
        ("/", form([("data", "a.png", light()), ("top_k", None, b"0")]), 400, "top_k"),
        ("/?top_k=many", (light(), "image/png"), 400, "top_k"),
        ("/", (b"{}", "application/json"), 415, "multipart/form-data"),
        ("/", (light(), "text/plain"), 415, "text/plain"),
        ("/v1/models/nosuch:classify_image", form([("data", "a.png", light())]), 404, "nosuch"),
        ("/v1/models/m/versions/9:classify_image", form([("data", "a.png", light())]), 404, "9"),
        (
            "/v1/models/m/labels/stable:classify_image",
            form([("data", "a.png", light())]),
            400,
            "stable",
        ),
        (
            "/v1/models/m:classify_images",
            form([("data", "a.png", light())]),
            400,
            ":classify_image",
        ),
    ],
)
def test_bad_uploads_get_4xx_and_the_route_keeps_working(path, body_ctype, status, message) -> None:
    """Each bad upload answers its 4xx with {"error": …} naming the problem; the next upload works."""
    treq, _, decoder = make_api()
    code, _, doc = post(treq, path, *body_ctype)
    assert code == status and message in doc["error"]
    assert decoder.queued == 0
    assert post(treq, "/", *form([("data", "a.png", light())]))[0] == 200


def test_busy_decoder_is_503_with_retry_after() -> None:
    """When the decode queue is full an upload is refused at once with 503 + Retry-After."""
    held: list[Deferred] = []

    def hold(f, *args):
        d: Deferred = Deferred()
        held.append(d)
        return d

    treq, _, _ = make_api(decoder_executor=hold, max_enqueued=1)
    body, ctype = form([("data", "a.png", light())])
    treq.request("POST", "http://server/", data=body, headers={"content-type": [ctype]})
    assert len(held) == 1  # the plan is being built: that job is not an image
    held[0].callback(image_plan())
    code, headers, doc = post(treq, "/", body, ctype)  # the first upload holds the one slot
    assert code == 503 and headers.getRawHeaders("retry-after") == ["1"] and "busy" in doc["error"]


def image_plan() -> ImagePlan:
    return plan_of(GRAY4, labels=FakeImageServable.labels)


def test_unknown_paths_and_methods_are_json_404_and_405() -> None:
    """GET / (upload route is POST only) is a JSON 405 with Allow; an unknown path a JSON 404;
    both with their request id."""
    treq, _, _ = make_api()
    results: list = []
    for method, path in (("GET", "/"), ("GET", "/nosuch")):
        d = treq.request(method, "http://server" + path)
        d.addCallback(lambda r: r.json().addCallback(lambda doc, r=r: results.append((r, doc))))
    (get_root, root_doc), (nosuch, nosuch_doc) = results
    assert get_root.code == 405 and get_root.headers.getRawHeaders("allow") == ["POST"]
    assert root_doc["error"] == "Method Not Allowed: GET /"
    assert nosuch.code == 404 and nosuch_doc["error"] == "Not Found: GET /nosuch"
    for response, doc in results:  # each error names the id its answer carries
        assert [doc["request_id"]] == response.headers.getRawHeaders("x-request-id")


def test_a_full_batching_queue_drops_the_uploads_already_queued() -> None:
    """Files queued one request each: when the queue fills midway, the request is 503 and the
    files it had queued are withdrawn, leaving the queue as it was."""
    string_sig = signature({"image": ("DT_STRING", ())}, {"scores": ("DT_FLOAT", (1, 3))})

    class StringServable(FakeImageServable):
        signatures = {"serving_default": string_sig}

        def signature(self, name: str | None) -> Signature:
            return string_sig

    held: list[Deferred] = []

    def hold(f, *args):
        d: Deferred = Deferred()
        held.append(d)
        return d

    repository = ModelRepository([ModelConfig("m", Path("/nonexistent"))], reactor=Clock())
    version = LoadedVersion("m", 1, state=AVAILABLE, servable=StringServable())  # type: ignore[arg-type]
    queue = BatchingQueue(
        lambda inputs: {},
        BatchingParameters(max_batch_size=1, max_enqueued_batches=2),
        clock=Clock(),
        executor=hold,
    )
    version.queues["serving_default"] = queue
    repository.add_version(version)
    api = InferenceAPI(
        repository, metrics=Metrics(), images=ImageDecoder(reactor=Clock(), executor=maybeDeferred)
    )
    treq = StubTreq(api.resource())
    treq._agent._serverFactory = InferenceSite(api, max_body_bytes=10**6)
    files = [("data", f"{i}.png", light()) for i in range(4)]  # 1 runs, 2 wait, the 4th is refused
    logged: list[str] = []
    observer = lambda event: logged.append(str(event.get("log_format")))  # noqa: E731
    globalLogPublisher.addObserver(observer)
    try:
        code, headers, doc = post(treq, "/", *form(files))
        gc.collect()  # a withdrawn request's Deferred must not die with an unhandled error
    finally:
        globalLogPublisher.removeObserver(observer)
    assert code == 503 and "overloaded" in doc["error"]
    assert headers.getRawHeaders("retry-after") == ["1"]
    assert queue.queued_rows == 0 and len(held) == 1  # only the batch already running is left
    assert not [line for line in logged if "Unhandled" in line]


def test_a_model_without_image_input_is_400() -> None:
    """classify_image on a model that takes no images is a 400 saying why."""
    treq, _, _ = make_api(servable=LinearServable())
    code, _, doc = post(treq, "/", *form([("data", "a.png", light())]))
    assert code == 400 and "does not take image uploads" in doc["error"]


def test_post_root_needs_a_default_when_several_models_are_served() -> None:
    """With several models and no --default_model, POST / is a 404 pointing at :classify_image."""
    treq, _, _ = make_api(models=("a", "b"))
    code, _, doc = post(treq, "/", *form([("data", "a.png", light())]))
    assert code == 404 and ":classify_image" in doc["error"]


def test_preprocessing_file_is_read_for_the_route(tmp_path: Path) -> None:
    """A preprocessing.json beside the version changes how uploads are prepared (scale [-1, 1])."""
    (tmp_path / "3").mkdir()
    (tmp_path / "3" / "preprocessing.json").write_text('{"scale": [-1, 1]}')
    servable = FakeImageServable()
    servable.path = tmp_path / "3"  # type: ignore[assignment]
    treq, _, _ = make_api(servable=servable)
    code, _, doc = post(treq, "/", *form([("data", "a.png", light(0))]))
    assert code == 200 and doc["predictions"][0] == {"label": "dark", "score": 2.0}  # 1 - (-1)


PART_NAMES = st.sampled_from(["data", "image", "file", "top_k", "other", ""])
PART_DATA = st.one_of(
    st.binary(max_size=300),
    st.sampled_from(
        [light(), light()[:50], image_bytes((30, 30), "RGB", (1, 2, 3), "JPEG"), b"", b"3", b"-1"]
    ),
)


@given(
    parts=st.lists(
        st.tuples(PART_NAMES, st.one_of(st.none(), st.text(max_size=8)), PART_DATA), max_size=4
    ),
    boundary=st.sampled_from(["b0undary", "x", "--weird--"]),
    cut=st.one_of(st.none(), st.integers(min_value=0, max_value=2000)),
    junk=st.binary(max_size=20),
    query=st.sampled_from(["", "?top_k=2", "?top_k=", "?top_k=x"]),
)
@settings(max_examples=150)
def test_random_multipart_bodies_never_5xx(parts, boundary, cut, junk, query) -> None:
    """Random forms, cut short or with junk appended, answer 200 or a 4xx; the route keeps working."""
    treq, _, decoder = make_api()
    safe = [
        (name, fn.replace('"', "").replace("\r", "").replace("\n", "") if fn else fn, data)
        for name, fn, data in parts
    ]
    body, ctype = form(safe, boundary)
    if cut is not None:
        body = body[:cut]
    body += junk
    code, _, doc = post(treq, "/" + query, body, ctype)
    assert code == 200 or (400 <= code < 500 and doc["error"]), (code, doc)
    assert decoder.queued == 0
    assert post(treq, "/", *form([("data", "a.png", light())]))[0] == 200


# -- flags ---------------------------------------------------------------------------------------


def parse(*args: str) -> Any:
    options = Options()
    options.parseOptions(list(args))
    return options.config


def test_image_flags_and_defaults(tmp_path: Path) -> None:
    """--image_decode_threads, --max_enqueued_image_decodes, --max_image_pixels, --default_model."""
    config = parse(f"--model_base_path={tmp_path}")
    assert (
        config.image_decode_threads,
        config.max_enqueued_image_decodes,
        config.max_image_pixels,
    ) == (2, 64, 40_000_000)
    assert config.default_model is None
    config = parse(
        f"--model_base_path={tmp_path}",
        "--model_name=digits",
        "--default_model=digits",
        "--image_decode_threads=4",
        "--max_enqueued_image_decodes=10",
        "--max_image_pixels=1000",
    )
    assert (
        config.default_model,
        config.image_decode_threads,
        config.max_enqueued_image_decodes,
        config.max_image_pixels,
    ) == ("digits", 4, 10, 1000)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--image_decode_threads=0",), "must be positive"),
        (("--max_enqueued_image_decodes=-1",), "must be positive"),
        (("--max_image_pixels=0",), "must be positive"),
        (("--max_image_pixels=lots",), "max_image_pixels"),
        (("--default_model=other",), "is not a served model"),
    ],
)
def test_bad_image_flags_are_usage_errors(tmp_path: Path, args, message) -> None:
    """Bad image flags stop start-up with a message that says what to change."""
    with pytest.raises(usage.UsageError, match=message):
        parse(f"--model_base_path={tmp_path}", *args)


def test_make_service_starts_the_decoder_before_the_port(tmp_path: Path) -> None:
    """The decoder is a service between the repository and the port: it stops after the port drains."""
    from service.lifecycle import HTTPPort
    from service.repository import ModelRepository as Repository
    from service.tap import makeService

    options = Options()
    options.parseOptions([f"--model_base_path={tmp_path}", "--listen=tcp:0:interface=127.0.0.1"])
    from service.decoding import BodyDecoder
    from service.grpc_port import GrpcPort
    from service.hook_pool import HookPool
    from service.reload import ConfigReloader

    children = list(makeService(options))
    kinds = [type(child) for child in children]
    # The hook threads first: loads set hooks up on them, and they stop last.
    assert kinds[:5] == [HookPool, Repository, ConfigReloader, ImageDecoder, BodyDecoder]
    assert [type(port) for port in children[5]] == [HTTPPort, GrpcPort]  # stopped together
