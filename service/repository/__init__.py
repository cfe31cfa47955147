"""The model repository: which models and versions this server holds, and in what state.

- ``repository``: ``ModelRepository``, the Service: the configured models, their scans,
  carrying out the reconcile plan, readiness, start and stop.
- ``reconcile``: the reconcile policy as a pure function, ``plan(config, folders, held,
  served_labels)`` -> ``Load`` / ``Unload`` / ``CancelRetry`` / ``Forget`` actions.
- ``versions``: ``LoadedVersion``, a served version (``State``, ``lease``, ``predict``, its
  status entry), and ``batch_rows``.

Everything the rest of the server uses is importable from here.
"""

from service.model_config import ModelConfig
from service.repository.repository import ModelRepository, PoolThreads
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
