"""A one-line progress bar for the command line, redrawn in place on a terminal.

Written by hand rather than with a library so that ``pip install kleinserve`` stays small;
it draws at most ``max_rate`` times a second, and only when enabled (the CLI enables it
when stderr is a terminal, so logs and pipes never get carriage returns).
"""

from __future__ import annotations

from typing import TextIO

from twisted.internet.interfaces import IReactorTime

from discovery.backoff import now

__all__ = ["Progress", "render"]


def render(done: int, total: int, failed: int, rate: float, width: int = 24) -> str:
    """``  37/120 [#######.................]  31%  2 failed  12.3/s``."""
    fraction = done / total if total else 1.0
    filled = int(round(fraction * width))
    bar = "#" * filled + "." * (width - filled)
    failures = f"  {failed} failed" if failed else ""
    digits = len(str(total))
    return f"{done:>{digits}}/{total} [{bar}] {fraction:4.0%}{failures}  {rate:.1f}/s"


class Progress:
    """Counts finished items and redraws the bar on ``stream`` while ``enabled``."""

    def __init__(
        self,
        total: int,
        stream: TextIO,
        clock: IReactorTime,
        *,
        enabled: bool,
        max_rate: float = 10.0,
    ) -> None:
        self.total = total
        self.done = 0
        self.failed = 0
        self._stream = stream
        self._clock = clock
        self._enabled = enabled
        self._interval = 1.0 / max_rate
        self._started = now(clock)
        self._drawn_at: float | None = None
        self._width = 0

    def elapsed(self) -> float:
        return now(self._clock) - self._started

    def advance(self, *, failed: bool = False) -> None:
        self.done += 1
        self.failed += failed
        at = now(self._clock)
        if (
            self._drawn_at is None
            or at - self._drawn_at >= self._interval
            or self.done == self.total
        ):
            self._draw(at)

    def _draw(self, at: float) -> None:
        if not self._enabled:
            return
        self._drawn_at = at
        elapsed = at - self._started
        line = render(self.done, self.total, self.failed, self.done / elapsed if elapsed else 0.0)
        padding = " " * max(0, self._width - len(line))
        self._width = len(line)
        self._stream.write("\r" + line + padding)
        self._stream.flush()

    def finish(self) -> None:
        """End the line, so what follows starts on a fresh one."""
        if self._enabled and self._drawn_at is not None:
            self._stream.write("\n")
            self._stream.flush()
