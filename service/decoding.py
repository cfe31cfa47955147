"""Decoding large request bodies off the reactor thread, and giving their memory back after.

``BodyDecoder`` owns a small thread pool (started and stopped with the server). A JSON body
of ``OFF_REACTOR_BYTES`` or more is decoded there, so the reactor keeps answering other
requests (``/healthz`` among them) while, say, a 60 MB ``:predict`` body is parsed; a smaller
one is decoded on the reactor, where it is cheaper than the hand-off.

Measured (2 cores, ``service.codec.decode_body`` of a row-format digits body): decoding takes
~10 ms per MB (0.1 MB 1 ms, 1 MB 10 ms, 4 MB 50 ms, 60 MB 1.1 s); the hand-off to the pool and
back costs ~60 us. At 256 KiB the hand-off is ~2% of the ~2.5 ms decode it moves, and no
decode left on the reactor stalls it for more than ~2.5 ms; the typical small predict (a few
KB, ~0.1 ms) would pay more for the hand-off than it takes.

The pool still shares the GIL: a single long C call over the whole body (a ``translate``,
numpy converting the parsed numbers) holds it, so the reactor can wait for the longest such
call, not for the whole decode; the fast path parses numbers in ~1 MiB pieces for this. For the same
reason the pool has one thread: a second would add little throughput, but glibc gives each
thread its own malloc arena, and ``malloc_trim`` does not shrink the top of a thread's arena,
so each decode thread keeps up to ~35 MB after a 60 MB body (measured; the main thread's
arena is trimmed). ``mallopt(M_TRIM_THRESHOLD, 1 MiB)`` would return that too, but it also
fixes glibc's mmap threshold for the whole process, TensorFlow's tensors included.

``MemoryReturn`` gives freed memory back to the OS after large requests: the body, its parse
and its arrays are freed when the request ends, but glibc keeps freed heap (and the decode
threads' own arenas) for reuse, so RSS would stay at the high-water mark of the largest
bodies seen. ``service.memory.release_memory`` (a collection of what is not frozen, ~10 ms,
then ``malloc_trim(0)``) runs on the pool at most once per ``interval`` seconds, and only
after large requests.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from service import memory

log = Logger()

T = TypeVar("T")

#: Bodies this large or larger are decoded on the pool (see the figures above).
OFF_REACTOR_BYTES = 256 * 1024
#: Memory is given back at most this often (seconds), and only after large requests.
MEMORY_RETURN_INTERVAL = 2.0


class BodyDecoder(Service):
    """Decodes request bodies: large ones on its own threads, small ones where it is called.

    ``executor(f, *args)`` runs ``f(*args)`` on a pool thread and fires on the reactor; tests
    pass ``maybeDeferred`` to decode synchronously. ``memory`` gives memory back after large
    requests, on the pool (``large_request_done``).
    """

    def __init__(
        self,
        *,
        reactor: Any,
        threads: int = 1,
        off_reactor_bytes: int = OFF_REACTOR_BYTES,
        executor: Callable[..., Deferred] | None = None,
        release_memory: Callable[[], object] = memory.release_after_requests,
        memory_return_interval: float = MEMORY_RETURN_INTERVAL,
    ) -> None:
        self.off_reactor_bytes = off_reactor_bytes
        self.pool = ThreadPool(threads, threads, "body-decode")
        self._executor = executor or (
            lambda f, *args: deferToThreadPool(reactor, self.pool, f, *args)
        )
        self.memory = MemoryReturn(
            clock=reactor,
            run=self._executor,
            release=release_memory,
            interval=memory_return_interval,
        )

    def startService(self) -> None:
        super().startService()
        self.pool.start()

    def stopService(self) -> None:
        super().stopService()
        self.memory.stop()
        self.pool.stop()  # the HTTP port stopped first: no request is left waiting on it

    async def decode(self, body: bytes, decode: Callable[[bytes], T]) -> T:
        """``decode(body)``: on the pool for a large body, here for a small one."""
        if len(body) < self.off_reactor_bytes:
            return decode(body)
        result: T = await self._executor(decode, body)
        return result

    def large_request_done(self, _: object = None) -> None:
        """A request with a large body was answered or abandoned: give memory back soon."""
        self.memory.large_request_done()


class MemoryReturn:
    """Runs ``release`` (on ``run``) after large requests, at most once per ``interval`` seconds.

    ``large_request_done`` is called when a large request has been answered (or its client
    left); the release runs then, or once ``interval`` has passed since the last one, so a
    stream of large requests costs one release per interval, and small requests none.
    """

    def __init__(
        self,
        *,
        clock: Any,
        run: Callable[[Callable[[], object]], Deferred],
        release: Callable[[], object],
        interval: float = MEMORY_RETURN_INTERVAL,
    ) -> None:
        self._clock = clock
        self._run = run
        self._release = release
        self.interval = interval
        self._last: float | None = None
        self._pending: IDelayedCall | None = None
        self.releases = 0

    def large_request_done(self, _: object = None) -> None:
        if self._pending is not None:
            return  # a release is already due; it will cover this request too
        now = self._clock.seconds()
        delay = 0.0 if self._last is None else max(0.0, self._last + self.interval - now)
        self._pending = self._clock.callLater(delay, self._start)

    def _start(self) -> None:
        self._pending = None
        self._last = self._clock.seconds()
        self.releases += 1
        self._run(self._release).addErrback(
            lambda failure: log.failure("giving memory back failed", failure)
        )

    def stop(self) -> None:
        """Cancel a release not yet started (the server is stopping)."""
        if self._pending is not None:
            self._pending.cancel()
            self._pending = None
