"""TF Serving's model URLs: the werkzeug converter for the model target, and the 400s.

A model URL is ``/v1/models/TARGET`` followed by its verb: ``:predict``, ``:classify``,
``:regress``, ``:classify_image`` (POST), ``/metadata`` or nothing (GET, the status). TARGET is
``NAME``, ``NAME/versions/N`` or ``NAME/labels/L``; ``ModelTargetConverter`` (registered as
``<target:…>`` on the Klein app's ``url_map.converters``) matches it up to the verb (a name,
version or label holds no ``/`` and no ``:``) and turns it into a ``ModelTarget``.

A version is what TF Serving takes: ASCII decimal digits, within int64. The converter's
pattern admits only ASCII digits; a number past int64 matches the pattern and is refused by
``to_python`` with ``MalformedPath``, since werkzeug would turn a converter's
``ValidationError`` into a 404. ``malformed`` words the 400 of every model URL no route
takes, the way TF Serving words it ("Malformed request: …").
"""

from __future__ import annotations

from werkzeug.routing import BaseConverter

from service.errors import InvalidArgument
from service.plane_types import ModelTarget
from wire.paths import INT64_MAX, NAME_PATTERN
from wire.paths import TARGET as _TARGET  # the whole grammar, to explain a URL no route took

# Echoed text is cut to this many characters: an error message stays short whatever was sent.
ECHO_CHARS = 200


class MalformedPath(Exception):
    """Raised by the converter for a version past int64; answered as ``malformed`` words it.

    The converter cannot see the request's method, which the message names, so the
    application's error handler builds the 400.
    """


class ModelTargetConverter(BaseConverter):
    """``NAME[/versions/N|/labels/L]`` up to the verb, as a ``ModelTarget``."""

    regex = rf"{NAME_PATTERN}(?:/versions/[0-9]+|/labels/{NAME_PATTERN})?"
    part_isolating = False  # the target spans several path segments

    def to_python(self, value: str) -> ModelTarget:
        name, _, rest = value.partition("/")
        kind, _, text = rest.partition("/")
        if kind == "labels":
            return ModelTarget(name, label=text)
        if kind == "versions":
            version = parse_version(text)
            if version is None:
                raise MalformedPath(value)
            return ModelTarget(name, version=version)
        return ModelTarget(name)

    def to_url(self, value: ModelTarget) -> str:
        if value.version is not None:
            return f"{value.name}/versions/{value.version}"
        if value.label is not None:
            return f"{value.name}/labels/{value.label}"
        return value.name


def parse_version(text: str) -> int | None:
    """A version number as TF Serving takes it (ASCII decimal digits, within int64), or None.

    ``str.isdigit`` and ``int`` accept far more (superscripts, other scripts' digits) and
    ``int`` fails past 4,300 digits, so the digits are checked here, and counted before
    ``int`` sees them.
    """
    significant = text.lstrip("0") or "0"
    if not (text.isascii() and text.isdigit() and len(significant) <= len(str(INT64_MAX))):
        return None
    number = int(significant)
    return number if number <= INT64_MAX else None


def malformed(method: str, path: str) -> InvalidArgument:
    """The 400 for ``METHOD /v1/models/PATH`` that no route takes, saying what is wrong."""
    match = _TARGET.fullmatch(path)
    if match is None:
        return InvalidArgument(f"Malformed request: {method} /v1/models/{echo(path)}")
    version = match["version"]
    if version is not None and parse_version(version) is None:
        return InvalidArgument(
            f"Malformed request: {method} /v1/models/{echo(path)}: the version must be a "
            f"decimal number (digits 0-9) that fits in 64 bits, not {echo(version)!r}"
        )
    if method == "POST":
        return InvalidArgument(
            f"Malformed request: POST /v1/models/{path}; this server supports :predict, "
            ":classify, :regress and :classify_image"
        )
    return InvalidArgument(f"Malformed request: {method} /v1/models/{path}")


def echo(text: str) -> str:
    return text if len(text) <= ECHO_CHARS else text[:ECHO_CHARS] + "…"
