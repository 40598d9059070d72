"""Who is calling: the identity a token stands for, and the interface of identity sources."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

_SERVICE_ACCOUNT_PREFIX = "system:serviceaccount:"


@dataclass(frozen=True, slots=True)
class Identity:
    username: str
    uid: str
    groups: tuple[str, ...]

    @property
    def userid(self) -> str:
        """The platform's user id: a ServiceAccount's name, otherwise the username.

        MaaS tokens belong to ServiceAccounts `system:serviceaccount:<tier-ns>:<name>`; Authorino
        handed on the 4th field as `userid`, and rate-limit counters are keyed by it.
        """
        if self.username.startswith(_SERVICE_ACCOUNT_PREFIX):
            parts = self.username.split(":")
            if len(parts) == 4 and parts[3]:
                return parts[3]
        return self.username


class TokenReviewer(Protocol):
    """Turns a bearer token into an Identity, or None when the token does not authenticate.

    Raises maas_common.errors.BackendUnavailable when it cannot tell.
    """

    async def review(self, token: str) -> Identity | None: ...
