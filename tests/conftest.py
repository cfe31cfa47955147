"""Shared test configuration: a reproducible hypothesis profile for CI, and log capture."""

import os
from collections.abc import Iterator
from typing import cast

import pytest
from hypothesis import HealthCheck, settings
from twisted.logger import ILogObserver, LogLevel, formatEvent, globalLogPublisher

settings.register_profile(
    "ci",
    deadline=None,
    derandomize=True,
    max_examples=200,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("dev", deadline=None, max_examples=100)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))


class CapturedLogs(list):
    """Twisted log events captured during one test."""

    def messages(self, level: LogLevel, namespace: str) -> list[str]:
        """The formatted messages of one level from loggers under ``namespace``."""
        return [
            formatEvent(e)
            for e in list(self)
            if e.get("log_level") == level and e.get("log_namespace", "").startswith(namespace)
        ]


@pytest.fixture
def logs() -> Iterator[CapturedLogs]:
    """Every Twisted log event emitted during the test."""
    events = CapturedLogs()
    observer = cast(ILogObserver, events.append)
    globalLogPublisher.addObserver(observer)
    try:
        yield events
    finally:
        globalLogPublisher.removeObserver(observer)
