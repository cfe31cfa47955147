"""Reloading the model config file while serving: on a timer, and at once on SIGHUP.

``ConfigReloader`` reads the file with ``read`` (parse + validate, raising on a bad
file) and hands the result to ``apply`` (``ModelRepository.apply``). A file that
does not parse changes nothing: the error is logged loudly and the models keep
serving as configured before. SIGHUP also asks for an immediate scan of the model
folders (``rescan``), so ``kill -HUP`` is "look again now" whatever the poll waits;
without a config file (``path`` None, one model from --model_base_path) that is all
it does -- a SIGHUP never kills the server. Whatever else a SIGHUP re-reads (the bearer
tokens of --auth_token_file, ``service.auth``) is run first, from ``on_sighup``.
"""

from __future__ import annotations

import signal
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from twisted.application.service import Service
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

log = Logger()


class ConfigReloader(Service):
    def __init__(
        self,
        path: Path | None,
        read: Callable[[Path], Sequence[Any]],
        apply: Callable[[Sequence[Any]], object],
        *,
        reactor: Any,
        poll_wait: float = 0.0,
        rescan: Callable[[], object] = lambda: None,
        handle_sighup: bool = True,
        on_sighup: Sequence[Callable[[], object]] = (),
    ) -> None:
        self.path = path
        self._read = read
        self._apply = apply
        self._reactor = reactor
        self._poll_wait = poll_wait
        self._rescan = rescan
        self._handle_sighup = handle_sighup
        self._on_sighup = tuple(on_sighup)
        self._applied: Sequence[Any] | None = None
        self._poller: LoopingCall | None = None
        self._previous_handler: Any = None

    def startService(self) -> None:
        super().startService()
        if self._poll_wait > 0 and self.path is not None:
            self._poller = LoopingCall(self.reload, reason="poll")
            self._poller.clock = self._reactor
            self._poller.start(self._poll_wait, now=False)  # the start-up config is already applied
        if self._handle_sighup:
            self._previous_handler = signal.signal(signal.SIGHUP, self._sighup)

    def stopService(self) -> None:
        super().stopService()
        if self._poller is not None and self._poller.running:
            self._poller.stop()
        if self._handle_sighup:
            signal.signal(signal.SIGHUP, self._previous_handler or signal.SIG_DFL)

    def started_with(self, models: Sequence[Any]) -> None:
        """Record the config the server started with, so an unchanged file is not re-applied."""
        self._applied = list(models)

    def _sighup(self, signum: int, frame: object) -> None:
        # A signal handler may run between any two bytecodes: hand over to the reactor.
        self._reactor.callFromThread(self.hangup)

    def hangup(self) -> None:
        """What a SIGHUP does, on the reactor: ``on_sighup``'s re-reads, then ``reload``."""
        for reread in self._on_sighup:
            try:
                reread()
            except Exception:  # a signal's handler boundary: one failed re-read stops no other
                log.failure("a re-read on SIGHUP failed")
        self.reload(reason="SIGHUP")

    def reload(self, reason: str = "request") -> bool:
        """Read the file and apply it if it changed; False (and a loud log) if it is bad."""
        if self.path is None:
            log.info("{reason}: rescanning the model folders", reason=reason)
            self._rescan()
            return True
        try:
            models = list(self._read(self.path))
        except Exception as e:  # a bad file must never stop the server: it keeps its models
            if not isinstance(e, (ValueError, OSError)):  # not a config error: a bug, trace it
                log.failure("reading the model config failed")
            log.critical(
                "model config {path} not reloaded ({reason}): {error}; still serving the "
                "previous config",
                path=self.path,
                reason=reason,
                error=e,
            )
            return False
        if reason == "SIGHUP" and models == self._applied:
            log.info(
                "SIGHUP: model config {path} unchanged; rescanning the model folders",
                path=self.path,
            )
        if models != self._applied:
            log.info(
                "model config {path} reloaded ({reason}): {names}",
                path=self.path,
                reason=reason,
                names=", ".join(m.name for m in models) or "no models",
            )
            self._applied = models
            self._apply(models)
        if reason == "SIGHUP":
            self._rescan()
        return True
