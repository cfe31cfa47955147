"""``InferenceClient``: the blocking face of ``AsyncInferenceClient``, for scripts and notebooks.

There is one implementation: this class builds an ``AsyncInferenceClient`` on a reactor
that ``crochet`` runs in a background thread (``crochet.setup()`` on first use, shared by
every client of the process) and waits for each call's Deferred. Plain Python code needs
no Twisted. Files named by path are read here, in the caller's thread, so the reactor
thread never waits on a disk.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any, TypeVar

import crochet

from client.async_client import AsyncInferenceClient, BackendInfo, Image
from client.codec import Classification, Outputs
from client.errors import DeadlineExceeded

__all__ = ["ImageSource", "InferenceClient"]

T = TypeVar("T")

#: A path to an image file, an open binary file, its bytes, or ``(filename, bytes)``.
ImageSource = str | os.PathLike[str] | IO[bytes] | Image

_GRACE = 5.0  # the core enforces deadlines; this only guards against a stopped reactor


def read_image(image: ImageSource) -> Image:
    """An image as the async client takes it: bytes or ``(filename, bytes)``."""
    if isinstance(image, str | os.PathLike):
        path = Path(image)
        return (path.name, path.read_bytes())
    if isinstance(image, bytes | tuple):
        return image
    if isinstance(image, bytearray | memoryview):
        return bytes(image)
    data = image.read()
    name = getattr(image, "name", None)
    return (Path(name).name, data) if isinstance(name, str) else data


class InferenceClient:
    """Blocking inference calls; takes the same arguments as ``AsyncInferenceClient``.

    ``timeout`` is each call's deadline, retries included; ``attempt_timeout`` how long
    one attempt waits before it is cancelled and retried on another server (default: a
    share of the call's timeout, see ``client.dispatch``).

    >>> with InferenceClient(consul="127.0.0.1:8500") as client:
    ...     probabilities = client.predict("digits", images)
    """

    def __init__(
        self,
        consul: str | None = None,
        service: str = "inference",
        *,
        timeout: float = 30.0,
        attempt_timeout: float | None = None,
        **options: Any,
    ) -> None:
        crochet.setup()  # idempotent: the first client of the process starts the reactor thread
        self.timeout = timeout
        self._closed = False

        @crochet.wait_for(timeout=30.0)
        def make() -> AsyncInferenceClient:
            return AsyncInferenceClient(
                consul, service, timeout=timeout, attempt_timeout=attempt_timeout, **options
            )

        self._client: AsyncInferenceClient = make()

    @property
    def async_client(self) -> AsyncInferenceClient:
        """The core this runs; use it only from the reactor thread."""
        return self._client

    def _wait(self, call: Callable[[], Any], timeout: float | None) -> Any:
        if self._closed:
            raise RuntimeError("this InferenceClient is closed")
        limit = (self.timeout if timeout is None else timeout) + _GRACE
        result = crochet.run_in_reactor(call)()
        try:
            return result.wait(limit)
        except crochet.TimeoutError:
            result.cancel()
            raise DeadlineExceeded(
                f"no result within {limit:g} s: is the reactor thread blocked?",
                timeout=limit,
                attempts=0,
            ) from None
        except KeyboardInterrupt:
            result.cancel()
            raise

    def predict(
        self,
        model: str,
        inputs: Any,
        *,
        version: int | None = None,
        signature_name: str | None = None,
        timeout: float | None = None,
    ) -> Outputs:
        """Run ``model`` on ``inputs`` (an array, or a dict of named arrays); see the async client."""
        return self._wait(
            lambda: self._client.predict(
                model, inputs, version=version, signature_name=signature_name, timeout=timeout
            ),
            timeout,
        )

    def predict_json(
        self,
        model: str,
        body: Any,
        *,
        version: int | None = None,
        timeout: float | None = None,
    ) -> Any:
        """Send a TF Serving ``:predict`` body as is; returns the decoded answer."""
        return self._wait(
            lambda: self._client.predict_json(model, body, version=version, timeout=timeout),
            timeout,
        )

    def classify_image(
        self,
        model: str,
        image: ImageSource,
        *,
        top_k: int | None = None,
        version: int | None = None,
        timeout: float | None = None,
    ) -> list[Classification]:
        """Ranked ``(label, score)`` pairs for one image (a path, a file, or bytes)."""
        data = read_image(image)
        return self._wait(
            lambda: self._client.classify_image(
                model, data, top_k=top_k, version=version, timeout=timeout
            ),
            timeout,
        )

    def classify_images(
        self,
        model: str,
        images: Sequence[ImageSource],
        *,
        top_k: int | None = None,
        version: int | None = None,
        timeout: float | None = None,
    ) -> list[list[Classification]]:
        """Ranked labels for several images, sent in one request."""
        data = [read_image(image) for image in images]
        return self._wait(
            lambda: self._client.classify_images(
                model, data, top_k=top_k, version=version, timeout=timeout
            ),
            timeout,
        )

    def metadata(
        self, model: str, *, version: int | None = None, timeout: float | None = None
    ) -> Any:
        """The model's ``/metadata`` document."""
        return self._wait(
            lambda: self._client.metadata(model, version=version, timeout=timeout), timeout
        )

    def status(
        self, model: str, *, version: int | None = None, timeout: float | None = None
    ) -> Any:
        """The model's version status."""
        return self._wait(
            lambda: self._client.status(model, version=version, timeout=timeout), timeout
        )

    def backends(
        self, model: str | None = None, *, timeout: float | None = None
    ) -> list[BackendInfo]:
        """Healthy backends (of ``model`` or the whole service) and this client's load on them."""
        return self._wait(lambda: self._client.backends(model, timeout=timeout), timeout)

    def close(self) -> None:
        """Stop watching Consul and close connections. Calls after this raise."""
        if self._closed:
            return
        self._wait(self._client.close, 10.0)
        self._closed = True

    def __enter__(self) -> InferenceClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
