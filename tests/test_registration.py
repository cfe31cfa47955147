"""The Consul tags of a server follow its AVAILABLE model versions."""

from __future__ import annotations

from pathlib import Path

from twisted.internet.task import Clock

from service.registration import model_tags
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
