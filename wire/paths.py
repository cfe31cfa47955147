"""Model names and the URL paths of TF Serving's REST API and of the Open Inference Protocol.

    /v1/models/NAME[/versions/N | /labels/LABEL][:verb | /metadata]
    /v2/models/NAME[/versions/N][/infer | /ready]

A model name or a version label is any non-empty text without ``/`` or ``:`` (TF Serving's
REST handler matches both with ``[^/:]+``; it checks neither where it loads models, so no
stricter rule here: every name TF Serving serves over REST works unchanged). A version is
ASCII decimal digits whose value fits in int64.
"""

from __future__ import annotations

import re
import urllib.parse

PREFIX = "/v1/models/"
V2_PREFIX = "/v2/models/"
NAME_PATTERN = r"[^/:]+"
INT64_MAX = 2**63 - 1

#: What follows ``/v1/models/``: the name, an optional version or label, an optional verb.
TARGET = re.compile(
    rf"(?P<name>{NAME_PATTERN})"
    rf"(?:/versions/(?P<version>{NAME_PATTERN})|/labels/(?P<label>{NAME_PATTERN}))?"
    r"(?P<verb>:[a-z_]+|/metadata)?"
)


def is_name(text: str) -> bool:
    """Whether ``text`` can be a model name or a version label in a path."""
    return re.fullmatch(NAME_PATTERN, text) is not None


def model_path(name: str, version: int | None = None, verb: str = "") -> str:
    """``/v1/models/NAME[/versions/N]`` + ``verb`` (``":predict"``, ``"/metadata"``, …).

    ValueError if ``name`` breaks the name rule.
    """
    if not is_name(name):
        raise ValueError(f"{name!r} is not a model name (non-empty, without '/' or ':')")
    path = PREFIX + urllib.parse.quote(name, safe="")
    if version is not None:
        path += f"/versions/{int(version)}"
    return path + verb


def v2_model_path(name: str, version: int | None = None, suffix: str = "") -> str:
    """``/v2/models/NAME[/versions/N]`` + ``suffix`` (``"/infer"``, ``"/ready"`` or ``""``), the
    Open Inference Protocol's model paths. ValueError if ``name`` breaks the name rule."""
    if not is_name(name):
        raise ValueError(f"{name!r} is not a model name (non-empty, without '/' or ':')")
    path = V2_PREFIX + urllib.parse.quote(name, safe="")
    if version is not None:
        path += f"/versions/{int(version)}"
    return path + suffix
