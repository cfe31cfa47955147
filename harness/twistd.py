"""Real ``twistd -n inference`` servers for integration tests and the demo: start, wait ready,
talk, stop."""

from __future__ import annotations

import json
import os
import re
import signal
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from harness.ports import LOOPBACK, free_port

REPO = Path(__file__).resolve().parent.parent
TWISTD = Path(sys.executable).parent / "twistd"


T = TypeVar("T")


def poll(
    read: Callable[[], T], until: Callable[[T], bool], timeout: float, interval: float = 0.1
) -> T:
    """Read every ``interval`` seconds until ``until(value)`` holds or ``timeout`` passes;
    return the last value read.

    Tests then assert on that value: a state that never came fails with what was seen last.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = read()
        if until(value) or time.monotonic() > deadline:
            return value
        time.sleep(interval)


ERROR_MARKERS = (
    "Traceback (most recent call last)",
    "Unhandled error in Deferred",
    "Unhandled Error",
)


def unexpected_errors(log: str, expected: list[str]) -> list[str]:
    """The tracebacks and unhandled errors in a twistd log that match none of ``expected``.

    Each is reported with the log line before it (what was being done) and the lines after
    it up to the next log entry, which is what ``expected`` regular expressions match.
    """
    lines = log.splitlines()
    found: list[str] = []
    for i, line in enumerate(lines):
        if not any(marker in line for marker in ERROR_MARKERS):
            continue
        end = i + 1
        while end < len(lines) and not re.match(r"^\d{4}-\d\d-\d\dT", lines[end]):
            end += 1
        block = "\n".join(lines[max(0, i - 1) : end])
        if not any(re.search(pattern, block) for pattern in expected):
            found.append(block)
    return found


class TwistdServer:
    """One ``twistd -n inference`` subprocess on a free loopback port, logging to a file.

    ``stop()`` fails the test if the log holds a traceback or unhandled error that no
    pattern of ``expected_errors`` (regular expressions) matches: a server that answered
    every request right can still have logged a bug.
    """

    def __init__(
        self,
        args: list[str],
        log_dir: Path,
        port: int | None = None,
        expected_errors: list[str] | None = None,
        ca_file: Path | None = None,
    ) -> None:
        self.port = port or free_port()
        self.args = args
        # A server listening with TLS (an ssl: --listen the test gives, on ``port``) is talked
        # to over https, trusting the CA certificate in ``ca_file``.
        self.ca_file = ca_file
        self._tls = ssl.create_default_context(cafile=ca_file) if ca_file else None
        # gRPC on a free loopback port too (its default, 8500, would be shared by every server).
        self.grpc_port: int | None = None
        if not any(a.startswith(("--port", "--grpc_listen")) for a in args):
            self.grpc_port = free_port()
            self.args = [*args, f"--grpc_listen={LOOPBACK}:{self.grpc_port}"]
        self.log_path = log_dir / f"twistd-{self.port}.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.expected_errors = list(expected_errors or [])

    @property
    def url(self) -> str:
        return f"{'https' if self._tls else 'http'}://{LOOPBACK}:{self.port}"

    @property
    def grpc_target(self) -> str:
        """``host:port`` of its gRPC API, for ``grpc.insecure_channel``."""
        assert self.grpc_port is not None, "this server was started without gRPC"
        return f"{LOOPBACK}:{self.grpc_port}"

    def start(self) -> TwistdServer:
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONUNBUFFERED": "1"}
        # On loopback, unless the test says where (--rest_api_port=PORT is all interfaces).
        listen = (
            []
            if any(a.startswith(("--listen", "--rest_api_port")) for a in self.args)
            else [f"--listen=tcp:{self.port}:interface={LOOPBACK}"]
        )
        tail = ["inference", *listen, *self.args]
        if "--log_format=json" in self.args:  # the log is standard output: kept in the file
            command = [str(TWISTD), "-n", "--pidfile=", *tail]
            with self.log_path.open("wb") as out, self.stderr_path.open("wb") as err:
                self.process = subprocess.Popen(command, cwd=REPO, env=env, stdout=out, stderr=err)
            return self
        command = [str(TWISTD), "-n", "--pidfile=", f"--logfile={self.log_path}", *tail]
        self.process = subprocess.Popen(
            command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT
        )
        return self

    @property
    def stderr_path(self) -> Path:
        """Where standard error goes when the log is standard output (``--log_format=json``)."""
        return self.log_path.with_suffix(".stderr")

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def wait_ready(self, timeout: float = 120.0) -> TwistdServer:
        """Poll /readyz until 200; fail with the server's log if it exits or never gets there."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise AssertionError(f"twistd exited with {self.process.returncode}:\n{self.log()}")
            try:
                if self.get("/readyz")[0] == 200:
                    return self
            except OSError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"server not ready after {timeout}s:\n{self.log()}")

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, dict[str, str], bytes]:
        req = urllib.request.Request(
            self.url + path, data=body, method=method, headers=headers or {}
        )
        try:
            with urllib.request.urlopen(req, timeout=60, context=self._tls) as response:
                return response.status, dict(response.headers), response.read()
        except urllib.error.HTTPError as e:
            return e.code, dict(e.headers), e.read()

    def get(self, path: str) -> tuple[int, Any]:
        status, _, body = self.request("GET", path)
        return status, _json_or_text(body)

    def post_json(self, path: str, doc: Any) -> tuple[int, Any]:
        status, _, body = self.request(
            "POST", path, json.dumps(doc).encode(), {"content-type": "application/json"}
        )
        return status, _json_or_text(body)

    def wait_for(self, condition: Callable[[], bool], timeout: float = 60.0) -> None:
        """Poll ``condition`` until true; fail with the server's log if it never is."""
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                raise AssertionError(f"condition never held within {timeout}s:\n{self.log()}")
            time.sleep(0.1)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        """Stop the server (if it runs) and check its log; the exit status."""
        if self.process is None:
            return 0
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.check_log()
        return self.process.returncode

    def check_log(self) -> None:
        errors = unexpected_errors(self.log(), self.expected_errors)
        if errors:
            self.expected_errors.append(".")  # report once, even if stop() is called again
            raise AssertionError(
                f"the server logged {len(errors)} unexpected error(s):\n\n" + "\n\n".join(errors)
            )


def _json_or_text(body: bytes) -> Any:
    try:
        return json.loads(body)
    except ValueError:
        return body.decode(errors="replace")
