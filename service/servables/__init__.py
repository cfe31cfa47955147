"""Loaded model versions ("servables"): one protocol, and one module per kind of model folder.

- ``base``: ``Servable``, what the repository, batching, HTTP and image paths use of a
  loaded version, and ``ServableBase``, the plain-data half both kinds share. No TensorFlow.
- ``saved_model``: TF2 SavedModels (``saved_model.pb``).
- ``frozen_graph``: TF1 frozen graphs (``output_graph.pb`` or ``frozen_graph.pb``) in a Session.
- ``registry``: the kinds in the order a version folder is matched against them,
  ``load_servable`` (which kind a folder holds, then that kind's loader) and
  ``folder_complete`` (whether a folder holds all a loader will read).

Imports here stay TensorFlow-free: ``from service.servables import Servable`` is cheap; the
kind modules and the registry import TensorFlow.
"""

import os

# Before any of the kind modules imports TensorFlow: keep its start-up chatter out of logs.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from service.servables.base import Servable, ServableBase  # noqa: E402

__all__ = ["Servable", "ServableBase"]
