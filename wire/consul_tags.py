"""The tags and meta a server registers in Consul, which clients select backends by.

Tags: ``api:tfserving-rest`` and ``api:v2`` (the Open Inference Protocol's REST API, on the
same port); on a server with a gRPC port, ``api:tfserving-grpc`` and ``api:v2-grpc`` (TF
Serving's and the Open Inference Protocol's gRPC services); then ``model:NAME`` for every model
with an AVAILABLE version and ``model:NAME:V`` for each such version. Meta: ``api``
(``tfserving-rest``), ``models`` (``NAME:V,NAME:V,…``, the same versions, as one string a
person can read), with gRPC ``grpc_port`` (the registration's port is the REST port; gRPC is
on the same address), and, for a server that serves its REST port over TLS, ``scheme``
(``https``): clients call it with https. A registration without ``scheme`` (any server
before it, TF Serving's) is http.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

API = "tfserving-rest"
API_TAG = f"api:{API}"
V2_API_TAG = "api:v2"
GRPC_API_TAG = "api:tfserving-grpc"
V2_GRPC_API_TAG = "api:v2-grpc"
GRPC_PORT = "grpc_port"  # the meta key of the gRPC port
SCHEME = "scheme"  # the meta key of the REST port's URL scheme, when it is not http
SCHEMES = ("http", "https")
_MODEL = "model:"


def model_tag(model: str, version: int | None = None) -> str:
    """The tag of a model (any version), or of one of its versions."""
    return f"{_MODEL}{model}" if version is None else f"{_MODEL}{model}:{version}"


def registration(
    available: Mapping[str, Iterable[int]], grpc_port: int | None = None, scheme: str = "http"
) -> tuple[list[str], dict[str, str]]:
    """Tags and meta for the AVAILABLE versions of each model (a model with none is left out),
    for the gRPC API when ``grpc_port`` is given, and for TLS when ``scheme`` is https."""
    if scheme not in SCHEMES:
        raise ValueError(f"scheme must be one of {', '.join(SCHEMES)}, not {scheme!r}")
    tags, served = [API_TAG, V2_API_TAG], []
    if grpc_port is not None:
        tags += [GRPC_API_TAG, V2_GRPC_API_TAG]
    for name, versions in sorted(available.items()):
        numbers = sorted(versions)
        if numbers:
            tags.append(model_tag(name))
        for number in numbers:
            tags.append(model_tag(name, number))
            served.append(f"{name}:{number}")
    meta = {"api": API, "models": ",".join(served)}
    if grpc_port is not None:
        meta[GRPC_PORT] = str(grpc_port)
    if scheme != "http":
        meta[SCHEME] = scheme
    return tags, meta


def scheme_of(meta: Mapping[str, str]) -> str:
    """How to call a registration's REST port: ``https`` when its meta says so, else ``http``."""
    return "https" if meta.get(SCHEME) == "https" else "http"


def served_models(meta: Mapping[str, str], tags: Iterable[str]) -> tuple[str, ...]:
    """``NAME:V`` of every version a registration serves: its ``models`` meta, else its tags."""
    listed = meta.get("models", "")
    if listed:
        return tuple(m for m in listed.split(",") if m)
    return tuple(t[len(_MODEL) :] for t in tags if t.startswith(_MODEL) and t.count(":") == 2)
