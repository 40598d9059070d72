"""May this identity use this model? The interface, and a static grant list for clusterless runs."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

from maas_authz.identity import Identity
from maas_authz.model_path import ModelRef


class AccessReviewer(Protocol):
    """Raises maas_common.errors.BackendUnavailable when it cannot tell."""

    async def allowed(self, identity: Identity, model: ModelRef) -> bool: ...


@dataclass(frozen=True, slots=True)
class Grant:
    """Like a RoleBinding to a Role with verb `post` on some models.

    A model pattern is `namespace/name`, `namespace/*` or `*`.
    """

    models: frozenset[str]
    groups: frozenset[str] = frozenset()
    users: frozenset[str] = frozenset()

    def covers(self, identity: Identity, model: ModelRef) -> bool:
        if not ({"*", f"{model.namespace}/*", str(model)} & self.models):
            return False
        return identity.username in self.users or not self.groups.isdisjoint(identity.groups)


class StaticAccessReviewer:
    def __init__(self, grants: Iterable[Grant]) -> None:
        self._grants = tuple(grants)

    async def allowed(self, identity: Identity, model: ModelRef) -> bool:
        return any(grant.covers(identity, model) for grant in self._grants)
