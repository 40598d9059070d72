"""maas-api's API keys, `sk-oai-{key_id}_{secret}`: the format, the stored hash and the verdict.

Pure. maas-api mints the keys and stores only SHA-256(key_id + "\\x00" + secret) in hex, with
the owner, the groups at minting time, a status, an expiry and the subscription the key is bound
to (PostgreSQL `api_keys`); the gateway finds the record by that hash and decides as maas-api's
own validator does (`maas-api/internal/api_keys/service.go`), including its reasons.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from datetime import datetime
from typing import Literal, Protocol

PREFIX = "sk-oai-"
_KEY = re.compile(r"sk-oai-([0-9A-Za-z]+)_([0-9A-Za-z]+)", re.ASCII)
# far beyond what maas-api mints (16 + 43 base62 characters), short enough to refuse junk cheaply
MAX_KEY_LENGTH = 256

Status = Literal["active", "revoked", "expired"]
Rejection = Literal[
    "invalid key format", "key not found", "key revoked or expired", "key has no subscription bound"
]


@dataclass(frozen=True, slots=True)
class KeyParts:
    key_id: str
    secret: str

    @property
    def hash(self) -> str:
        return hash_parts(self.key_id, self.secret)


def is_api_key(token: str) -> bool:
    """Whether a bearer token is meant as an API key (and so is never sent to TokenReview)."""
    return token.startswith(PREFIX)


def parse_key(token: str) -> KeyParts | None:
    """The key's two parts, or None when it is not a well-formed `sk-oai-` key."""
    if len(token) > MAX_KEY_LENGTH:
        return None
    found = _KEY.fullmatch(token)
    return KeyParts(found[1], found[2]) if found else None


def hash_parts(key_id: str, secret: str) -> str:
    """The `key_hash` column's value: the key id salts the secret."""
    return hashlib.sha256(f"{key_id}\x00{secret}".encode()).hexdigest()


def hash_key(token: str) -> str | None:
    parts = parse_key(token)
    return parts.hash if parts else None


@dataclass(frozen=True, slots=True)
class ApiKeyRecord:
    """One row of `api_keys`, the columns the gateway reads."""

    id: str  # maas-api's UUID for the key; logged and billed as the key id, never the key
    username: str
    groups: tuple[str, ...]
    status: str
    expires_at: datetime | None  # timezone-aware
    subscription: str
    name: str = ""


@dataclass(frozen=True, slots=True)
class KeyIdentity:
    """A valid key: who it belongs to and the subscription it is bound to."""

    key_id: str
    key_name: str
    username: str
    groups: tuple[str, ...]
    subscription: str
    expires_at: datetime | None = None  # caches never keep a verdict past it


class KeyValidator(Protocol):
    """An sk-oai- key -> who it is, or maas-api's reason to refuse it. Raises
    maas_common.errors.BackendUnavailable when it cannot tell (the database, maas-api)."""

    async def verify(self, token: str) -> KeyIdentity | Rejection: ...


def judge(record: ApiKeyRecord | None, now: datetime) -> KeyIdentity | Rejection:
    """maas-api's verdict on a key whose hash found `record` (None: no such row) at `now`."""
    if record is None:
        return "key not found"
    if record.status != "active":
        return "key revoked or expired"
    if record.expires_at is not None and record.expires_at <= now:
        return "key revoked or expired"
    if not record.subscription.strip():
        return "key has no subscription bound"  # fail closed, as maas-api does
    return KeyIdentity(
        key_id=record.id,
        key_name=record.name,
        username=record.username,
        groups=record.groups,
        subscription=record.subscription.strip(),
        expires_at=record.expires_at,
    )
