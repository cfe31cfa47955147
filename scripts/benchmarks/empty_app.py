"""An empty Klein route: what Twisted + Klein alone can answer on this machine.

    python -m scripts.benchmarks.empty_app PORT

``POST /v1/models/<anything>`` reads the body and answers ``{}``; ``GET /readyz`` answers
200. It listens on 127.0.0.1 only. The bench sends it the same request bodies, through the
same load generator, as the model servers: the ratio of a server's requests/s to this one's
is the share of the HTTP stack's ceiling the server reaches.

Like kleinserve's own ``InferenceSite`` it keeps bodies in memory (Twisted's default request
would write bodies over 100 kB to a temporary file), does not parse POST bodies as forms
(``parsePOSTFormSubmission=False``) and writes no access log line per request, so the two
differ only by what the inference route does. Keep them alike when InferenceSite changes.
"""

from __future__ import annotations

import io
import sys
from typing import Any

from klein import Klein
from twisted.internet import endpoints
from twisted.web import server


class EmptyAPI:
    app = Klein()

    @app.route("/v1/models/<path:path>", methods=["POST"])
    def predict(self, request: Any, path: str) -> bytes:
        request.content.read()
        request.setHeader(b"content-type", b"application/json")
        return b"{}"

    @app.route("/readyz", methods=["GET"])
    def readyz(self, request: Any) -> bytes:
        request.setHeader(b"content-type", b"application/json")
        return b'{"status": "ready"}'


class InMemoryRequest(server.Request):
    def gotLength(self, length: int | None) -> None:
        self.content = io.BytesIO()  # type: ignore[assignment]


class QuietSite(server.Site):
    displayTracebacks = False
    noisy = False
    requestFactory = InMemoryRequest

    def log(self, request: Any) -> None:
        pass


def main(argv: list[str]) -> int:
    if len(argv) != 1 or not argv[0].isdigit():
        print("usage: python -m scripts.benchmarks.empty_app PORT", file=sys.stderr)
        return 2
    from twisted.internet import reactor as _reactor

    reactor: Any = _reactor
    site = QuietSite(EmptyAPI().app.resource(), parsePOSTFormSubmission=False)
    endpoint = endpoints.serverFromString(reactor, f"tcp:{argv[0]}:interface=127.0.0.1")
    endpoint.listen(site)
    reactor.run()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
