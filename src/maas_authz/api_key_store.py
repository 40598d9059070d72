"""Where sk-oai- API key records come from, and the verifier that turns a key into a verdict.

The stores hold maas-api's `api_keys` rows (hashes only). `ApiKeyFile` is the embedded/demo
store: the same columns as YAML, so a key file and the database say the same thing:

    api_keys:
      - id: 6a1f...                 # maas-api's key id (UUID); logged and billed, never the key
        username: alice
        name: laptop                # optional
        key_hash: 3b0c...           # SHA-256(key_id + "\\x00" + secret), hex (api_keys.key_hash)
        user_groups: [team-a]
        status: active              # active | revoked | expired
        expires_at: 2027-01-01T00:00:00Z   # optional
        subscription: team-a-basic  # the MaaSSubscription the key is bound to
"""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Literal, Protocol

from pydantic import Field, field_validator

from maas_authz.api_keys import ApiKeyRecord, KeyIdentity, Rejection, judge, parse_key
from maas_common.clock import Clock
from maas_common.config import StrictModel, parse_yaml_text, validate
from maas_common.errors import ConfigError

_HEX64 = re.compile(r"^[0-9a-f]{64}$")


class ApiKeyStore(Protocol):
    """Finds the row whose key_hash is `key_hash`. Raises BackendUnavailable when it cannot."""

    async def find(self, key_hash: str) -> ApiKeyRecord | None: ...


class ApiKeyRow(StrictModel):
    id: str = Field(min_length=1)
    username: str = Field(min_length=1)
    name: str = ""
    key_hash: str
    user_groups: list[str] = Field(default_factory=list)
    status: Literal["active", "revoked", "expired"] = "active"
    expires_at: datetime | None = None
    subscription: str = ""

    @field_validator("key_hash")
    @classmethod
    def _is_hex_digest(cls, value: str) -> str:
        value = value.lower()
        if not _HEX64.match(value):
            raise ValueError(
                "expected the 64-character hex SHA-256 of key_id + '\\x00' + secret, not the key"
            )
        return value

    @field_validator("expires_at")
    @classmethod
    def _aware(cls, value: datetime | None) -> datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError("needs a time zone, e.g. 2027-01-01T00:00:00Z")
        return value


class ApiKeyFileSpec(StrictModel):
    api_keys: list[ApiKeyRow]


class ApiKeyFile:
    """Rows by hash, in memory. A dict lookup by hash leaks nothing useful: finding a stored
    hash by timing would still need a preimage of SHA-256."""

    def __init__(self, rows: dict[str, ApiKeyRecord]) -> None:
        self._rows = rows

    async def find(self, key_hash: str) -> ApiKeyRecord | None:
        return self._rows.get(key_hash)

    def __len__(self) -> int:
        return len(self._rows)


def parse_api_key_file(text: str, source: str) -> ApiKeyFile:
    spec = validate(ApiKeyFileSpec, parse_yaml_text(text, source), source)
    rows: dict[str, ApiKeyRecord] = {}
    for index, row in enumerate(spec.api_keys):
        if row.key_hash in rows:
            raise ConfigError(source, f"api_keys[{index}].key_hash", "the same key is listed twice")
        rows[row.key_hash] = ApiKeyRecord(
            id=row.id,
            username=row.username,
            groups=tuple(row.user_groups),
            status=row.status,
            expires_at=row.expires_at,
            subscription=row.subscription,
            name=row.name,
        )
    return ApiKeyFile(rows)


class ApiKeyVerifier:
    """A presented sk-oai- key -> the identity it stands for, or maas-api's reason to refuse.

    `store` is a callable so that a reloaded key file applies to the next request.
    """

    def __init__(self, store: Callable[[], ApiKeyStore], clock: Clock) -> None:
        self._store = store
        self._clock = clock

    async def verify(self, token: str) -> KeyIdentity | Rejection:
        parts = parse_key(token)
        if parts is None:
            return "invalid key format"
        record = await self._store().find(parts.hash)
        return judge(record, datetime.fromtimestamp(self._clock.wall(), UTC))
