"""The data plane: what the server does for a request, whatever protocol it came by.

Predict, classify, regress, classify_images, model status and metadata, as operations on
numpy arrays and plain Python data: no JSON, no HTTP, no twisted.web. Every front door
(today TF Serving's REST API in ``service.http``; later gRPC, the Open Inference Protocol,
per-model Python hooks) parses its own wire format, calls in here, and encodes what comes
back. Failures are ``ServingError`` s (``service.errors``), which carry their status.

A request names its model with a ``ModelTarget`` (name, and a version number or a label or
neither) and passes:

* ``deadline``: clock seconds (``DataPlane.clock``) past which its work, still queued, is
  dropped unrun with 504; None for no deadline;
* ``cancellation``: a ``Cancellation`` the front door sets when the caller goes away; the
  request's queued batching work is then cancelled and its image decodes not yet started are
  skipped. Cancelling the Deferred of an operation (Klein does, for a client that left)
  cancels what it awaits as well;
* ``queued`` (``VersionLease`` operations): a ``service.batching.Queued`` record the
  batching queue fills with the request's queue wait and batch size, for its access-log
  line; None records nothing.

Two ways in. The one-shot operations (``DataPlane.predict`` …) suit a front door whose inputs
are already tensors. A front door that must decode its body against the model's signature
(the JSON codec does) takes ``DataPlane.lease(target)`` first and decodes inside it::

    with plane.lease(target) as model:      # lookup and lease, before any await
        inputs = await decode(body, model.signature)
        outputs = await model.predict(name, inputs, deadline=..., cancellation=...)

The lease (``LoadedVersion.lease``) is taken right after the lookup, with no await in
between, and held until the answer: a hot swap never unloads a version under a request.
A ``VersionLease`` resolves the request's signature once, whoever asks for it first.

Everything here runs on the reactor thread except ``VersionLease.signature``, which a body
decoder may call from its own thread; TensorFlow runs behind the batching queues, image
decoding on ``ImageDecoder``'s threads.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, cast

import attrs
import numpy as np
from twisted.internet.defer import CancelledError, Deferred, DeferredList
from twisted.python.failure import Failure

from service import examples
from service.batching import Queued
from service.errors import NotFound, ServingError, Unavailable
from service.images import (
    Abandonment,
    ImageDecoder,
    ImagePlan,
    UploadedImage,
    class_scores,
    top_predictions,
)
from service.model_hooks import (
    HookRequest,
    ModelHooks,
    VersionHooks,
    blocking_predict,
    coerce_inputs,
    hook_failure,
)
from service.plane_types import (
    Answer,
    Cancellation,
    Decoded,
    Encoded,
    ModelTarget,
    Tensors,
)
from service.repository import AVAILABLE, LoadedVersion, ModelRepository, batch_rows
from service.signature import Signature, check_inputs

__all__ = [
    "Cancellation",
    "DataPlane",
    "Decoded",
    "Encoded",
    "ImageResults",
    "Metadata",
    "ModelTarget",
    "Tensors",
    "VersionLease",
]


@attrs.frozen
class Metadata:
    """A version's metadata: its signatures as TF Serving's SignatureDef map (plain data), and
    as ``Signature`` s; the kind of model (``Servable.platform``); the model's AVAILABLE
    versions."""

    name: str
    version: int
    signature_defs: Mapping[str, Any]
    signatures: Mapping[str, Signature] = attrs.field(factory=dict)
    platform: str = ""
    versions: tuple[int, ...] = ()


@attrs.frozen
class ImageResults:
    """The answer to an image upload: for each image, its top classes, best first."""

    name: str
    version: int
    predictions: list[list[dict[str, Any]]]  # per image: [{"label": str, "score": np scalar}]


class DataPlane:
    """The operations of the server, on the repository's models (and images, if enabled).

    ``images``: the image decoder; None when image uploads are not enabled.
    ``hooks``: the versions' Python hooks (``service.model_hooks``); None when not enabled.
    ``default_model``: the model an upload without a model goes to (else the only one served).
    """

    def __init__(
        self,
        repository: ModelRepository,
        *,
        images: ImageDecoder | None = None,
        default_model: str | None = None,
        hooks: ModelHooks | None = None,
    ) -> None:
        self.repository = repository
        self.images = images
        self.hooks = hooks
        self._default_model = default_model

    @property
    def clock(self) -> Any:
        """The clock deadlines are read on (``IReactorTime``)."""
        return self.repository.clock

    # -- lookups (no await) ---------------------------------------------------------------------

    def lease(self, target: ModelTarget) -> Held:
        """The AVAILABLE version ``target`` names, held until the ``with`` (or ``async with``)
        block ends.

        404 for an unknown model or version, 400 for an unknown label, 503 while no version
        is AVAILABLE. Enter it before the request's first await (``async with`` enters it
        without awaiting anything). The HTTP front doors use ``async with``: a front process
        (``service.front_remote.RemotePlane``) may have to ask the main process for its lease.
        """
        return Held(self, target)

    def status(self, target: ModelTarget) -> list[dict[str, Any]]:
        """TF Serving's ModelVersionStatus of the versions ``target`` names, newest first."""
        return self.repository.status(target.name, target.version, target.label)

    def metadata(self, target: ModelTarget) -> Metadata:
        version = self.repository.lookup(target.name, target.version, target.label)
        servable = version.require()
        available = tuple(
            sorted(
                number
                for number, v in self.repository.versions.get(target.name, {}).items()
                if v.state == AVAILABLE
            )
        )
        return Metadata(
            target.name,
            version.version,
            servable.signature_defs,
            servable.signatures,
            getattr(servable, "platform", "tensorflow_savedmodel"),
            available,
        )

    def default_model(self) -> str:
        """The model of an upload that names none: ``default_model``, or the only one served."""
        if self._default_model is not None:
            return self._default_model
        if len(self.repository.configs) == 1:
            (name,) = self.repository.configs
            return name
        raise NotFound(
            "this server serves several models and has no --default_model: "
            "POST to /v1/models/NAME:classify_image"
        )

    def require_hooks(self) -> ModelHooks:
        """The hooks; 503 when the server runs without --enable_model_hooks."""
        if self.hooks is None:
            raise Unavailable("model hooks are not enabled on this server")
        return self.hooks

    def require_images(self) -> ImageDecoder:
        """The image decoder; 503 when image uploads are not enabled."""
        if self.images is None:
            raise Unavailable("image uploads are not enabled on this server")
        return self.images

    # -- one-shot operations --------------------------------------------------------------------

    async def predict(
        self,
        target: ModelTarget,
        signature_name: str | None,
        inputs: Mapping[str, np.ndarray],
        *,
        deadline: float | None = None,
        cancellation: Cancellation | None = None,
    ) -> Tensors:
        with self.lease(target) as model:
            return await model.predict(
                signature_name, inputs, deadline=deadline, cancellation=cancellation
            )

    async def classify(
        self,
        target: ModelTarget,
        signature_name: str | None,
        serialized: np.ndarray | Sequence[bytes],
        *,
        deadline: float | None = None,
        cancellation: Cancellation | None = None,
    ) -> Tensors:
        with self.lease(target) as model:
            return await model.classify(
                signature_name, serialized, deadline=deadline, cancellation=cancellation
            )

    async def regress(
        self,
        target: ModelTarget,
        signature_name: str | None,
        serialized: np.ndarray | Sequence[bytes],
        *,
        deadline: float | None = None,
        cancellation: Cancellation | None = None,
    ) -> Tensors:
        with self.lease(target) as model:
            return await model.regress(
                signature_name, serialized, deadline=deadline, cancellation=cancellation
            )

    async def classify_images(
        self,
        target: ModelTarget,
        images: Sequence[UploadedImage],
        top_k: int,
        *,
        deadline: float | None = None,
        cancellation: Cancellation | None = None,
    ) -> ImageResults:
        self.require_images()
        with self.lease(target) as model:
            return await model.classify_images(
                images, top_k, deadline=deadline, cancellation=cancellation
            )


class Held:
    """A lease being held (``DataPlane.lease``), as a context manager of either kind."""

    def __init__(self, plane: DataPlane, target: ModelTarget) -> None:
        self._plane = plane
        self._target = target
        self._held: contextlib.AbstractContextManager[Any] | None = None

    def __enter__(self) -> VersionLease:
        target = self._target
        version = self._plane.repository.lookup(target.name, target.version, target.label)
        held = version.lease()
        held.__enter__()
        self._held = held
        return VersionLease(self._plane, version)

    def __exit__(self, *exc: Any) -> None:
        held, self._held = self._held, None
        if held is not None:
            held.__exit__(*exc)

    async def __aenter__(self) -> VersionLease:
        return self.__enter__()

    async def __aexit__(self, *exc: Any) -> None:
        self.__exit__(*exc)


class VersionLease:
    """One request's hold on one AVAILABLE version (``DataPlane.lease``), and its operations.

    Valid inside the ``with`` block that made it; one per request.
    """

    def __init__(self, plane: DataPlane, version: LoadedVersion) -> None:
        self._plane = plane
        self._version = version
        self.name = version.name
        self.version = version.version
        self._signature: Signature | None = None

    def signature(self, name: str | None) -> Signature:
        """The request's signature (None: the default), resolved once per request.

        404 (NotFound) or 400 for a name the model does not have. A front door's body
        decoder may call it from its own thread; the request's later calls reuse the answer.
        """
        if self._signature is None:
            self._signature = self._version.signature(name)
        return self._signature

    def signature_defs(self) -> Mapping[str, Any]:
        return self._version.require().signature_defs

    def signatures(self) -> Mapping[str, Signature]:
        """Every signature of the version (the same mapping until the version is reloaded)."""
        return self._version.require().signatures

    @property
    def hooks(self) -> VersionHooks | None:
        """The version's hooks (``service.model_hooks``), if it has a hooks file and the server
        runs with ``--enable_model_hooks``."""
        return self._version.hooks

    async def through_hooks(
        self,
        request: HookRequest,
        *,
        decode: Callable[[HookRequest], Awaitable[Decoded]],
        encode: Callable[[Tensors, Any], Answer],
        encode_answer: Callable[[Any], Answer],
        deadline: float | None = None,
        cancellation: Cancellation | None = None,
        queued: Queued | None = None,
    ) -> Answer:
        """Answer ``request`` through the version's hooks, on the hook threads:

        ``handle(request, ctx, predict)`` if it has one; else ``preprocess`` (or ``decode``,
        the front door's own decoding, on the reactor), the batching queue, and
        ``postprocess`` (or ``encode``, the front door's own answer for the outputs). A hook's
        answer becomes a body with ``encode_answer``, on the hook thread that made it.
        """
        hooks = self._version.hooks
        assert hooks is not None, "through_hooks needs a version with hooks"
        pool = self._plane.require_hooks().pool
        context = hooks.context

        def cancelled() -> bool:
            return cancellation is not None and cancellation.cancelled

        async def call(hook: str, *args: Any) -> Any:
            what = hooks.name(hook)
            calling = pool.call(what, *args, deadline=deadline, cancelled=cancelled)
            if cancellation is not None:
                cancellation.on_cancel(calling.cancel)
            try:
                return await calling
            except CancelledError:
                raise  # the client left: Klein drops the request quietly
            except Exception:
                raise hook_failure(what, Failure()) from None

        handle = hooks.get("handle")
        if handle is not None:
            predict = blocking_predict(
                self._plane.clock,
                lambda inputs, **target: Deferred.fromCoroutine(
                    self._predict_for_hook(inputs, target, deadline, cancellation, queued)
                ),
                cancelled,
            )
            return cast(
                Answer,
                await call("handle", lambda: encode_answer(handle(request, context, predict))),
            )
        preprocess = hooks.get("preprocess")
        if preprocess is not None:
            signature = self.signature(None)

            def inputs_of() -> Tensors:
                inputs = coerce_inputs(signature, preprocess(request, context))
                check_inputs(signature, inputs)
                return inputs

            inputs = await call("preprocess", inputs_of)
            signature_name, answer_format = None, None
        else:
            signature_name, inputs, answer_format = await decode(request)
        outputs = await self.predict(
            signature_name, inputs, deadline=deadline, cancellation=cancellation, queued=queued
        )
        postprocess = hooks.get("postprocess")
        if postprocess is None:
            return encode(outputs, answer_format)
        return cast(
            Answer,
            await call(
                "postprocess", lambda: encode_answer(postprocess(outputs, request, context))
            ),
        )

    async def _predict_for_hook(
        self,
        inputs: Mapping[str, Any],
        target: Mapping[str, Any],
        deadline: float | None,
        cancellation: Cancellation | None,
        queued: Queued | None,
    ) -> Tensors:
        """``handle``'s ``predict(inputs, model=, version=, label=, signature_name=)``: this
        version (no model named, or this one with no version or label), or any other model."""
        unknown = set(target) - {"model", "version", "label", "signature_name"}
        if unknown:
            raise TypeError(f"predict() got unexpected keyword(s) {sorted(unknown)}")
        signature_name = target.get("signature_name")
        model = target.get("model")
        if model in (None, self.name) and not target.get("version") and not target.get("label"):
            signature = self.signature(signature_name) if signature_name else self.signature(None)
            return await self._run(
                signature, _hook_inputs(signature, inputs), deadline, cancellation, queued
            )
        other = ModelTarget(model or self.name, target.get("version"), target.get("label"))
        with self._plane.lease(other) as lease:
            signature = lease.signature(signature_name)
            return await lease._run(
                signature, _hook_inputs(signature, inputs), deadline, cancellation, queued
            )

    async def predict(
        self,
        signature_name: str | None,
        inputs: Mapping[str, np.ndarray],
        *,
        deadline: float | None = None,
        cancellation: Cancellation | None = None,
        dtype_names: Mapping[str, str] | None = None,
        queued: Queued | None = None,
    ) -> Tensors:
        """The signature's outputs for ``inputs``, each with the request's own rows.

        ``inputs`` must be the signature's inputs, each of its dtype and a shape its static
        shape allows (InvalidArgument otherwise, naming what is wrong; a wrong dtype by the
        names ``dtype_names`` gives the ``DT_*`` names, see ``check_inputs``).
        """
        signature = self.signature(signature_name)
        check_inputs(signature, inputs, dtype_names)
        return await self._run(signature, inputs, deadline, cancellation, queued)

    async def classify(
        self,
        signature_name: str | None,
        serialized: np.ndarray | Sequence[bytes],
        *,
        deadline: float | None = None,
        cancellation: Cancellation | None = None,
        queued: Queued | None = None,
    ) -> Tensors:
        """TF Serving's Classify: serialized tf.Examples as k rows of the signature's DT_STRING
        input; its ``classes`` and/or ``scores`` outputs (``service.examples`` checks them)."""
        return await self._examples(
            examples.CLASSIFY, signature_name, serialized, deadline, cancellation, queued
        )

    async def regress(
        self,
        signature_name: str | None,
        serialized: np.ndarray | Sequence[bytes],
        *,
        deadline: float | None = None,
        cancellation: Cancellation | None = None,
        queued: Queued | None = None,
    ) -> Tensors:
        """TF Serving's Regress: as ``classify``, answering the ``outputs`` output."""
        return await self._examples(
            examples.REGRESS, signature_name, serialized, deadline, cancellation, queued
        )

    async def _examples(
        self,
        verb: str,
        signature_name: str | None,
        serialized: np.ndarray | Sequence[bytes],
        deadline: float | None,
        cancellation: Cancellation | None,
        queued: Queued | None,
    ) -> Tensors:
        if self._signature is None:  # resolved once, with TF Serving's classify/regress checks
            signatures = self._version.require().signatures
            self._signature = examples.signature_for(signatures, signature_name, verb)
        rows = np.empty(len(serialized), dtype=object)  # [k] serialized tf.Examples (bytes)
        rows[:] = serialized
        inputs = {examples.INPUTS: rows}
        return await self._run(self._signature, inputs, deadline, cancellation, queued)

    async def classify_images(
        self,
        images: Sequence[UploadedImage],
        top_k: int,
        *,
        deadline: float | None = None,
        cancellation: Cancellation | None = None,
        queued: Queued | None = None,
    ) -> ImageResults:
        """Decode the images as the model's input wants them (``service.images``), run them,
        and name each image's ``top_k`` best classes by the model's labels."""
        decoder = self._plane.require_images()
        plan = await decoder.plan(self._version.require(), self.name)
        abandonment = Abandonment()  # set: decodes not yet started are skipped
        if cancellation is not None:
            cancellation.on_cancel(abandonment.set)
        arrays = await decoder.decode(plan, images, abandonment)
        scores = await self._run_images(plan, arrays, deadline, cancellation, queued)
        predictions = [top_predictions(row, plan.labels, top_k) for row in scores]
        return ImageResults(self.name, self.version, predictions)

    def _submit(
        self,
        signature: Signature,
        inputs: Mapping[str, np.ndarray],
        deadline: float | None,
        queued: Queued | None,
    ) -> Deferred:
        queue = self._version.queues[signature.name]
        return queue.submit(inputs, batch_rows(signature, inputs), deadline, queued)

    async def _run(
        self,
        signature: Signature,
        inputs: Mapping[str, np.ndarray],
        deadline: float | None,
        cancellation: Cancellation | None,
        queued: Queued | None,
    ) -> Tensors:
        """Queue one request's inputs; a cancellation drops them from the queue."""
        self._version.require()  # UNLOADING is fine under a lease; a closed servable is not
        submitted = self._submit(signature, inputs, deadline, queued)
        if cancellation is not None:
            cancellation.on_cancel(submitted.cancel)
        outputs: Tensors = await submitted
        return outputs

    async def _run_images(
        self,
        plan: ImagePlan,
        arrays: list[np.ndarray],
        deadline: float | None,
        cancellation: Cancellation | None,
        queued: Queued | None,
    ) -> list[np.ndarray]:
        """Run decoded images through the batching queue; one score vector per image.

        k images of one shape for a batchable input are one request of k rows; otherwise each
        image is a request of its own (they still share batches when the queue can merge them).
        """
        if plan.batched and len({a.shape for a in arrays}) == 1:
            groups = [list(range(len(arrays)))]
            submits = [{plan.input: np.stack(arrays)}]
        else:
            groups = [[i] for i in range(len(arrays))]
            submits = [{plan.input: a} for a in arrays]
        signature = self.signature(plan.signature)
        submitted: list[Deferred] = []
        try:
            for inputs in submits:
                submitted.append(self._submit(signature, inputs, deadline, queued))
        except ServingError:  # e.g. the queue is full: drop what was already queued
            for d in submitted:
                d.addErrback(lambda _: None)  # the CancelledError is expected
                d.cancel()
            raise
        if cancellation is not None:
            for d in submitted:
                cancellation.on_cancel(d.cancel)
        results = await DeferredList(submitted, consumeErrors=True)
        scores: list[np.ndarray] = [np.empty(0)] * len(arrays)
        for group, (ok, value) in zip(groups, results, strict=True):
            if not ok:
                assert isinstance(value, Failure)
                value.raiseException()
            for i, row in zip(group, class_scores(value[plan.output], len(group)), strict=True):
                scores[i] = row
        return scores


def _hook_inputs(signature: Signature, values: Mapping[str, Any]) -> Tensors:
    """What ``handle`` passed to ``predict``, as checked tensors of the signature."""
    inputs = coerce_inputs(signature, values)
    check_inputs(signature, inputs)
    return inputs
