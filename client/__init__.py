"""The kleinserve client: find healthy servers in Consul, spread calls over them, retry safely.

- ``InferenceClient``: blocking, for scripts and notebooks (runs the async core on a
  reactor thread with crochet).
- ``AsyncInferenceClient``: the core, for Twisted code; every call returns a Deferred.
- ``protocol=``: how ``predict`` travels. ``"auto"`` (the default): the Open Inference
  Protocol with binary tensors (``client.v2_api``) to servers tagged ``api:v2`` in Consul,
  TF Serving's REST JSON (``client.codec``) to the others; or ``"rest"``, ``"v2"``,
  ``"grpc"`` (``client.grpc_api``) for every server.
- ``client.errors``: ``InferenceError`` and its kinds.
- ``inference-client``: the command line (``client.cli``).

Never imports TensorFlow.
"""

from client.async_client import AsyncInferenceClient, BackendInfo
from client.balancer import EjectionPolicy, Strategy
from client.blocking import InferenceClient
from client.budget import RetryBudget
from client.codec import Classification
from client.dispatch import Attempt
from client.errors import (
    CertificateError,
    DeadlineExceeded,
    InferenceError,
    InvalidRequest,
    NoBackendAvailable,
    ServerError,
    Unauthenticated,
)

__all__ = [
    "AsyncInferenceClient",
    "Attempt",
    "BackendInfo",
    "CertificateError",
    "Classification",
    "DeadlineExceeded",
    "EjectionPolicy",
    "InferenceClient",
    "InferenceError",
    "InvalidRequest",
    "NoBackendAvailable",
    "RetryBudget",
    "ServerError",
    "Strategy",
    "Unauthenticated",
]
