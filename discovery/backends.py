"""What a client needs to know about one server instance, as an immutable value.

A watch publishes whole snapshots (``Backends``: a sorted tuple of ``Backend``) rather
than deltas, so a reader holding a snapshot never sees it change under it and two
snapshots compare with ``==``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from types import MappingProxyType
from typing import Any

from attrs import field, frozen

__all__ = ["Backend", "Backends", "aggregate_status", "snapshot"]

PASSING, WARNING, CRITICAL, MAINTENANCE = "passing", "warning", "critical", "maintenance"
_MAINTENANCE_CHECKS = ("_node_maintenance", "_service_maintenance:")


def _str_tuple(value: Iterable[str]) -> tuple[str, ...]:
    return tuple(value)


def _frozen_meta(value: Mapping[str, str] | None) -> Mapping[str, str]:
    return MappingProxyType(dict(value or {}))


@frozen
class Backend:
    """One healthy-or-not instance of a service: where it listens and what it says of itself.

    ``node`` is part of the identity because Consul keeps service IDs unique per agent
    only; two nodes may each run an ``inference-…`` with the same ID.
    """

    service_id: str
    address: str
    port: int
    tags: tuple[str, ...] = field(default=(), converter=_str_tuple)
    # A read-only view, left out of the hash (a mapping proxy has none) but not of ``==``.
    meta: Mapping[str, str] = field(factory=dict, converter=_frozen_meta, hash=False)
    status: str = PASSING
    node: str = ""

    def sort_key(self) -> tuple[str, str, str, int]:
        return (self.service_id, self.node, self.address, self.port)


Backends = tuple[Backend, ...]


def snapshot(backends: Iterable[Backend]) -> Backends:
    """A canonical snapshot: sorted, so equal sets of backends give equal snapshots."""
    return tuple(sorted(backends, key=Backend.sort_key))


def aggregate_status(checks: Iterable[Mapping[str, Any]]) -> str:
    """Consul's own ``HealthChecks.AggregatedStatus``: maintenance, then critical, warning, passing."""
    statuses = set()
    for check in checks:
        check_id = str(check.get("CheckID", ""))
        if check_id.startswith(_MAINTENANCE_CHECKS):
            return MAINTENANCE
        statuses.add(check.get("Status"))
    for status in (CRITICAL, WARNING):
        if status in statuses:
            return status
    return PASSING
