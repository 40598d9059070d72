"""Wiring: configuration -> limits table (hot reloaded), bucket store, limiter, gRPC server."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from prometheus_client import CollectorRegistry

from maas_common.clock import Clock, SystemClock
from maas_common.config import resolve_path
from maas_common.errors import ConfigError
from maas_common.metrics import new_registry, reload_observer
from maas_common.reload import ReloadResult, WatchedFile
from maas_common.server import GrpcService, ServerRuntime
from maas_common.settings import CommandLine, load_server_config
from maas_ratelimit import service
from maas_ratelimit.config import RateLimitConfig
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
    config: RateLimitConfig,
    base_dir: Path,
    on_reload: Callable[[ReloadResult], None] | None = None,
) -> WatchedFile[LimitTable] | None:
    if config.limits.file is None:
        return None
    return WatchedFile(
        resolve_path(base_dir, config.limits.file),
        parse_limits,
        name="limits",
        interval=config.limits.reload_interval,
        on_reload=on_reload,
    )


def check_config(config: RateLimitConfig, base_dir: Path) -> str:
    """--check-config: load the limits file as start-up would, and summarise."""
    watched = limits_file(config, base_dir)
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
    build_store(config)  # checks what can be checked without connecting (the URL)
    lines.append(f"store: {config.store.type} (failure mode {config.store.failure_mode})")
    if config.ledger is not None:  # checked by the config model, not connected
        lines.append(f"ledger: {config.ledger.engine}, journal {config.ledger.spool_dir}")
    lines.append("configuration OK")
    return "\n".join(lines)


def build_store(config: RateLimitConfig, source: str = "config") -> BucketStore:
    """The configured store (nothing is connected yet). A bad URL is a ConfigError."""
    ttl_ms = round(config.store.request_id_ttl * 1000)
    if config.store.type == "redis":
        redis = config.store.redis
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
            raise ConfigError(source, "store.redis.url", str(exc)) from None
    return MemoryBucketStore(request_id_ttl_ms=ttl_ms)


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
    clock = clock or SystemClock()
    registry = registry or new_registry()
    metrics = RateLimitMetrics(registry)

    watched = limits_file(config, base_dir, reload_observer(metrics.config_reloads, "limits"))
    limits: Callable[[], LimitTable]
    if watched is None:
        table = parse_limits(DEFAULT_LIMITS, "built-in limits")
        limits = lambda: table  # noqa: E731
    else:
        watched.load()
        limits = lambda: watched.value  # noqa: E731 - read at every call: reloads apply at once

    raw_store = store or build_store(config)
    bucket_store: BucketStore
    if isinstance(raw_store, MemoryBucketStore):
        metrics.track_buckets(raw_store.__len__)
        # not timed: its operations take a few µs of the call's own time and never fail, and
        # timing them would add ~5 % to every call
        bucket_store = raw_store
    else:
        bucket_store = InstrumentedStore(raw_store, metrics)
    ledger = build_ledger(config, base_dir, registry, clock, limits)
    # with a ledger, every reported usage is settled (and so de-duplicated by request id), also
    # where no tokens limit applies
    limiter = RateLimiter(
        limits=limits, store=bucket_store, clock=clock, settle_all=ledger is not None
    )
    servicer = service.RateLimitService(
        limiter, metrics, failure_mode=config.store.failure_mode, clock=clock, ledger=ledger
    )
    runtime = ServerRuntime(
        name="maas-ratelimit",
        grpc_addr=config.server.grpc_addr,
        http_addr=config.server.http_addr,
        services=[GrpcService(service.SERVICE_NAME, servicer.register)],
        registry=registry,
        drain_timeout=config.server.drain_timeout,
        background=[
            *([watched.watch] if watched else []),
            *([ledger.run] if ledger else []),
        ],
        on_close=[*([ledger.close] if ledger else []), bucket_store.close],
        grpc_tls=config.server.tls,
    )
    return RateLimitApp(config, runtime, limiter, bucket_store, registry, ledger)


def build_ledger(
    config: RateLimitConfig,
    base_dir: Path,
    registry: CollectorRegistry,
    clock: Clock,
    limits: Callable[[], LimitTable],
) -> UsageLedger | None:
    """The usage ledger's writer, its journal opened (and locked) now: a journal another process
    holds is a start-up error."""
    section = config.ledger
    if section is None:
        return None
    journal = UsageJournal(
        resolve_path(base_dir, section.spool_dir), max_bytes=section.spool_max_bytes
    )
    journal.open()
    return UsageLedger(
        journal,
        section.open(base_dir, "maas-ratelimit"),
        registry,
        clock=clock,
        prices=lambda: limits().price_for,
        batch_size=section.batch_size,
        flush_interval=section.flush_interval,
        drain_timeout=section.drain_timeout,
    )
