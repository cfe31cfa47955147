"""A front process's shared-memory ring: where its decoded input tensors cross to the main
process (``--http_processes``, docs/scaling.md).

The main process creates one segment per front process it starts (``create_segment``),
passes its name, and unlinks it when that process ends or the server stops (nothing is left
in ``/dev/shm``; if the main process itself is killed, Python's resource tracker, which
registered the segment, unlinks it). The front process attaches (``attach_segment``).
The segment is two rings (``halves``). In the first the front process hands out regions with
``RingAllocator``: a request's inputs are written once into their region, read in place by the
main process, and the region is freed when the main process answers the request (it answers
every request once, and only when nothing of it is still read: see ``service.front_main``).
In the second the main process writes a request's outputs; the front process copies them out
when the answer arrives and gives the regions back with its next message (``freed``).
"""

from __future__ import annotations

import mmap
import os
from collections import OrderedDict
from multiprocessing.shared_memory import SharedMemory

ALIGN = 64  # each region starts on a cache line (numpy is happy with any multiple of 16)


class RingAllocator:
    """Regions of a ``size``-byte buffer, handed out in order and freed in any order.

    Regions are placed one after the other, wrapping to the start when the end is reached;
    the oldest region still in use bounds the next placement. ``allocate`` answers None
    when there is no contiguous room (the caller sends the bytes another way).
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self._live: OrderedDict[int, list[int]] = OrderedDict()  # offset -> [size, freed]
        self._head = 0  # where the next region goes

    @property
    def used(self) -> int:
        """Bytes in regions not yet freed."""
        return sum(size for size, freed in self._live.values() if not freed)

    def allocate(self, size: int) -> int | None:
        need = max(ALIGN, -(-size // ALIGN) * ALIGN)
        if need > self.size:
            return None
        if not self._live:
            self._head = 0
            offset = 0
        else:
            tail = next(iter(self._live))  # the oldest region held
            if self._head == tail:
                return None  # full: the regions held reach all the way round
            if self._head > tail:  # free: [head, size) and [0, tail)
                if self.size - self._head >= need:
                    offset = self._head
                elif tail >= need:
                    offset = 0
                else:
                    return None
            elif tail - self._head >= need:  # free: [head, tail)
                offset = self._head
            else:
                return None
        self._live[offset] = [need, 0]
        self._head = offset + need
        return offset

    def free(self, offset: int) -> None:
        """Give a region back (unknown offsets are ignored: freeing is idempotent)."""
        region = self._live.get(offset)
        if region is None:
            return
        region[1] = 1
        while self._live:
            first = next(iter(self._live))
            if not self._live[first][1]:
                break
            del self._live[first]


class Ring:
    """A ``RingAllocator`` over ``size`` bytes of ``buffer`` from ``start`` (offsets are the
    buffer's): what ``front_frames.put_tensors`` fills."""

    def __init__(self, buffer: memoryview, start: int, size: int) -> None:
        self.buffer = buffer
        self._start = start
        self._allocator = RingAllocator(size)

    def allocate(self, size: int) -> int | None:
        offset = self._allocator.allocate(size)
        return None if offset is None else self._start + offset

    def free(self, offset: int) -> None:
        self._allocator.free(offset - self._start)

    @property
    def used(self) -> int:
        return self._allocator.used


def halves(buffer: memoryview) -> tuple[Ring, Ring]:
    """A segment's two rings: the front process's inputs (first half), the main process's
    outputs (second half). Each side allocates in its own and frees what the other gives back."""
    half = len(buffer) // 2 // ALIGN * ALIGN
    return Ring(buffer, 0, half), Ring(buffer, half, len(buffer) - half)


def create_segment(name: str, size: int) -> SharedMemory:
    """A new segment (main process); Python's resource tracker unlinks it if we are killed."""
    return SharedMemory(name=name, create=True, size=size)


class Attached:
    """A segment mapped by a front process (``attach_segment``): ``buf``, its bytes."""

    def __init__(self, mapping: mmap.mmap) -> None:
        self._mapping = mapping
        self.buf = memoryview(mapping)


def attach_segment(name: str, directory: str = "/dev/shm") -> Attached:
    """The main process's segment ``name`` (front process), mapped from where POSIX shared
    memory lives on Linux. Not through ``SharedMemory``: that registers the segment with
    Python's resource tracker, which would start a tracker process beside every front
    process (about 10 MB each) and unlink the main process's segment when this one exits;
    the main process owns it."""
    fd = os.open(os.path.join(directory, name.lstrip("/")), os.O_RDWR)
    try:
        return Attached(mmap.mmap(fd, 0))
    finally:
        os.close(fd)


def release_segment(segment: SharedMemory) -> None:
    """Unlink (once) and close ``segment``; arrays still viewing it keep the mapping alive
    until they go (closing is then left to the garbage collector)."""
    try:
        segment.unlink()
    except FileNotFoundError:
        pass
    try:
        segment.close()
    except BufferError:
        pass
