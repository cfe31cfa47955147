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

Measured with ``scripts/memory_cycles.py`` (TF 2.21 CPU, 2 cores, RSS ~586 MiB with TensorFlow
imported): 20 hot reloads (load N+1, unload N) of a model holding 48 MiB of weights
(``--make wide --overlap``):

=============================================  =========================  ================
unload recipe after ``close()``                RSS after reload 2 -> 20   release step
=============================================  =========================  ================
freeze after the first load, ``gc.collect()``  698 -> 731 MiB; version 1  1-9 ms
                                               is never freed
the same, ``release_memory()`` (unfreeze)      648 -> 649 MiB             ~180-320 ms
freeze before the first load (the server),     648 -> 649 MiB             ~7 ms
``release_memory(unfreeze=False)``
=============================================  =========================  ================

Without ``malloc_trim`` (no freeze, plain load/unload cycles of the same model) RSS after
unloading went 602 -> 651 MiB over 20 cycles; with it, 599 -> 600 MiB.

The cost is the full collection: with TensorFlow imported, traversing ~370k objects takes
~180 ms on an idle machine, up to ~370 ms with both cores busy (``malloc_trim`` ~2 ms). It
holds the GIL throughout, so running it on a pool thread stalls the reactor nearly as long
(measured: 145-173 ms of a 170-190 ms collection). Objects frozen before the first load are
TensorFlow's own, never a model's, so then ``unfreeze=False`` suffices.

TensorFlow's eager context needs nothing: each loaded function's ``AtomicFunction.__del__``
removes its definition from the context once collected, and the few shared ``__wrapped__*``
op functions are made once per process. Removing definitions by hand
(``context.remove_function``) is wrong: the objects still alive then fail to remove them.
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
    """Collect what closed servables left and give freed heap back to the OS (blocks ~200 ms).

    Call after ``Servable.close()`` (the servable object may live on; its TensorFlow objects
    are what this frees).
    ``unfreeze``: the version may have been alive at a ``gc.freeze()`` (``ModelRepository``
    freezes once its first versions are loaded), so thaw everything, collect, and freeze
    what survives again. Pass False only if nothing a model made was ever frozen: the
    collection then skips the frozen objects and takes ~5 ms.
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
