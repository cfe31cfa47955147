"""The model repository: which models and versions this server holds, and in what state.

- ``repository``: ``ModelRepository``, the Service: the configured models, their scans,
  carrying out the reconcile plan, readiness, start and stop.
- ``routing``: ``Routes``, the lookup of a version by number, label or latest, the errors
  that say why there is none, and TF Serving's version status.
- ``store``: ``ModelStore``, what the scans found and the model store's faults (logged once).
- ``loader``: ``Loader``, a version's load and warm-up on its threads (``PoolThreads``), the
  retry of a failed load with backoff, its unload, and giving its memory back.
- ``reconcile``: the reconcile policy as a pure function, ``plan(config, folders, held,
  served_labels)`` -> ``Load`` / ``Unload`` / ``CancelRetry`` / ``Forget`` actions.
- ``versions``: ``LoadedVersion``, a served version (``State``, ``lease``, ``predict``, its
  status entry), and ``batch_rows``.

Everything the rest of the server uses is importable from here.
"""

from service.model_config import ModelConfig
from service.repository.loader import PoolThreads
from service.repository.repository import ModelRepository
from service.repository.versions import (
    AVAILABLE,
    END,
    LOADING,
    UNLOADING,
    LoadedVersion,
    State,
    Threads,
    batch_rows,
    version_status,
)

__all__ = [
    "AVAILABLE",
    "END",
    "LOADING",
    "UNLOADING",
    "LoadedVersion",
    "ModelConfig",
    "ModelRepository",
    "PoolThreads",
    "State",
    "Threads",
    "batch_rows",
    "version_status",
]
