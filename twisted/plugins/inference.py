"""twistd plugin: ``twistd -n inference …``. Kept tiny so ``twistd --help`` never imports TensorFlow."""

from twisted.application.service import ServiceMaker

kleinserve = ServiceMaker(
    "kleinserve",
    "service.tap",
    "Serve TensorFlow models over TF Serving's REST API, with batching and Consul discovery",
    "inference",
)
