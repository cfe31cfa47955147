"""Per-version Python hooks: a model version's own pre- and post-processing, batching kept.

A version folder may hold ``assets.extra/kleinserve_hooks.py`` (inside the version, so it is
versioned, copied and swapped with the model; TF Serving ignores the files it does not know
in ``assets.extra``). With ``--enable_model_hooks`` it is imported when its version loads and
dropped when it unloads. Every function in it is optional::

    setup(ctx)                          once, when the version loads (a failure fails the load)
    teardown(ctx)                       once, when the version unloads
    preprocess(request, ctx) -> inputs  per request, before the batching queue
    postprocess(outputs, request, ctx) -> answer
                                        per request, after its rows are split from the batch
    handle(request, ctx, predict) -> answer
                                        full control; ``predict(inputs)`` still goes through
                                        the batching queue, so its calls share batches

``request`` is a ``HookRequest`` (the body, its content type, headers, query; ``json()`` and
``form()`` parse it); ``ctx`` a ``HookContext`` (model, version, signatures, labels, folder,
logger, ``state`` for what ``setup`` opens, ``metrics`` to declare Prometheus metrics that
``/metrics`` shows while the version is loaded). An answer is any JSON value (numpy arrays and
scalars included), or ``bytes`` sent as ``application/octet-stream``.

Where hooks run: never on the reactor thread nor on an inference thread, but on the server's
``HookPool`` (``service.hook_pool``): ``--hook_threads`` threads and a bounded wait list
(503 past it). A call past the request's deadline answers 504 at the deadline and one whose
client left is dropped; the thread itself is freed when the hook returns (Python cannot stop
a thread), so the pool recovers from a slow hook but a hook that never returns holds its
thread for good.

A hooks file is code: it runs with the server's rights, so a server with
``--enable_model_hooks`` must trust its model store as it trusts its own code. Without the flag
a hooks file is ignored, with one warning per version.
"""

from __future__ import annotations

import importlib.util
import itertools
import sys
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

import attrs
import multipart
import numpy as np
import orjson
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Summary
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.threads import blockingCallFromThread
from twisted.logger import Logger
from twisted.python.failure import Failure

from service import codec
from service.errors import (
    Cancelled,
    DeadlineExceeded,
    Internal,
    InvalidArgument,
    ResourceExhausted,
    ServingError,
)
from service.hook_pool import HookPool
from service.images import form_parts
from service.servables.base import read_labels
from service.signature import Signature
from wire.auth import AUTHORIZATION_HEADER

__all__ = [
    "HOOKS_FILE",
    "HookContext",
    "HookMetrics",
    "HookRequest",
    "ModelHooks",
    "VersionHooks",
]

log = Logger(namespace="service.model_hooks")

HOOKS_FILE = Path("assets.extra", "kleinserve_hooks.py")
HOOK_FUNCTIONS = ("setup", "teardown", "preprocess", "postprocess", "handle")


def hook_name(hook: str, model: str, version: int) -> str:
    """How errors and logs name a hook: ``hook preprocess of model 'm' version 2``."""
    return f"hook {hook} of model {model!r} version {version}"


# -- what a hook sees ------------------------------------------------------------------------


_AUTHORIZATION = AUTHORIZATION_HEADER.lower()


def _without_credentials(headers: Mapping[str, str]) -> Mapping[str, str]:
    return {k: v for k, v in headers.items() if k.lower() != _AUTHORIZATION}


@attrs.frozen
class HookRequest:
    """What the client sent, as a hook sees it.

    ``verb``: ``predict`` or ``invoke`` (TF Serving's REST API), ``infer`` (the Open Inference
    Protocol); ``body``: the body as it came (REST; empty for ``infer``, whose tensors are
    decoded into ``inputs``); ``content_type``: the media type, lower case, without
    parameters (``content_type_header`` has them); ``headers``: lower-case names, the last
    value of each, without ``authorization`` (the server's bearer token stays with the server:
    a hook that logs its headers never logs a token); ``query``: every value of each query
    parameter.
    """

    model: str
    version: int
    verb: str
    body: bytes
    content_type: str = ""
    content_type_header: str = ""
    headers: Mapping[str, str] = attrs.field(factory=dict, converter=_without_credentials)
    query: Mapping[str, tuple[str, ...]] = attrs.field(factory=dict)
    inputs: Mapping[str, np.ndarray] | None = None  # tensors, for protocols that send them

    def json(self) -> Any:
        """The body parsed as JSON; 400 if it is not JSON."""
        try:
            return orjson.loads(self.body)
        except orjson.JSONDecodeError as e:
            raise InvalidArgument(f"the request body is not valid JSON: {e}") from None

    def form(self) -> dict[str, list[bytes]]:
        """A ``multipart/form-data`` body's fields (name -> contents, in order); 400 otherwise."""
        if self.content_type != "multipart/form-data":
            raise InvalidArgument(
                f"expected a multipart/form-data body (curl -F name=@file), not {self.content_type!r}"
            )
        boundary = multipart.parse_options_header(self.content_type_header)[1].get("boundary")
        if not boundary:
            raise InvalidArgument("the multipart/form-data content type names no boundary")
        fields: dict[str, list[bytes]] = {}
        for name, _, data in form_parts(self.body, boundary):
            fields.setdefault(name, []).append(data)
        return fields


class HookMetrics:
    """Prometheus metrics a version's hooks declare (``ctx.metrics.counter(...)``).

    They live on a registry of the version's own; ``/metrics`` shows them while the version
    is loaded, each sample labelled with ``model`` and ``version``, and they vanish with it.
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)

    def counter(self, name: str, documentation: str, labelnames: tuple[str, ...] = ()) -> Counter:
        return Counter(name, documentation, self._labels(labelnames), registry=self.registry)

    def gauge(self, name: str, documentation: str, labelnames: tuple[str, ...] = ()) -> Gauge:
        return Gauge(name, documentation, self._labels(labelnames), registry=self.registry)

    def histogram(
        self, name: str, documentation: str, labelnames: tuple[str, ...] = (), **kwargs: Any
    ) -> Histogram:
        return Histogram(
            name, documentation, self._labels(labelnames), registry=self.registry, **kwargs
        )

    def summary(self, name: str, documentation: str, labelnames: tuple[str, ...] = ()) -> Summary:
        return Summary(name, documentation, self._labels(labelnames), registry=self.registry)

    @staticmethod
    def _labels(labelnames: tuple[str, ...]) -> tuple[str, ...]:
        taken = {"model", "version"} & set(labelnames)
        if taken:
            raise ValueError(f"the label(s) {sorted(taken)} are the server's: choose other names")
        return tuple(labelnames)


@attrs.frozen
class HookContext:
    """What every hook of one version gets: which version it is, and its tools."""

    model: str
    version: int
    path: Path  # the version folder
    signatures: Mapping[str, Signature]
    signature: Signature  # the default one, which preprocess's inputs feed
    labels: tuple[str, ...] | None  # class names (the folder's labels.txt), if any
    log: Logger
    metrics: HookMetrics
    signature_for: Callable[[str | None], Signature] = attrs.field(repr=False)
    state: dict[str, Any] = attrs.field(factory=dict)  # setup's things, for the other hooks

    def decode_json(self, request: HookRequest) -> dict[str, np.ndarray]:
        """The inputs of a TF Serving ``:predict`` JSON body (``instances`` or ``inputs``),
        decoded as the server's ``:predict`` decodes them, for the signature it names (the
        default one if none); 400 for a body that is not such JSON."""
        return codec.decode_body(request.body, self.signature_for).inputs


# -- one version's hooks ---------------------------------------------------------------------


_module_numbers = itertools.count()


@attrs.define(eq=False)
class VersionHooks:
    """The hooks file of one loaded version: its functions and their context."""

    context: HookContext
    module: ModuleType
    functions: dict[str, Callable[..., Any]]

    def get(self, hook: str) -> Callable[..., Any] | None:
        return self.functions.get(hook)

    @property
    def takes_raw_bodies(self) -> bool:
        """Whether a request's body goes to the hooks as it is (they decode it)."""
        return "preprocess" in self.functions or "handle" in self.functions

    def name(self, hook: str) -> str:
        return hook_name(hook, self.context.model, self.context.version)


def import_hooks(model: str, version: int, path: Path, servable: Any) -> VersionHooks:
    """Import ``path``'s hooks file and run its ``setup`` (blocking: on the hook pool).

    The module is a fresh one per version (never shared through ``sys.modules``), so two
    versions of a model, or a re-loaded folder, never see each other's globals.
    """
    file = path / HOOKS_FILE
    module_name = f"kleinserve_hooks_{next(_module_numbers)}"
    spec = importlib.util.spec_from_file_location(module_name, file)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {file}")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    finally:
        sys.modules.pop(module_name, None)
    functions = {}
    for hook in HOOK_FUNCTIONS:
        function = getattr(module, hook, None)
        if function is None:
            continue
        if not callable(function):
            raise TypeError(f"{file}: {hook} is a {type(function).__name__}, not a function")
        functions[hook] = function
    context = HookContext(
        model=model,
        version=version,
        path=path,
        signatures=servable.signatures,
        signature=servable.signature(None),
        signature_for=servable.signature,
        labels=read_labels(path),
        log=Logger(namespace=f"hooks.{model}.{version}"),
        metrics=HookMetrics(),
    )
    hooks = VersionHooks(context, module, functions)
    setup = hooks.get("setup")
    if setup is not None:
        setup(context)
    return hooks


class HooksFailed(Exception):
    """A version's hooks file failed to import, or its ``setup`` raised: the load fails."""


# -- the server's hooks: loading, unloading, metrics ------------------------------------------


class ModelHooks:
    """Opens and closes versions' hooks files, and shows their metrics on ``/metrics``.

    ``enabled`` is ``--enable_model_hooks``: without it a hooks file is ignored with a warning.
    Reactor thread only; the hook code itself runs on ``pool``.
    """

    def __init__(self, *, pool: HookPool, registry: CollectorRegistry, enabled: bool) -> None:
        self.pool = pool
        self.enabled = enabled
        self._open: dict[tuple[str, int], VersionHooks] = {}
        registry.register(_HookMetricsCollector(lambda: list(self._open.values())))

    async def open(
        self, model: str, version: int, path: Path, servable: Any
    ) -> VersionHooks | None:
        """The version's hooks, imported and set up; None when it has no hooks file (or hooks
        are not enabled). Any error importing it or in ``setup`` fails the version's load."""
        if not (path / HOOKS_FILE).is_file():
            return None
        if not self.enabled:
            log.warn(
                "model {model} version {version} has a hooks file ({file}); it is ignored: "
                "the server runs without --enable_model_hooks",
                model=model,
                version=version,
                file=path / HOOKS_FILE,
            )
            return None
        file = path / HOOKS_FILE
        try:
            hooks: VersionHooks = await self.pool.call(
                hook_name("setup", model, version),
                import_hooks,
                model,
                version,
                path,
                servable,
            )
        except Exception as e:
            log.failure(
                "model {model} version {version}: hooks file {file} failed",
                model=model,
                version=version,
                file=file,
            )
            raise HooksFailed(
                f"hooks file {file} failed to import or set up: {type(e).__name__}: {e}"
            ) from None
        self._open[(model, version)] = hooks
        log.info(
            "model {model} version {version}: hooks {hooks} from {file}",
            model=model,
            version=version,
            hooks=", ".join(hooks.functions) or "none",
            file=file,
        )
        return hooks

    async def close(self, hooks: VersionHooks) -> None:
        """Run ``teardown`` (its errors are logged) and drop the version's metrics."""
        context = hooks.context
        self._open.pop((context.model, context.version), None)
        teardown = hooks.get("teardown")
        if teardown is None:
            return
        try:
            await self.pool.call(hooks.name("teardown"), teardown, context)
        except Exception:
            log.failure("{what} failed", what=hooks.name("teardown"))


class _HookMetricsCollector(Collector):
    """Every open version's hook metrics, read at scrape time, with ``model`` and ``version``
    labels; families of one name from several versions are shown as one family."""

    def __init__(self, versions: Callable[[], list[VersionHooks]]) -> None:
        self._versions = versions

    def collect(self) -> Iterator[Metric]:
        families: dict[str, Metric] = {}
        for hooks in self._versions():
            context = hooks.context
            extra = {"model": context.model, "version": str(context.version)}
            for family in hooks.context.metrics.registry.collect():
                merged = families.get(family.name)
                if merged is None:
                    merged = families[family.name] = Metric(
                        family.name, family.documentation, family.type, family.unit
                    )
                elif merged.type != family.type:
                    continue  # two versions disagree on the type: the first one shown wins
                for sample in family.samples:
                    merged.samples.append(sample._replace(labels={**sample.labels, **extra}))
        yield from families.values()


# -- inputs and answers ----------------------------------------------------------------------


def coerce_inputs(signature: Signature, values: Any) -> dict[str, np.ndarray]:
    """A hook's inputs as the signature's tensors: each value (numpy array, list, number,
    text) converted to its input's dtype. 500 unless they are a mapping (a hook's bug); 400 for
    a value that does not convert (most often the client's data)."""
    if not isinstance(values, Mapping):
        raise Internal(
            f"the inputs are a {type(values).__name__}, not a dict of the signature's inputs "
            f"({', '.join(map(repr, signature.inputs))})"
        )
    inputs: dict[str, np.ndarray] = {}
    for name, value in values.items():
        info = signature.inputs.get(name)
        if info is None:
            inputs[name] = np.asarray(value)  # check_inputs names the unknown input
            continue
        dtype = info.np_dtype
        if isinstance(value, np.ndarray) and value.dtype == dtype:
            inputs[name] = value
            continue
        try:
            if dtype == np.dtype(object):
                array = np.asarray(value, dtype=object)
                inputs[name] = np.vectorize(_as_bytes, otypes=[object])(array)
            else:
                inputs[name] = np.asarray(value, dtype=dtype)
        except (TypeError, ValueError) as e:
            raise InvalidArgument(f"input {name!r} does not convert to {info.dtype}: {e}") from None
    return inputs


def answer_tensors(answer: Any, protocol: str) -> dict[str, np.ndarray]:
    """A hook's answer to a protocol that answers tensors (the Open Inference Protocol, TF
    Serving's gRPC Predict) as output tensors: lists and numbers become arrays, text BYTES.
    500 unless it is a dict of output names to values."""
    if not isinstance(answer, Mapping) or not all(isinstance(k, str) for k in answer):
        raise Internal(
            f"the answer is a {type(answer).__name__}; {protocol} answers tensors: "
            "return a dict of output name -> array"
        )
    outputs = {}
    for output, value in answer.items():
        array = np.asarray(value)
        if array.dtype.kind == "U":
            array = np.vectorize(str.encode, otypes=[object])(array)
        outputs[output] = array
    return outputs


def _as_bytes(value: Any) -> bytes:
    return value.encode() if isinstance(value, str) else bytes(value)


def blocking_predict(
    reactor: Any,
    run: Callable[..., Deferred],
    is_cancelled: Callable[[], bool],
) -> Callable[..., dict[str, np.ndarray]]:
    """``handle``'s ``predict``: called on a hook thread, it runs ``run(...)`` on the reactor
    (through the batching queues) and waits for the outputs; 499 once the client left.

    Lists and numbers become arrays here, on the hook thread: what is left for the reactor
    (the signature's dtype and checks) is numpy's C work, not a walk over Python objects."""

    def predict(inputs: Mapping[str, Any], **target: Any) -> dict[str, np.ndarray]:
        if is_cancelled():
            raise Cancelled("the client went away")
        if isinstance(inputs, Mapping):
            inputs = {name: np.asarray(value) for name, value in inputs.items()}
        outputs: dict[str, np.ndarray] = blockingCallFromThread(reactor, run, inputs, **target)
        return outputs

    return predict


def hook_failure(what: str, failure: Failure) -> ServingError:
    """The client's error for a hook that raised: a ``ServingError`` keeps its status (a hook
    may raise ``InvalidArgument`` for bad input); anything else is a 500 naming the hook and
    the exception's type, its traceback going to the log only."""
    error = failure.value
    if isinstance(error, ServingError):
        if isinstance(error, DeadlineExceeded | Cancelled | ResourceExhausted):
            return error
        return type(error)(f"{what}: {error.message}", retry_after=error.retry_after)
    if isinstance(error, CancelledError):
        return Cancelled("the client went away")
    log.failure("{what} raised", failure, what=what)
    return Internal(f"{what} raised {type(error).__name__}; see the server log")
