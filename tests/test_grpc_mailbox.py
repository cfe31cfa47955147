"""``service.grpc_api.Mailbox``: calls handed between the gRPC loop and the reactor."""

from __future__ import annotations

import threading
from collections.abc import Callable

from twisted.logger import LogEvent, globalLogPublisher

from service.grpc_api import Mailbox


class Loop:
    """A stand-in for the loop woken: it keeps what it is asked to run, and runs it when told."""

    def __init__(self) -> None:
        self.wakes: list[Callable[[], None]] = []

    def wake(self, run: Callable[[], None]) -> None:
        self.wakes.append(run)

    def turn(self) -> None:
        wakes, self.wakes = self.wakes, []
        for run in wakes:
            run()


def test_calls_posted_before_the_loop_runs_share_one_wake_up_and_run_in_order() -> None:
    loop, ran = Loop(), []
    mailbox = Mailbox(loop.wake)
    for i in range(5):
        mailbox.post(ran.append, i)
    assert len(loop.wakes) == 1 and ran == []
    loop.turn()
    assert ran == [0, 1, 2, 3, 4]
    mailbox.post(ran.append, 5)  # nothing waits now: this one wakes the loop again
    assert len(loop.wakes) == 1
    loop.turn()
    assert ran == [0, 1, 2, 3, 4, 5]


def test_a_call_that_fails_is_logged_and_the_next_ones_still_run() -> None:
    loop, ran, logged = Loop(), [], []
    mailbox = Mailbox(loop.wake)

    def fail() -> None:
        raise ValueError("broken")

    def observe(event: LogEvent) -> None:
        if event.get("log_failure") is not None:
            logged.append(event["log_failure"])

    mailbox.post(fail)
    mailbox.post(ran.append, "after")
    globalLogPublisher.addObserver(observe)
    try:
        loop.turn()
    finally:
        globalLogPublisher.removeObserver(observe)
    assert ran == ["after"]
    assert [f.type for f in logged] == [ValueError]


def test_posts_from_many_threads_each_run_once() -> None:
    loop, ran = Loop(), []
    mailbox = Mailbox(loop.wake)
    lock = threading.Lock()

    def record(value: int) -> None:
        with lock:
            ran.append(value)

    def poster(start: int) -> None:
        for i in range(start, start + 1000):
            mailbox.post(record, i)

    threads = [threading.Thread(target=poster, args=(k * 1000,)) for k in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    loop.turn()
    assert sorted(ran) == list(range(4000))
    assert loop.wakes == []  # every call ran: nothing is left waiting for a wake-up
