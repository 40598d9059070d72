"""API keys from a file, for running without a cluster. Only SHA-256 hashes of keys are stored.

File format:

    keys:
      - sha256: 6f1c...            # hex digest of the key; `printf %s KEY | sha256sum`
        username: alice
        uid: alice-1               # optional, defaults to the username
        groups: [tier-premium-users]
"""

from __future__ import annotations

import hmac
import re

from pydantic import Field, field_validator

from maas_authz.credentials import token_digest
from maas_authz.identity import Identity
from maas_common.config import StrictModel, parse_yaml_text, validate
from maas_common.errors import ConfigError

_HEX64 = re.compile(r"^[0-9a-f]{64}$")


class StaticKeySpec(StrictModel):
    sha256: str
    username: str = Field(min_length=1)
    uid: str | None = None
    groups: list[str] = Field(default_factory=list)

    @field_validator("sha256")
    @classmethod
    def _is_hex_digest(cls, value: str) -> str:
        value = value.lower()
        if not _HEX64.match(value):
            raise ValueError("expected the 64-character hex SHA-256 digest of the key, not the key")
        return value


class StaticKeyFileSpec(StrictModel):
    keys: list[StaticKeySpec]


class StaticKeyReviewer:
    """Compares the hash of the presented key with every stored hash, in constant time.

    Every entry is compared, without stopping at a match, so the time taken says nothing about
    which stored hash (if any) is near the presented one. Meant for tens to hundreds of keys.
    """

    def __init__(self, entries: list[tuple[bytes, Identity]]) -> None:
        self._entries = entries

    async def review(self, token: str) -> Identity | None:
        digest = token_digest(token)
        found: Identity | None = None
        for stored, identity in self._entries:
            if hmac.compare_digest(stored, digest):
                found = identity
        return found

    def __len__(self) -> int:
        return len(self._entries)


def parse_static_keys(text: str, source: str) -> StaticKeyReviewer:
    spec = validate(StaticKeyFileSpec, parse_yaml_text(text, source), source)
    entries: list[tuple[bytes, Identity]] = []
    seen: set[str] = set()
    for index, key in enumerate(spec.keys):
        if key.sha256 in seen:
            raise ConfigError(source, f"keys[{index}].sha256", "the same key is listed twice")
        seen.add(key.sha256)
        identity = Identity(key.username, key.uid or key.username, tuple(key.groups))
        entries.append((bytes.fromhex(key.sha256), identity))
    return StaticKeyReviewer(entries)
