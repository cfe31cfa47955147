"""The frames and the shared-memory ring between the main process and front processes."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from service.errors import NotFound, ResourceExhausted, ServingError
from service.front_frames import error_of, error_spec, pack, put_tensors, take_tensors, unpack
from service.front_remote import signature_doc, signature_from
from service.shm_ring import ALIGN, RingAllocator
from service.signature import Signature, TensorInfo


class _BytesRing:
    """A ring over a plain bytearray (what ``shm_ring.Ring`` is over a segment)."""

    def __init__(self, size: int) -> None:
        self._allocator = RingAllocator(size)
        self.buffer = memoryview(bytearray(size))

    def allocate(self, size: int) -> int | None:
        return self._allocator.allocate(size)


def _round_trip(tensors: dict[str, np.ndarray], ring: _BytesRing | None) -> dict[str, np.ndarray]:
    specs, tail, _ = put_tensors(tensors, ring)
    header, rest = unpack(pack({"op": "predict", "inputs": specs}, tail))
    return take_tensors(header["inputs"], rest, ring.buffer if ring else None)


def test_tensors_cross_through_the_ring_and_the_tail_unchanged() -> None:
    """Numbers through the ring, numbers and byte strings through the tail: equal on arrival."""
    tensors = {
        "image": np.arange(24, dtype=np.float32).reshape(2, 3, 4),
        "ids": np.array([[1, -2]], dtype=np.int64),
        "text": np.array([b"a", b"", "\u00e9".encode()], dtype=object),
        "empty": np.zeros((0, 3), dtype=np.float32),
    }
    for ring in (_BytesRing(4096), None):
        out = _round_trip(tensors, ring)
        assert list(out) == list(tensors)
        for name, value in tensors.items():
            assert out[name].dtype == value.dtype
            assert out[name].shape == value.shape
            assert out[name].tolist() == value.tolist()


def test_a_tensor_the_ring_has_no_room_for_goes_in_the_tail() -> None:
    """A full ring: the tensor travels in the frame instead, and is not lost."""
    ring = _BytesRing(256)
    big = np.ones((100,), dtype=np.float32)  # 400 bytes > 256
    specs, tail, regions = put_tensors({"x": big}, ring)
    assert regions == [] and specs[0][3][0] == "tail"
    assert _round_trip({"x": big}, ring)["x"].tolist() == big.tolist()


def test_ring_tensors_are_read_in_place() -> None:
    """What arrives through the ring is a view of the ring, unless a copy is asked for."""
    ring = _BytesRing(1024)
    specs, tail, _ = put_tensors({"x": np.ones(4, dtype=np.float32)}, ring)
    header, rest = unpack(pack({"inputs": specs}, tail))
    out = take_tensors(header["inputs"], rest, ring.buffer)["x"]
    copied = take_tensors(header["inputs"], rest, ring.buffer, copy=True)["x"]
    ring.buffer[specs[0][3][1] : specs[0][3][1] + 4] = np.float32(7).tobytes()
    assert out[0] == 7
    assert copied[0] == 1  # a copy: its region may be given back at once


def test_errors_cross_as_their_own_class_and_status() -> None:
    """A ServingError comes back as the same class, status, message and Retry-After."""
    for error in (NotFound("no model"), ResourceExhausted("busy", retry_after=1)):
        back = error_of(error_spec(error))
        assert type(back) is type(error)
        assert (back.status, back.message, back.retry_after) == (
            error.status,
            error.message,
            error.retry_after,
        )
    odd = error_of(["NoSuchError", 418, "teapot", None])
    assert type(odd) is ServingError and odd.status == 418


def test_a_frame_header_must_be_an_object() -> None:
    """A frame whose header is not a JSON object is refused."""
    with pytest.raises(ValueError, match="JSON object"):
        unpack(b"\x00\x00\x00\x02[]")


def test_signatures_cross_as_plain_data() -> None:
    """A signature sent to a front process is the same signature there."""
    signature = Signature(
        "serving_default",
        {"image": TensorInfo("image", "DT_FLOAT", (None, 28, 28, 1), "serving_default_image:0")},
        {"out": TensorInfo("out", "DT_FLOAT", None, "Identity:0")},
    )
    assert signature_from(signature_doc(signature)) == signature


@given(
    st.lists(
        st.tuples(st.integers(min_value=1, max_value=700), st.booleans()),
        min_size=1,
        max_size=60,
    )
)
def test_ring_regions_never_overlap_and_stay_inside(steps: list[tuple[int, bool]]) -> None:
    """Whatever is allocated and freed, in whatever order, regions held never overlap, stay
    inside the buffer, and once all are freed the whole buffer is free again."""
    size = 2048
    ring = RingAllocator(size)
    held: dict[int, int] = {}
    for n, free_oldest in steps:
        if free_oldest and held:
            offset = sorted(held)[len(held) // 2]  # not in allocation order
            ring.free(offset)
            del held[offset]
        offset = ring.allocate(n)
        if offset is None:
            continue
        length = max(ALIGN, -(-n // ALIGN) * ALIGN)
        assert 0 <= offset and offset + length <= size
        for other, other_length in held.items():
            assert offset + length <= other or other + other_length <= offset
        held[offset] = length
    for offset in list(held):
        ring.free(offset)
    assert ring.used == 0
    assert ring.allocate(size) == 0


def test_a_front_process_maps_the_segment_without_a_resource_tracker() -> None:
    """attach_segment (in a fresh interpreter, as a front process is) sees what the main
    process wrote, starts no resource-tracker process, and leaves the segment in place when it
    exits: the main process owns it."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from service.shm_ring import create_segment, release_segment

    name = f"kleinserve-test-{os.getpid()}"
    segment = create_segment(name, 4096)
    try:
        segment.buf[:5] = b"hello"
        child = (
            "import sys\n"
            "from multiprocessing import resource_tracker\n"
            "from service.shm_ring import attach_segment\n"
            "seen = attach_segment(sys.argv[1])\n"
            "print(bytes(seen.buf[:5]).decode(), resource_tracker._resource_tracker._fd)\n"
            "seen.buf[5:7] = b'!!'\n"
        )
        out = subprocess.run(
            [sys.executable, "-c", child, name], capture_output=True, text=True, check=True
        ).stdout.split()
        assert out == ["hello", "None"]  # None: no tracker was started
        assert bytes(segment.buf[:7]) == b"hello!!"
        assert (Path("/dev/shm") / name).exists()
    finally:
        release_segment(segment)
    assert not (Path("/dev/shm") / name).exists()
