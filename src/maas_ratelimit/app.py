"""Wiring: configuration -> limits table (hot reloaded), bucket store, limiter, gRPC server."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter

from maas_common.clock import Clock, SystemClock
from maas_common.config import resolve_path
from maas_common.errors import ConfigError
from maas_common.metrics import new_registry, reload_observer
from maas_common.reload import ReloadResult, WatchedFile
from maas_common.server import GrpcService, ServerRuntime
from maas_common.settings import CommandLine, load_server_config
from maas_ratelimit import service
from maas_ratelimit.accounting import LimitAccounting
from maas_ratelimit.config import LedgerSection, LimitsSection, RateLimitConfig, StoreSection
from maas_ratelimit.instrumented import InstrumentedStore
from maas_ratelimit.limiter import RateLimiter
from maas_ratelimit.limits import DEFAULT_LIMITS, LimitTable, parse_limits
from maas_ratelimit.memory_store import MemoryBucketStore
from maas_ratelimit.metrics import RateLimitMetrics
from maas_ratelimit.redis_store import RedisBucketStore
from maas_ratelimit.store import BucketStore
from maas_ratelimit.usage_journal import UsageJournal
from maas_ratelimit.usage_ledger import UsageLedger


def load_config(command_line: CommandLine) -> RateLimitConfig:
    return load_server_config(RateLimitConfig, command_line)


def limits_file(
    section: LimitsSection,
    base_dir: Path,
    on_reload: Callable[[ReloadResult], None] | None = None,
) -> WatchedFile[LimitTable] | None:
    if section.file is None:
        return None
    return WatchedFile(
        resolve_path(base_dir, section.file),
        parse_limits,
        name="limits",
        interval=section.reload_interval,
        on_reload=on_reload,
    )


def check_config(config: RateLimitConfig, base_dir: Path) -> str:
    """--check-config: load the limits file as start-up would, and summarise."""
    return "\n".join([*describe_limiting(config.limits, config.store, config.ledger, base_dir),
                      "configuration OK"])  # fmt: skip


def describe_limiting(
    limits: LimitsSection,
    store: StoreSection,
    ledger: LedgerSection | None,
    base_dir: Path,
    key_prefix: str = "",
) -> list[str]:
    """The limits, store and ledger as start-up would load them, summarised (--check-config of
    either server); raises ConfigError as start-up would."""
    watched = limits_file(limits, base_dir)
    table = watched.load() if watched else parse_limits(DEFAULT_LIMITS, "built-in limits")
    lines = [f"domain: {table.domain}"]
    lines += [
        f"{'budget' if limit.budget else 'limit'} {limit.name}: {limit.description}"
        for limit in (*table.limits, *table.subscription_budgets)
    ]
    lines += [
        f"price {model}: {price.prompt_per_million} prompt, {price.completion_per_million} "
        "completion per million tokens"
        for model, price in table.prices
    ]
    build_store(store, key_prefix=key_prefix)  # checks what it can without connecting (the URL)
    lines.append(f"store: {store.type} (failure mode {store.failure_mode})")
    if ledger is not None:  # checked by the config model, not connected
        lines.append(f"ledger: {ledger.engine}, journal {ledger.spool_dir}")
    return lines


def build_store(
    section: StoreSection, source: str = "config", *, key_prefix: str = ""
) -> BucketStore:
    """The configured store (nothing is connected yet). A bad URL is a ConfigError naming
    `key_prefix` + store.redis.url."""
    ttl_ms = round(section.request_id_ttl * 1000)
    if section.type == "redis":
        redis = section.redis
        assert redis is not None
        try:
            return RedisBucketStore.from_url(
                redis.url,
                timeout=redis.timeout,
                connect_timeout=redis.connect_timeout,
                max_connections=redis.max_connections,
                key_prefix=redis.key_prefix,
                request_id_ttl_ms=ttl_ms,
            )
        except ValueError as exc:
            raise ConfigError(source, f"{key_prefix}store.redis.url", str(exc)) from None
    return MemoryBucketStore(request_id_ttl_ms=ttl_ms)


@dataclass
class Limiting:
    """The limiter and everything it runs with, as a server wires it in: maas-ratelimit, or
    maas-authz in the one-hop topology (the same parts, the same metrics)."""

    accounting: LimitAccounting
    store: BucketStore
    ledger: UsageLedger | None
    background: list[Callable[[], Coroutine[Any, Any, None]]]
    on_close: list[Callable[[], Awaitable[None]]]

    @property
    def limiter(self) -> RateLimiter:
        return self.accounting.limiter


def build_limiting(
    limits_section: LimitsSection,
    store_section: StoreSection,
    ledger_section: LedgerSection | None,
    base_dir: Path,
    *,
    registry: CollectorRegistry,
    clock: Clock,
    process: str,
    config_reloads: Counter | None = None,
    store: BucketStore | None = None,
    key_prefix: str = "",
) -> Limiting:
    """The limits table (loaded now, then hot reloaded), the store (connected on first use),
    the ledger's writer (its journal opened and locked now), and the accounting over them.
    `process` names the writer in the ledger's database; `config_reloads` is the server's
    counter where it has one already; `key_prefix` where the sections are in its file."""
    metrics = RateLimitMetrics(registry, config_reloads=config_reloads)
    watched = limits_file(
        limits_section, base_dir, reload_observer(metrics.config_reloads, "limits")
    )
    limits: Callable[[], LimitTable]
    if watched is None:
        table = parse_limits(DEFAULT_LIMITS, "built-in limits")
        limits = lambda: table  # noqa: E731
    else:
        watched.load()
        limits = lambda: watched.value  # noqa: E731 - read at every call: reloads apply at once

    raw_store = store or build_store(store_section, key_prefix=key_prefix)
    bucket_store: BucketStore
    if isinstance(raw_store, MemoryBucketStore):
        metrics.track_buckets(raw_store.__len__)
        # not timed: its operations take a few µs of the call's own time and never fail, and
        # timing them would add ~5 % to every call
        bucket_store = raw_store
    else:
        bucket_store = InstrumentedStore(raw_store, metrics)
    ledger = build_ledger(ledger_section, base_dir, registry, clock, limits, process=process)
    # with a ledger, every reported usage is settled (and so de-duplicated by request id), also
    # where no tokens limit applies
    limiter = RateLimiter(
        limits=limits, store=bucket_store, clock=clock, settle_all=ledger is not None
    )
    accounting = LimitAccounting(
        limiter, metrics, failure_mode=store_section.failure_mode, clock=clock, ledger=ledger
    )
    return Limiting(
        accounting,
        bucket_store,
        ledger,
        background=[*([watched.watch] if watched else []), *([ledger.run] if ledger else [])],
        on_close=[*([ledger.close] if ledger else []), bucket_store.close],
    )


@dataclass
class RateLimitApp:
    config: RateLimitConfig
    runtime: ServerRuntime
    limiter: RateLimiter
    store: BucketStore
    registry: CollectorRegistry
    ledger: UsageLedger | None = None


def build_app(
    config: RateLimitConfig,
    base_dir: Path,
    *,
    clock: Clock | None = None,
    registry: CollectorRegistry | None = None,
    store: BucketStore | None = None,
) -> RateLimitApp:
    registry = registry or new_registry()
    limiting = build_limiting(
        config.limits,
        config.store,
        config.ledger,
        base_dir,
        registry=registry,
        clock=clock or SystemClock(),
        process="maas-ratelimit",
        store=store,
    )
    servicer = service.RateLimitService(limiting.accounting)
    runtime = ServerRuntime(
        name="maas-ratelimit",
        grpc_addr=config.server.grpc_addr,
        http_addr=config.server.http_addr,
        services=[GrpcService(service.SERVICE_NAME, servicer.register)],
        registry=registry,
        drain_timeout=config.server.drain_timeout,
        shutdown_delay=config.server.shutdown_delay,
        background=limiting.background,
        on_close=limiting.on_close,
        grpc_tls=config.server.tls,
    )
    return RateLimitApp(
        config, runtime, limiting.limiter, limiting.store, registry, limiting.ledger
    )


def build_ledger(
    section: LedgerSection | None,
    base_dir: Path,
    registry: CollectorRegistry,
    clock: Clock,
    limits: Callable[[], LimitTable],
    *,
    process: str = "maas-ratelimit",
) -> UsageLedger | None:
    """The usage ledger's writer, its journal opened (and locked) now: a journal another process
    holds is a start-up error."""
    if section is None:
        return None
    journal = UsageJournal(
        resolve_path(base_dir, section.spool_dir), max_bytes=section.spool_max_bytes
    )
    journal.open()
    return UsageLedger(
        journal,
        section.open(base_dir, process),
        registry,
        clock=clock,
        prices=lambda: limits().price_for,
        batch_size=section.batch_size,
        flush_interval=section.flush_interval,
        drain_timeout=section.drain_timeout,
    )
