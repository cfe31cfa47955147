"""Giving an unloaded model version's memory back: the process-wide half of unloading.

``Servable.close()`` drops a version's TensorFlow objects, but they are a web of reference
cycles (restored objects, FuncGraphs, Graph ops), so only the cyclic garbage collector frees
them, and two process-wide things stand in the way:

- ``gc.freeze()``: freezing TensorFlow's ~370k long-lived objects makes later collections
  skip them. A frozen object is never collected, so a version alive at the freeze would never
  be freed (its variables stay in RSS, its functions in TensorFlow's eager context). So
  ``ModelRepository`` freezes on start, *before* any model loads
  (``freeze_startup_objects``), and unloads with ``release_memory(unfreeze=False)``: ~7 ms.
- glibc's malloc keeps freed memory in its arenas for reuse rather than returning it, so RSS
  stays at the high-water mark of the last load. ``malloc_trim(0)`` hands it back.

TensorFlow's eager context needs nothing: each loaded function removes its definition from
the context once collected (removing them by hand fails for the objects still alive).

The measurements behind this recipe (RSS over hot reloads, the cost of the collection, why
``unfreeze=False`` suffices) are in ``docs/memory.md``.
"""

from __future__ import annotations

import ctypes
import gc
from collections.abc import Callable
from functools import cache


def freeze_startup_objects() -> None:
    """Freeze what is alive now (TensorFlow's own ~370k objects), before any model loads.

    Later collections (parsing large request bodies triggers them) skip the frozen objects,
    and since no model was alive yet, unloading needs only ``release_memory(unfreeze=False)``.
    """
    gc.collect()
    gc.freeze()


def release_memory(*, unfreeze: bool = True) -> None:
    """Collect what closed servables left and give freed heap back to the OS (blocks the GIL).

    Call after ``Servable.close()`` (the servable object may live on; its TensorFlow objects
    are what this frees).
    ``unfreeze``: the version may have been alive at a ``gc.freeze()`` made after it loaded,
    so thaw everything, collect, and freeze what survives again (~200 ms). Pass False when
    nothing a model made was ever frozen, as in the server (``ModelRepository`` freezes on
    start, before any model loads): the collection then skips the frozen objects (~7 ms).
    """
    if unfreeze and gc.get_freeze_count():
        gc.unfreeze()
        gc.collect()
        gc.freeze()
    else:
        gc.collect()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or None on another C library (musl, macOS)."""
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def release_after_requests() -> None:
    """Give back what large request bodies left: ``release_memory(unfreeze=False)``.

    Request bodies, their parses and arrays are never frozen (the server freezes only at
    start, before any model loads), so the collection skips the frozen objects (~10 ms).
    """
    release_memory(unfreeze=False)
