"""The Consul tags of a server follow its AVAILABLE model versions."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

from twisted.internet.task import Clock

from discovery.consul import ConsulAddress
from service.options import DiscoveryConfig
from service.registration import make_registration, model_tags
from service.repository import (
    AVAILABLE,
    LOADING,
    UNLOADING,
    LoadedVersion,
    ModelConfig,
    ModelRepository,
)


def test_model_tags_announce_only_available_versions() -> None:
    """A model is tagged once it has an AVAILABLE version; loading or unloading ones are not."""
    repository = ModelRepository(
        [ModelConfig("a", Path("/nonexistent")), ModelConfig("b", Path("/nonexistent"))],
        reactor=Clock(),
    )
    for name, number, state in [("a", 1, UNLOADING), ("a", 2, AVAILABLE), ("b", 1, LOADING)]:
        repository.add_version(LoadedVersion(name, number, state=state))
    tags, meta = model_tags(repository)
    assert tags == ["api:tfserving-rest", "api:v2", "model:a", "model:a:2"]
    assert meta == {"api": "tfserving-rest", "models": "a:2"}


def test_a_tls_server_registers_an_https_check_and_scheme_https() -> None:
    """With an ssl: --listen (check_scheme https) the registration's readiness check is
    https, verified unless asked, and its meta tells clients scheme: https."""
    repository = ModelRepository([ModelConfig("a", Path("/nonexistent"))], reactor=Clock())
    repository.add_version(LoadedVersion("a", 1, state=AVAILABLE))
    discovery = DiscoveryConfig(
        ConsulAddress.parse("127.0.0.1:8500"), "10.0.0.5", None, check_scheme="https"
    )
    health = SimpleNamespace(alive=lambda: True)
    registration = make_registration(
        discovery, repository, 8443, health, Clock(), client=cast(Any, object())
    )
    spec = registration.spec
    assert spec.readiness_url == "https://10.0.0.5:8443/readyz" and not spec.tls_skip_verify
    assert spec.meta["scheme"] == "https"
