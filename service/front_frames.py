"""What the main process and a front process (``--http_processes``) say to each other.

One frame per message over the unix socket between them (``Int32StringReceiver``'s 4-byte
length prefix): a 4-byte header length, the header as JSON (orjson), then a tail of raw
bytes. Tensors travel as specs in the header, ``[name, dtype, shape, place]``, where
``place`` says where the bytes are:

* ``["shm", offset]``: in the sender's shared-memory ring (``service.shm_ring``), at
  ``offset``; the main process wraps inputs with ``np.ndarray(buffer=…)``, no copy; the front
  process copies outputs out and gives their regions back;
* ``["tail", start]``: in this frame's tail (tensors that do not fit the ring);
* ``["obj", start, [len, …]]``: an object array of byte strings (DT_STRING), one after the
  other in the tail.

The operations (``op``) and their fields are written out in ``docs/scaling.md``. Errors
cross as ``[class name, status, message, retry_after]`` and come back as the same
``service.errors`` class.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from typing import Any, Protocol

import numpy as np
import orjson

from service import errors
from service.errors import ServingError

_LENGTH = struct.Struct("!I")
Header = dict[str, Any]


def pack(header: Header, tail: list[bytes] | None = None) -> bytes:
    """One frame: the header's length, the header, the tail."""
    encoded = orjson.dumps(header, option=orjson.OPT_SERIALIZE_NUMPY)
    return b"".join([_LENGTH.pack(len(encoded)), encoded, *(tail or ())])


def unpack(frame: bytes) -> tuple[Header, memoryview]:
    """A frame's header and its tail (a view of ``frame``)."""
    (length,) = _LENGTH.unpack_from(frame)
    view = memoryview(frame)
    header = orjson.loads(view[_LENGTH.size : _LENGTH.size + length])
    if not isinstance(header, dict):
        raise ValueError("a frame's header must be a JSON object")
    return header, view[_LENGTH.size + length :]


class Ring(Protocol):
    """Where a sender may put tensor bytes: ``allocate`` a region of ``buffer`` (None when
    full), filled by the sender and freed once the receiver has answered."""

    buffer: memoryview

    def allocate(self, size: int) -> int | None: ...


def put_tensors(
    tensors: Mapping[str, np.ndarray], ring: Ring | None = None
) -> tuple[list[Any], list[bytes], list[int]]:
    """Tensors as specs, the tail parts they need and the ring regions (offsets) they took.

    A numeric tensor goes into ``ring`` when it has room (one copy), else into the tail.
    """
    specs: list[Any] = []
    tail: list[bytes] = []
    regions: list[int] = []
    at = 0
    for name, value in tensors.items():
        array = np.asarray(value)
        shape = list(array.shape)
        if array.dtype == object:
            items = [_as_bytes(v) for v in array.reshape(-1)]
            specs.append([name, "O", shape, ["obj", at, [len(b) for b in items]]])
            tail.extend(items)
            at += sum(len(b) for b in items)
            continue
        offset = ring.allocate(array.nbytes) if ring is not None and array.nbytes else None
        if offset is not None:
            assert ring is not None
            target = np.ndarray(array.shape, array.dtype, buffer=ring.buffer, offset=offset)
            target[...] = array
            regions.append(offset)
            specs.append([name, array.dtype.str, shape, ["shm", offset]])
        else:
            data = np.ascontiguousarray(array).tobytes()
            specs.append([name, array.dtype.str, shape, ["tail", at]])
            tail.append(data)
            at += len(data)
    return specs, tail, regions


def take_tensors(
    specs: list[Any], tail: memoryview, shared: memoryview | None = None, *, copy: bool = False
) -> dict[str, np.ndarray]:
    """The tensors of ``specs``: views of ``shared`` (the sender's ring; copies of it with
    ``copy``, so the region can be given back at once) or of ``tail``."""
    tensors: dict[str, np.ndarray] = {}
    for name, dtype_str, shape, place in specs:
        if place[0] == "obj":
            start, lengths = place[1], place[2]
            items = np.empty(len(lengths), dtype=object)
            for i, length in enumerate(lengths):
                items[i] = bytes(tail[start : start + length])
                start += length
            tensors[name] = items.reshape(shape)
            continue
        dtype = np.dtype(dtype_str)
        if place[0] == "shm":
            if shared is None:
                raise ValueError("a tensor in shared memory, but no ring is attached")
            view = np.ndarray(shape, dtype, buffer=shared, offset=place[1])
            tensors[name] = view.copy() if copy else view
        else:
            count = int(np.prod(shape, dtype=np.int64))
            tensors[name] = np.frombuffer(tail, dtype, count, place[1]).reshape(shape)
    return tensors


def shared_regions(specs: list[Any]) -> list[int]:
    """The ring offsets the tensors of ``specs`` are at."""
    return [place[1] for _, _, _, place in specs if place[0] == "shm"]


def _as_bytes(value: Any) -> bytes:
    return value.encode() if isinstance(value, str) else bytes(value)


def error_spec(error: ServingError) -> list[Any]:
    return [type(error).__name__, error.status, error.message, error.retry_after]


def error_of(spec: list[Any]) -> ServingError:
    """The ``ServingError`` an error spec names (its own class where ``service.errors`` has
    one, else a ``ServingError`` with the spec's status)."""
    name, status, message, retry_after = spec
    kind = getattr(errors, str(name), None)
    if isinstance(kind, type) and issubclass(kind, ServingError):
        error = kind(message, retry_after=retry_after)
    else:
        error = ServingError(message, retry_after=retry_after)
    error.status = int(status)
    return error
