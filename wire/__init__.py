"""The wire contract between kleinserve's server and its client: one definition of each.

Both ``service`` and ``client`` import this package; it imports nothing but the standard
library (and numpy in ``wire.v2_tensors``, as both sides do), so either side can depend on it
without pulling in the other (or TensorFlow).

- ``wire.dtypes``: TensorFlow's ``DT_*`` names, as metadata writes them, and the numpy dtype
  each is held in.
- ``wire.paths``: the model-name rule and the ``/v1/models/NAME[/versions/N|/labels/L]:verb``
  grammar, with version numbers limited to int64; the ``/v2/models/NAME[/versions/N]`` paths.
- ``wire.v2_tensors``: the Open Inference Protocol's binary tensor data (Triton's binary
  extension), written and read the same way by both sides.
- ``wire.http``: header names, request ids (which a server takes from a client, a fresh
  one), and the ``{"error": "…", "request_id": "…"}`` shape of every error body.
- ``wire.auth``: bearer tokens: the ``Authorization`` header, the token rule and the token
  file's format (one per line, ``#`` comments).
- ``wire.consul_tags``: the tags and meta a server registers in Consul and a client selects by.
- ``wire.backoff``: capped, jittered exponential backoff, the pacing of every retry (Consul
  registration and watches, the client's requests, the repository's failed loads).
"""
