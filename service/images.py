"""Image uploads: from a request body to the rows a model takes, and from its scores to labels.

The path of an upload (``POST /`` or ``POST /v1/models/NAME[/versions/N]:classify_image``):

1. ``parse_upload`` (reactor thread, cheap): the body is ``multipart/form-data`` with the
   image in a field named ``data``, ``image`` or ``file`` (several files allowed) and an
   optional ``top_k`` field, or the raw image bytes with an ``image/*`` (or
   ``application/octet-stream``) content type and ``?top_k=`` in the query string.
2. ``ImagePlan`` (built once per loaded model version, in the decode pool because it reads a
   file): what the model's input wants, from the signature and the optional preprocessing file
   (below).
3. ``decode_image`` (``ImageDecoder``'s own bounded thread pool, never the reactor thread):
   Pillow decodes JPEG, PNG, GIF (first frame), BMP or WebP, converts to grayscale or RGB,
   resizes and scales. A model whose input is a string tensor gets the bytes unchanged, after
   a header check (format, pixel limit).
4. The arrays go through the model version's batching queue like any ``:predict`` request
   (``service.dataplane.VersionLease.classify_images``): one request of k rows for k files when the input has a free
   batch dimension, else one request per file.
5. ``top_predictions``: the top k (default 5) classes by score, descending, named by the
   model's labels (``labels.txt``; class indices as strings without one).

The preprocessing file
----------------------
``preprocessing.json`` in the version folder (``NAME/1/``) or, for every version, in the
model's base folder (``NAME/``); the version folder's wins. Every key is optional::

    {
      "color": "L",            # "L" (grayscale) or "RGB": Pillow's convert() before resizing
      "size": [28, 28],        # [height, width]; default: the input's static shape
      "resize": "bilinear",    # Pillow filter: nearest, box, bilinear, hamming, bicubic, lanczos;
                               #   null: never resize (another size is a 400)
      "scale": [0, 1],         # pixel 0..255 maps linearly onto [low, high]: [0, 1], [-1, 1], …;
                               #   null: raw 0..255 (the only choice for an integer input)
      "input": "image",        # the signature input the image goes to
      "output": "probabilities",  # the signature output that holds the class scores
      "signature": "serving_default"
    }

Without the file (or for keys it leaves out) everything is inferred from the signature when
that is unambiguous: one input of a float or integer dtype and shape ``[None, H, W, C]`` with
C = 1 (grayscale) or 3 (RGB) is resized to H x W and scaled to [0, 1] (float) or kept 0..255
(integer); ``[1, H, W, C]`` works the same, one image per model call. A ``[None, H, W]``
input needs ``"color": "L"``; unknown H, W or C need ``size`` or ``color``. Pixels become
``float32(pixel) / 255`` (then ``* (high - low) + low`` unless the scale is [0, 1]), so a
model trained on Pillow's ``convert``, ``resize`` and ``/ 255`` sees exactly its training
input.

The output whose scores are ranked: ``output`` from the file; else the signature's only
output; else the first of ``probabilities``, ``scores``, ``final_result`` the signature has.
It must hold one score per class for each image (``[None, N]``, or ``[1, N]`` / ``[N]`` for a
model that takes one image per call).

Errors (all ``{"error": "…"}``): a missing file field, an empty file, an unparsable form or
a ``top_k`` that is not a positive whole number are 400; bytes that are not an image in a
supported format are 415 (Unsupported Media Type: the content is not one we can read, whatever
its declared type); bytes that start like a supported format but do not decode (truncated,
corrupt) are 400; an image over ``--max_image_pixels`` (checked from the header, before
decoding, and by Pillow's decompression-bomb guard) is 413, as are more files in one request
than the decode queue holds; a full decode queue is 503 with Retry-After; a model that does
not take images is 400 (FAILED_PRECONDITION).
"""

from __future__ import annotations

import io
import struct
import warnings
import weakref
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import multipart
import numpy as np
from PIL import Image, UnidentifiedImageError
from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from service.errors import (
    Cancelled,
    FailedPrecondition,
    InvalidArgument,
    PayloadTooLarge,
    ServingError,
    Unavailable,
    UnsupportedMediaType,
)
from service.model_files import read_model_json
from service.signature import Signature

log = Logger()

IMAGE_FIELDS = ("data", "image", "file")
DEFAULT_TOP_K = 5
PREPROCESSING_FILE = "preprocessing.json"
OUTPUT_NAMES = ("probabilities", "scores", "final_result")
DEFAULT_SIGNATURE = "serving_default"
DEFAULT_MAX_IMAGE_PIXELS = 40_000_000
#: Pillow format names tried when opening an upload; nothing else is ever parsed.
FORMATS = ("JPEG", "PNG", "GIF", "BMP", "WEBP")
#: Most form parts one body may hold (files and fields); a form is small, this is only a guard.
MAX_FORM_PARTS = 1024
RESAMPLING: Mapping[str, Image.Resampling] = {
    "nearest": Image.Resampling.NEAREST,
    "box": Image.Resampling.BOX,
    "bilinear": Image.Resampling.BILINEAR,
    "hamming": Image.Resampling.HAMMING,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}
_MAGIC = (
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"\xff\xd8\xff", "JPEG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
)
# What Pillow raises for bytes it cannot decode; anything else is logged as a surprise.
_DECODE_ERRORS = (
    OSError,
    SyntaxError,
    ValueError,
    EOFError,
    IndexError,
    TypeError,
    KeyError,
    struct.error,
    ZeroDivisionError,
)


# ---------------------------------------------------------------------------------------------
# The request: files and top_k


@attrs.frozen
class UploadedImage:
    """One uploaded file: where it came from (for error messages) and its bytes."""

    field: str  # the form field, or "body" for a raw upload
    filename: str | None
    data: bytes = attrs.field(repr=lambda data: f"<{len(data)} bytes>")

    def describe(self) -> str:
        if self.field == "body":
            return "the request body"
        named = f" ({self.filename})" if self.filename else ""
        return f"the file in field {self.field!r}{named}"


@attrs.frozen
class Upload:
    """A parsed upload: the images in the order sent, and how many classes to answer."""

    images: tuple[UploadedImage, ...]
    top_k: int


def parse_top_k(text: str | None) -> int:
    """``top_k`` as sent (a form field or the query string); absent means the default, 5."""
    if text is None:
        return DEFAULT_TOP_K
    value = text.strip()
    if not (value.isascii() and value.isdigit() and len(value) <= 18) or int(value) < 1:
        shown = text if len(text) <= 40 else text[:37] + "..."
        raise InvalidArgument(f"top_k must be a positive whole number, not {shown!r}")
    return int(value)


def parse_upload(body: bytes, content_type: str, query_top_k: str | None = None) -> Upload:
    """Split a body into its images and ``top_k`` (the caller has checked size and type).

    ``content_type`` is the request's whole Content-Type header; ``query_top_k`` the query
    string's ``top_k``, which a form's own ``top_k`` field overrides.
    """
    media_type, options = multipart.parse_options_header(content_type)
    if media_type.lower() != "multipart/form-data":
        if not body:
            raise InvalidArgument(
                "the request body is empty: send the image as the body, or as a form field "
                "'data' (curl -F data=@picture.jpg)"
            )
        return Upload((UploadedImage("body", None, body),), parse_top_k(query_top_k))
    boundary = options.get("boundary")
    if not boundary:
        raise InvalidArgument("the multipart/form-data content type names no boundary")
    images: list[UploadedImage] = []
    top_k = query_top_k
    others: list[str] = []
    for name, filename, data in form_parts(body, boundary):
        if name in IMAGE_FIELDS:
            image = UploadedImage(name, filename, data)
            if not data:
                raise InvalidArgument(f"{image.describe()} is empty")
            images.append(image)
        elif name == "top_k":
            try:
                top_k = data.decode("utf-8")
            except UnicodeDecodeError:
                raise InvalidArgument("top_k must be a positive whole number") from None
        else:
            others.append(repr(name))
    if not images:
        got = f"; the form had {', '.join(others)}" if others else "; the form had no fields"
        raise InvalidArgument(
            "no image in the form: send the file in a field named 'data' (or 'image' or "
            f"'file'), e.g. curl -F data=@picture.jpg{got}"
        )
    return Upload(tuple(images), parse_top_k(top_k))


def form_parts(body: bytes, boundary: str) -> list[tuple[str, str | None, bytes]]:
    """(name, filename, content) of every part of a multipart/form-data body, in order."""
    parts: list[tuple[str, str | None, bytes]] = []
    try:
        parser = multipart.PushMultipartParser(
            boundary, content_length=len(body), max_segment_count=MAX_FORM_PARTS
        )
        segment: multipart.MultipartSegment | None = None
        chunks: list[bytes] = []
        for event in parser.parse(body):
            if isinstance(event, multipart.MultipartSegment):
                segment, chunks = event, []
            elif event is None:
                assert segment is not None
                parts.append((segment.name or "", segment.filename, b"".join(chunks)))
            else:
                chunks.append(bytes(event))
        parser.close()  # raises if the body ended before the closing boundary
    except multipart.ParserLimitReached as e:
        raise PayloadTooLarge(f"the multipart/form-data body is too large: {e}") from None
    except multipart.MultipartError as e:
        raise InvalidArgument(f"malformed multipart/form-data body: {e}") from None
    return parts


# ---------------------------------------------------------------------------------------------
# The plan: what one model version's input wants


@attrs.frozen
class Preprocessing:
    """The preprocessing file's settings, defaults where it has none (``scale`` "default":
    [0, 1] for a float input, raw for an integer one)."""

    color: str | None = None
    size: tuple[int, int] | None = None
    resize: str | None = "bilinear"
    scale: tuple[float, float] | None | str = "default"
    input: str | None = None
    output: str | None = None
    signature: str | None = None

    @classmethod
    def from_json(cls, doc: Any, source: str) -> Preprocessing:
        """Validate a parsed preprocessing file; every problem names the file and the key."""

        def bad(message: str) -> FailedPrecondition:
            return FailedPrecondition(f"{source}: {message}")

        if not isinstance(doc, dict):
            raise bad("must hold a JSON object")
        known = {"color", "size", "resize", "scale", "input", "output", "signature"}
        unknown = sorted(set(doc) - known)
        if unknown:
            raise bad(f"unknown key(s) {unknown}; the keys are {sorted(known)}")
        settings: dict[str, Any] = {}
        if "color" in doc:
            if doc["color"] not in ("L", "RGB"):
                raise bad(f'"color" must be "L" or "RGB", not {doc["color"]!r}')
            settings["color"] = doc["color"]
        if "size" in doc:
            size = doc["size"]
            if not (
                isinstance(size, list)
                and len(size) == 2
                and all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in size)
            ):
                raise bad(f'"size" must be [height, width] in pixels, not {size!r}')
            settings["size"] = (size[0], size[1])
        if "resize" in doc:
            if doc["resize"] is not None and doc["resize"] not in RESAMPLING:
                raise bad(
                    f'"resize" must be one of {sorted(RESAMPLING)} or null, not {doc["resize"]!r}'
                )
            settings["resize"] = doc["resize"]
        if "scale" in doc:
            scale = doc["scale"]
            if scale is not None and not (
                isinstance(scale, list)
                and len(scale) == 2
                and all(isinstance(v, int | float) and not isinstance(v, bool) for v in scale)
                and scale[0] != scale[1]
            ):
                raise bad(
                    f'"scale" must be [low, high] (e.g. [0, 1] or [-1, 1]) or null, not {scale!r}'
                )
            settings["scale"] = None if scale is None else (float(scale[0]), float(scale[1]))
        for key in ("input", "output", "signature"):
            if key in doc:
                if not isinstance(doc[key], str) or not doc[key]:
                    raise bad(f'"{key}" must be a name (a non-empty string), not {doc[key]!r}')
                settings[key] = doc[key]
        return cls(**settings)


def read_preprocessing(version_path: Path | None) -> Preprocessing:
    """The preprocessing file of a version folder, else of its base folder, else defaults.

    Blocking (reads files): call in the decode pool.
    """
    if version_path is None:
        return Preprocessing()
    found = read_model_json(version_path, PREPROCESSING_FILE)
    if found is None:
        return Preprocessing()
    file, doc = found
    return Preprocessing.from_json(doc, str(file))


@attrs.frozen
class ImagePlan:
    """How images become inputs of one model version, and where its scores come out."""

    model: str
    signature: str
    input: str
    output: str
    encoded: bool  # a string input: the bytes pass unchanged
    batched: bool  # True: k images are one request of k rows; False: one request per image
    add_batch_axis: bool  # unbatched inputs of shape [1, …] get a leading axis per image
    color: str | None = None  # "L" or "RGB"
    size: tuple[int, int] | None = None  # (height, width); None: keep the image's own
    resample: Image.Resampling | None = None  # None: refuse images of another size
    scale: tuple[float, float] | None = None  # None: raw 0..255
    dtype: np.dtype = np.dtype(np.float32)
    channel_axis: bool = True  # a trailing channel axis (rank-4 input)
    labels: tuple[str, ...] | None = None


def plan_for(servable: Any, model: str) -> ImagePlan:
    """The plan for a loaded servable, reading its preprocessing file. Blocking: decode pool."""
    return build_plan(
        servable.signatures,
        getattr(servable, "labels", None),
        read_preprocessing(getattr(servable, "path", None)),
        model,
    )


def build_plan(
    signatures: Mapping[str, Signature],
    labels: Sequence[str] | None,
    prep: Preprocessing,
    model: str,
) -> ImagePlan:
    """Combine a servable's signatures with its preprocessing settings (pure; see module doc)."""

    def refuse(problem: str) -> FailedPrecondition:
        return FailedPrecondition(f"model {model!r} does not take image uploads: {problem}")

    key = prep.signature or DEFAULT_SIGNATURE
    if key not in signatures:
        raise refuse(f"it has no signature {key!r} (it has {', '.join(sorted(signatures))})")
    signature = signatures[key]
    names = list(signature.inputs)
    if prep.input is not None and prep.input not in signature.inputs:
        raise refuse(f"signature {key!r} has no input {prep.input!r} (it has {', '.join(names)})")
    if len(names) != 1:
        raise refuse(
            f"signature {key!r} takes {len(names)} inputs ({', '.join(names)}); an image fills one"
        )
    info = signature.inputs[names[0]]
    output = _score_output(signature, prep, refuse)
    # Where the image goes and the scores come from; the preparation is filled in below.
    plan = ImagePlan(
        model=model,
        signature=key,
        input=info.name,
        output=output,
        encoded=False,
        batched=True,
        add_batch_axis=False,
        labels=tuple(labels) if labels else None,
    )
    shape = info.shape
    if info.dtype == "DT_STRING":
        # [] (one image per call, as the retraining graphs' DecodeJpeg/contents), [1], or [None].
        batched = shape is None or (len(shape) == 1 and shape[0] is None)
        if shape is not None and shape not in ((), (1,), (None,)):
            raise refuse(
                f"its string input {info.name!r} has shape {list(shape)}, not [] or [None]"
            )
        return attrs.evolve(plan, encoded=True, batched=batched, add_batch_axis=shape == (1,))
    if info.np_dtype.kind not in "fiu":
        raise refuse(f"input {info.name!r} is {info.dtype}, not a number or string type")
    if shape is None or len(shape) not in (3, 4):
        shown = "of unknown rank" if shape is None else f"of shape {list(shape)}"
        raise refuse(f"input {info.name!r} is {shown}, not [batch, height, width(, channels)]")
    batch, height, width = shape[:3]
    if batch not in (None, 1):
        raise refuse(f"input {info.name!r} takes batches of exactly {batch} images")
    channels = shape[3] if len(shape) == 4 else None
    color = prep.color
    if len(shape) == 4:
        inferred = {1: "L", 3: "RGB"}.get(channels) if channels is not None else None
        if channels is not None and inferred is None:
            raise refuse(f"input {info.name!r} has {channels} channels, not 1 or 3")
        if color is not None and inferred is not None and color != inferred:
            raise refuse(
                f'preprocessing says "color": "{color}" but input {info.name!r} has {channels} channel(s)'
            )
        color = color or inferred
        if color is None:
            raise refuse(
                f'input {info.name!r} has an unknown channel count: set "color" in {PREPROCESSING_FILE}'
            )
    elif color != "L":
        raise refuse(
            f'input {info.name!r} has no channel axis: set "color": "L" in {PREPROCESSING_FILE}'
        )
    size = prep.size
    if size is not None and (height not in (None, size[0]) or width not in (None, size[1])):
        raise refuse(
            f"preprocessing size {list(size)} differs from input {info.name!r}'s {list(shape)}"
        )
    if size is None and height is not None and width is not None:
        size = (height, width)
    scale = prep.scale
    if scale == "default":
        scale = (0.0, 1.0) if info.np_dtype.kind == "f" else None
    if scale is not None and info.np_dtype.kind != "f":
        raise refuse(
            f'input {info.name!r} is {info.dtype}: only raw 0..255 pixels ("scale": null) fit'
        )
    return attrs.evolve(
        plan,
        batched=batch is None,
        add_batch_axis=batch == 1,
        color=color,
        size=size,
        resample=RESAMPLING[prep.resize] if prep.resize is not None else None,
        scale=scale,  # type: ignore[arg-type]
        dtype=info.np_dtype,
        channel_axis=len(shape) == 4,
    )


def _score_output(
    signature: Signature, prep: Preprocessing, refuse: Callable[[str], Exception]
) -> str:
    names = list(signature.outputs)
    if prep.output is not None:
        if prep.output not in signature.outputs:
            raise refuse(
                f"signature {signature.name!r} has no output {prep.output!r} (it has {', '.join(names)})"
            )
        return prep.output
    if len(names) == 1:
        return names[0]
    for name in OUTPUT_NAMES:
        if name in signature.outputs:
            return name
    raise refuse(
        f"signature {signature.name!r} has outputs {', '.join(names)}: name the one holding "
        f'class scores as "output" in {PREPROCESSING_FILE}'
    )


# ---------------------------------------------------------------------------------------------
# Decoding (blocking: the decode pool only)


def sniff_format(data: bytes) -> str | None:
    """The supported format the bytes' first bytes announce, if any."""
    for magic, name in _MAGIC:
        if data.startswith(magic):
            return name
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return None


def decode_image(image: UploadedImage, plan: ImagePlan, max_pixels: int) -> np.ndarray:
    """One upload as the array the plan's input takes (or the bytes, for a string input).

    Raises only ServingErrors with 4xx statuses: whatever the bytes, a request boundary.
    """
    data = image.data
    if not data:
        raise InvalidArgument(f"{image.describe()} is empty")
    try:
        with Image.open(io.BytesIO(data), formats=FORMATS) as opened:
            width, height = opened.size
            if width * height > max_pixels:  # from the header, before anything is decoded
                raise PayloadTooLarge(
                    f"{image.describe()} is {width}x{height} = {width * height} pixels, more than "
                    f"the limit of {max_pixels} (--max_image_pixels)"
                )
            if plan.encoded:
                array = np.empty((), dtype=object)
                array[()] = data
                return array[None] if plan.add_batch_axis else array
            opened.load()
            return _prepare(opened, image, plan)
    except ServingError:
        raise
    except Image.DecompressionBombError as e:
        raise PayloadTooLarge(
            f"{image.describe()} is too large: {e} (--max_image_pixels)"
        ) from None
    except UnidentifiedImageError:
        announced = sniff_format(data)
        if announced is None:
            raise UnsupportedMediaType(
                f"{image.describe()} is not an image in a supported format "
                f"(JPEG, PNG, GIF, BMP, WebP)"
            ) from None
        raise InvalidArgument(
            f"{image.describe()} starts like a {announced} image but cannot be read: "
            "it is truncated or corrupt"
        ) from None
    except _DECODE_ERRORS as e:
        raise InvalidArgument(
            f"{image.describe()} could not be decoded; it is truncated or corrupt ({e})"
        ) from None
    except Exception as e:  # a request boundary: untrusted bytes must never become a 500
        log.failure("unexpected error decoding {what}", what=image.describe())
        raise InvalidArgument(
            f"{image.describe()} could not be decoded ({type(e).__name__})"
        ) from None


def _prepare(img: Image.Image, image: UploadedImage, plan: ImagePlan) -> np.ndarray:
    """Convert, resize and scale a decoded image exactly as the module doc says."""
    if plan.color is not None:
        img = img.convert(plan.color)
    if plan.size is not None:
        height, width = plan.size
        if img.size != (width, height):
            if plan.resample is None:
                raise InvalidArgument(
                    f"{image.describe()} is {img.size[0]}x{img.size[1]} pixels, but model "
                    f"{plan.model!r} takes {width}x{height} and is configured not to resize"
                )
            img = img.resize((width, height), plan.resample)
    pixels = np.asarray(img)
    if plan.scale is None:
        array = pixels.astype(plan.dtype)
    else:
        low, high = plan.scale
        array = pixels.astype(np.float32) / np.float32(255)
        if (low, high) != (0.0, 1.0):
            array = array * np.float32(high - low) + np.float32(low)
        array = array.astype(plan.dtype, copy=False)
    if plan.channel_axis and array.ndim == 2:
        array = array[..., None]
    return array[None] if plan.add_batch_axis else array


# ---------------------------------------------------------------------------------------------
# Scores to labels


def class_scores(output: np.ndarray, count: int) -> list[np.ndarray]:
    """One 1-D score vector per image from a model output for ``count`` images."""
    output = np.asarray(output)
    if count == 1 and output.ndim <= 2 and (output.ndim < 2 or output.shape[0] == 1):
        return [output.reshape(-1)]
    if output.ndim == 2 and output.shape[0] == count:
        return list(output)
    raise FailedPrecondition(
        f"the model's score output has shape {list(output.shape)} for {count} image(s); "
        "classify_image needs one score per class for each image"
    )


def top_predictions(
    scores: np.ndarray, labels: Sequence[str] | None, k: int
) -> list[dict[str, Any]]:
    """The k best classes, best first (ties: lower class index first), as label and score."""
    scores = np.asarray(scores).reshape(-1)
    order = np.argsort(-scores.astype(np.float64), kind="stable")[: min(k, scores.size)]
    return [
        {
            "label": labels[i] if labels is not None and i < len(labels) else str(i),
            "score": scores[i],  # a numpy scalar: written with its own dtype's precision
        }
        for i in order.tolist()
    ]


# ---------------------------------------------------------------------------------------------
# The Service that owns the decode threads


class Abandonment:
    """Set when the client goes away; decode jobs not yet started are then skipped."""

    abandoned = False

    def set(self, _: object = None) -> None:
        self.abandoned = True


class ImageDecoder(Service):
    """A bounded pool of decode threads, started and stopped with the server (decoding
    blocks, so it runs on a pool this service owns, never on the reactor thread).

    At most ``max_enqueued`` images are queued or decoding at once; a request that would
    exceed it is refused at once with 503 + Retry-After (and one with more images than that,
    ever, with 413). ``executor(f, *args)`` runs ``f`` on a decode thread and fires its
    Deferred on the reactor; tests pass ``maybeDeferred`` to decode synchronously.
    """

    def __init__(
        self,
        *,
        reactor: Any,
        threads: int = 2,
        max_enqueued: int = 64,
        max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
        executor: Callable[..., Deferred] | None = None,
    ) -> None:
        self.max_enqueued = max_enqueued
        self.max_pixels = max_pixels
        self.pool = ThreadPool(threads, threads, "image-decode")
        self._executor = executor or (
            lambda f, *args: deferToThreadPool(reactor, self.pool, f, *args)
        )
        self.queued = 0  # images waiting for or in a decode thread
        self._plans: weakref.WeakKeyDictionary[Any, ImagePlan] = weakref.WeakKeyDictionary()

    def startService(self) -> None:
        super().startService()
        configure_pillow(self.max_pixels)
        self.pool.start()

    def stopService(self) -> None:
        super().stopService()
        self.pool.stop()  # the HTTP port stopped first: no request is left waiting on it

    async def plan(self, servable: Any, model: str) -> ImagePlan:
        """The servable's plan, built once (it reads the preprocessing file: in the pool)."""
        plan = self._plans.get(servable)
        if plan is None:
            plan = await self._executor(plan_for, servable, model)
            self._plans[servable] = plan
        return plan

    async def decode(
        self,
        plan: ImagePlan,
        images: Sequence[UploadedImage],
        abandonment: Abandonment | None = None,
    ) -> list[np.ndarray]:
        """Decode every image on the pool; the first failure (in upload order) is raised."""
        count = len(images)
        if count > self.max_enqueued:
            raise PayloadTooLarge(
                f"the request has {count} images; at most {self.max_enqueued} are decoded at "
                "once (--max_enqueued_image_decodes): send fewer per request"
            )
        if self.queued + count > self.max_enqueued:
            raise Unavailable(
                f"the server is busy decoding images ({self.queued} queued); retry later",
                retry_after=1,
            )
        abandonment = abandonment or Abandonment()
        self.queued += count
        jobs = []
        for image in images:
            job = self._executor(self._decode_one, image, plan, abandonment)
            job.addBoth(self._release)
            jobs.append(job)
        results = await DeferredList(jobs, consumeErrors=True)
        for ok, value in results:
            if not ok:
                assert isinstance(value, Failure)
                value.raiseException()
        return [value for _, value in results]

    def _decode_one(
        self, image: UploadedImage, plan: ImagePlan, abandonment: Abandonment
    ) -> np.ndarray:
        if abandonment.abandoned:
            raise Cancelled("the client closed the connection")
        return decode_image(image, plan, self.max_pixels)

    def _release(self, result: object) -> object:
        self.queued -= 1
        return result


def configure_pillow(max_pixels: int) -> None:
    """Pillow's own bomb guard at our limit: it refuses (raises) past twice the limit.

    Between the limit and twice it only warns; ``decode_image`` refuses those itself (the
    header check), so the warning says nothing the 413 does not, and is silenced.
    """
    Image.MAX_IMAGE_PIXELS = max_pixels
    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
