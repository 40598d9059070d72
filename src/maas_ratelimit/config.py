"""The maas-ratelimit configuration file; docs/configuration.md documents every key and default."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from maas_common.config import Address, PositiveDuration, StrictModel
from maas_common.ledger.settings import LedgerDatabaseSection
from maas_common.settings import ServerSection


class RateLimitServerSection(ServerSection):
    grpc_addr: Address = "0.0.0.0:50052"
    http_addr: Address = "0.0.0.0:8082"


class LimitsSection(StrictModel):
    file: Path | None = None  # unset: the platform's default limits
    reload_interval: PositiveDuration = 2.0


class RedisSection(StrictModel):
    url: str = "redis://127.0.0.1:6379/0"

    @field_validator("url")
    @classmethod
    def _redis_url(cls, value: str) -> str:
        if not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(f"expected a redis://, rediss:// or unix:// URL, got {value!r}")
        return value

    timeout: PositiveDuration = 0.05  # per operation, including the wait for a connection
    connect_timeout: PositiveDuration = 0.2
    max_connections: int = Field(64, ge=1, le=10_000)
    key_prefix: str = "maas:rl:"


class StoreSection(StrictModel):
    type: Literal["memory", "redis"] = "memory"
    failure_mode: Literal["open", "closed"] = "open"
    request_id_ttl: PositiveDuration = 600.0  # how long charges are de-duplicated per request id
    redis: RedisSection | None = None

    @model_validator(mode="after")
    def _redis_needs_settings(self) -> StoreSection:
        if self.type == "redis" and self.redis is None:
            raise ValueError("type 'redis' needs a redis: section (at least redis.url)")
        return self


class LedgerSection(LedgerDatabaseSection):
    """The usage ledger (docs/operations.md "The usage ledger"); absent: no ledger."""

    spool_dir: Path = Path("ledger-journal")  # this process's journal (relative: to the file)
    spool_max_bytes: int = Field(1 << 30, ge=1 << 16)  # beyond: records dropped and counted
    batch_size: int = Field(500, ge=1, le=10_000)
    flush_interval: PositiveDuration = 0.2
    drain_timeout: PositiveDuration = 5.0  # on shutdown, to ship what is journaled


class RateLimitConfig(StrictModel):
    server: RateLimitServerSection = RateLimitServerSection()
    limits: LimitsSection = LimitsSection()
    store: StoreSection = StoreSection()
    ledger: LedgerSection | None = None
