"""The pytest side of ``harness.consul``: a dev-mode Consul agent per test, skipped without
the binary.

Import the fixtures into a test module (``from tests.consul_agent import consul_agent``).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from harness.consul import CONSUL_BINARY, ConsulAgent


def new_agent(tmp_path: Path, config: dict[str, Any] | None = None) -> ConsulAgent:
    """An agent with its ports chosen (and ``config`` added to its configuration), logging
    to ``tmp_path``; skips the test without consul."""
    if not CONSUL_BINARY.exists():
        pytest.skip(f"no consul binary at {CONSUL_BINARY}: run scripts/bootstrap to install it")
    return ConsulAgent(CONSUL_BINARY, tmp_path, config)


@pytest.fixture
def consul_agent(tmp_path: Path) -> Iterator[ConsulAgent]:
    """A running dev agent, stopped after the test."""
    agent = new_agent(tmp_path)
    agent.start()
    try:
        yield agent
    finally:
        agent.stop(kill=True)  # dev mode keeps nothing worth a graceful leave


@pytest.fixture
def consul_agent_unstarted(tmp_path: Path) -> Iterator[ConsulAgent]:
    """An agent with its ports chosen but not started: the test calls ``start()``."""
    agent = new_agent(tmp_path)
    try:
        yield agent
    finally:
        agent.stop(kill=True)
