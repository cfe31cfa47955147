"""Any server command as a process group on a free loopback port: start, wait ready, stop.

Every process the benchmarks start is a ``Proc``: started in a session of its own (so a
server and its workers, gunicorn's say, are one process group), logged to a file, and
stopped by group id with SIGTERM, then SIGKILL. ``stop_all`` stops whatever is still
running; call it on every way out (normal end, error, Ctrl-C, SIGTERM).

This is not ``harness.twistd.TwistdServer``: a ``Proc`` runs any command (the empty Klein
app, gunicorn as well as twistd), owns the whole process tree and raises ``ServerError``
rather than failing a test on what its server logged.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from harness.ports import LOOPBACK
from harness.twistd import REPO


class ServerError(RuntimeError):
    """A server that exited or never got ready; the message ends with its log's tail."""


def http_get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    """GET ``url``: (status, body); (0, b"") when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except OSError:
        return 0, b""


_LIVE: list[Proc] = []


@dataclass(eq=False)
class Proc:
    """One started server: its command, port, log file and process group."""

    name: str
    command: list[str]
    port: int
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self) -> Proc:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONUNBUFFERED": "1", **self.env}
        for name in ("CONSUL_HTTP_ADDR", "CONSUL_HTTP_TOKEN"):  # a started server joins no Consul
            env.pop(name, None)
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                self.command,
                cwd=REPO,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: stopped as one, spared our Ctrl-C
            )
        _LIVE.append(self)
        return self

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def wait_ready(
        self,
        path: str = "/readyz",
        timeout: float = 180.0,
        ready: Callable[[bytes], bool] = lambda body: True,
    ) -> float:
        """Poll ``GET path`` until 200 (and ``ready(body)``); return the seconds it took."""
        started = time.monotonic()
        deadline = started + timeout
        while time.monotonic() < deadline:
            if not self.running():
                code = self.process.returncode if self.process else None
                raise ServerError(f"{self.name} exited with {code}:\n{self.log_tail()}")
            status, body = http_get(self.url + path, timeout=2.0)
            if status == 200 and ready(body):
                return time.monotonic() - started
            time.sleep(0.1)
        raise ServerError(f"{self.name} not ready after {timeout:.0f} s:\n{self.log_tail()}")

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM the process group, then SIGKILL it if it has not exited in ``timeout``."""
        if self in _LIVE:
            _LIVE.remove(self)
        if self.process is None or self.process.poll() is not None:
            return
        for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 10.0)):
            try:
                os.killpg(self.process.pid, sig)
            except ProcessLookupError:
                return
            try:
                self.process.wait(wait)
                break
            except subprocess.TimeoutExpired:
                continue
        # Workers left in the group after the leader exited (gunicorn's, if the master died first).
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def stop_all() -> None:
    """Stop every ``Proc`` still running."""
    for proc in list(_LIVE):
        proc.stop()


def start(name: str, command: Sequence[str], port: int, logs: Path, **env: str) -> Proc:
    """Start ``command`` (listening on ``port``) as ``name``, logging to ``logs/NAME-PORT.log``."""
    return Proc(name, list(command), port, logs / f"{name}-{port}.log", dict(env)).start()
