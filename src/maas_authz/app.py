"""Wiring: configuration -> identity source, tiers, access reviewer, pipeline, gRPC server."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry

from maas_authz import access_log as access_log_service
from maas_authz import service
from maas_authz.access import AccessReviewer, Grant, StaticAccessReviewer
from maas_authz.access_log import AccessLogService
from maas_authz.admin_api import OperatorApi
from maas_authz.admin_auth import (
    AdminAuthenticator,
    AdminKeys,
    AdminVerdict,
    KubernetesAdmins,
    Verb,
    parse_admin_keys,
)
from maas_authz.api_key_maas_api import MaasApiKeyValidator
from maas_authz.api_key_postgres import PostgresApiKeys
from maas_authz.api_key_store import ApiKeyFile, ApiKeyVerifier, parse_api_key_file
from maas_authz.api_keys import KeyValidator
from maas_authz.caching import CachedAccessReviewer, CachedKeyValidator, CachedTokenReviewer
from maas_authz.check import CheckLimits, CheckPipeline
from maas_authz.config import ApiKeysSection, AuthzConfig
from maas_authz.decisions import DecisionLog
from maas_authz.explain import Explainer
from maas_authz.identity import Identity, TokenReviewer
from maas_authz.kube_reviews import ResourceCheck
from maas_authz.kubernetes import (
    KubernetesApi,
    KubernetesWatchTransport,
    SubjectAccessReviewer,
    TokenReviewReviewer,
)
from maas_authz.metrics import AuthzMetrics
from maas_authz.model_path import OpenPath, PathRouting, PathTemplate
from maas_authz.one_hop import InlineLimits
from maas_authz.peers import Peers
from maas_authz.policy_edit import (
    ConfigMapStore,
    EditablePart,
    FileStore,
    ObjectsStore,
    PolicyEditor,
    PolicyStore,
)
from maas_authz.policy_view import PolicyView
from maas_authz.quota import Peeker, QuotaEndpoint, RateLimitPeeker
from maas_authz.static_keys import StaticKeyReviewer, parse_static_keys
from maas_authz.subscription_check import SubscriptionFlow
from maas_authz.subscription_file import parse_subscription_file
from maas_authz.subscription_watch import SubscriptionWatch
from maas_authz.subscriptions import SubscriptionCatalog
from maas_authz.tiers import DEFAULT_TIERS, TierMapping, parse_tier_document
from maas_authz.usage_api import UsageApi
from maas_common.clock import Clock, SystemClock
from maas_common.config import password_reader, resolve_path
from maas_common.errors import BackendUnavailable, ConfigError
from maas_common.metrics import new_registry, reload_observer
from maas_common.reload import WatchedFile
from maas_common.server import GrpcService, HttpSite, Readiness, ServerRuntime
from maas_common.settings import CommandLine, load_server_config
from maas_common.tls import ReloadingClientChannel
from maas_ratelimit.app import Limiting, build_limiting

log = logging.getLogger(__name__)


def load_config(command_line: CommandLine) -> AuthzConfig:
    return load_server_config(AuthzConfig, command_line)


class _ReloadingKeys:
    """The static key file, re-read when it changes, so removing a key revokes it."""

    def __init__(self, watched: WatchedFile[StaticKeyReviewer]) -> None:
        self._watched = watched

    async def review(self, token: str) -> Identity | None:
        return await self._watched.value.review(token)


@dataclass
class AuthzApp:
    config: AuthzConfig
    runtime: ServerRuntime
    pipeline: CheckPipeline
    registry: CollectorRegistry
    identity_cache: CachedTokenReviewer | None = None
    access_cache: CachedAccessReviewer | None = None
    watched: list[WatchedFile[Any]] = field(default_factory=list)


def _watch(
    path: Path,
    parse: Callable[[str, str], Any],
    name: str,
    interval: float,
    metrics: AuthzMetrics,
) -> WatchedFile[Any]:
    watched: WatchedFile[Any] = WatchedFile(
        path,
        parse,
        name=name,
        interval=interval,
        on_reload=reload_observer(metrics.config_reloads, name),
    )
    watched.load()
    return watched


def load_tiers(config: AuthzConfig, base_dir: Path) -> TierMapping:
    section = config.tiers
    if section.file is None:
        return parse_tier_document(DEFAULT_TIERS, "built-in tiers", section.instance)
    path = resolve_path(base_dir, section.file)
    return WatchedFile(
        path, lambda text, src: parse_tier_document(text, src, section.instance), name="tiers"
    ).load()


def check_config(config: AuthzConfig, base_dir: Path) -> str:
    """--check-config: load every file the config names, as start-up would, and summarise."""
    mapping = load_tiers(config, base_dir)
    lines = [f"tiers: {', '.join(mapping.names())}"]
    if config.identity.source == "static":
        assert config.identity.static is not None
        path = resolve_path(base_dir, config.identity.static.keys_file)
        keys = WatchedFile(path, parse_static_keys, name="static keys").load()
        lines.append(f"identity: static, {len(keys)} key(s) from {path}")
    else:
        lines.append(f"identity: kubernetes TokenReview, audiences {config.identity.audiences}")
    if config.uses_kubernetes() and config.kubernetes.kubeconfig is not None:
        kubeconfig = resolve_path(base_dir, config.kubernetes.kubeconfig)
        if not kubeconfig.is_file():
            raise ConfigError(str(kubeconfig), "kubernetes.kubeconfig", "file does not exist")
    lines.append(f"access: {config.access.source}")
    lines.append(f"authorization: {config.authorization.mode}")
    if config.uses_subscriptions():
        subs = config.subscriptions
        if subs.source == "file":
            assert subs.file is not None
            path = resolve_path(base_dir, subs.file)
            catalog = WatchedFile(path, parse_subscription_file, name="subscriptions").load()
            lines.append(
                f"subscriptions: {len(catalog.subscriptions)} subscription(s), "
                f"{len(catalog.policies)} auth policy(ies), {len(catalog.models)} model(s) "
                f"from {path}"
            )
        else:
            lines.append("subscriptions: watched in the cluster")
        if config.api_keys is not None and config.api_keys.file is not None:
            path = resolve_path(base_dir, config.api_keys.file)
            api_keys = WatchedFile(path, parse_api_key_file, name="api keys").load()
            lines.append(f"api keys: {len(api_keys)} key(s) from {path}")
    if config.usage is not None:  # checked by the config model, not connected
        lines.append(f"usage ledger: {config.usage.engine} (read by the operator API)")
    lines.append("configuration OK")
    return "\n".join(lines)


def _build_tiers(
    config: AuthzConfig, base_dir: Path, metrics: AuthzMetrics
) -> tuple[Callable[[], TierMapping], WatchedFile[Any] | None]:
    if config.tiers.file is None:
        mapping = load_tiers(config, base_dir)
        return (lambda: mapping), None
    instance = config.tiers.instance
    tier_file = _watch(
        resolve_path(base_dir, config.tiers.file),
        lambda text, src: parse_tier_document(text, src, instance),
        "tiers",
        config.tiers.reload_interval,
        metrics,
    )
    # a callable, so every Check reads the mapping in force at that moment
    return (lambda: tier_file.value), tier_file


def _build_identities(
    config: AuthzConfig,
    base_dir: Path,
    api: KubernetesApi | None,
    clock: Clock,
    metrics: AuthzMetrics,
) -> tuple[TokenReviewer, CachedTokenReviewer | None, WatchedFile[Any] | None]:
    if config.identity.source == "static":
        static = config.identity.static
        assert static is not None
        keys = _watch(
            resolve_path(base_dir, static.keys_file),
            parse_static_keys,
            "static_keys",
            static.reload_interval,
            metrics,
        )
        # in memory and cheap: no cache in front, so removing a key revokes it at the next reload
        return _ReloadingKeys(keys), None, keys
    assert api is not None
    cache = config.identity.cache
    cached = CachedTokenReviewer(
        TokenReviewReviewer(api, config.identity.audiences),
        ttl=cache.ttl,
        negative_ttl=cache.negative_ttl,
        max_entries=cache.max_entries,
        clock=clock,
        on_event=metrics.cache_observer("identity"),
    )
    return cached, cached, None


def _build_access(
    config: AuthzConfig, api: KubernetesApi | None, clock: Clock, metrics: AuthzMetrics
) -> tuple[AccessReviewer, CachedAccessReviewer | None]:
    if config.access.source == "static":
        grants = (
            Grant(frozenset(g.models), frozenset(g.groups), frozenset(g.users))
            for g in config.access.static_grants
        )
        return StaticAccessReviewer(grants), None
    assert api is not None
    cache = config.access.cache
    check = ResourceCheck(config.access.verb, config.access.group, config.access.resource)
    cached = CachedAccessReviewer(
        SubjectAccessReviewer(api, check),
        ttl=cache.ttl,
        negative_ttl=cache.negative_ttl,
        max_entries=cache.max_entries,
        clock=clock,
        on_event=metrics.cache_observer("access"),
    )
    return cached, cached


@dataclass
class _Subscriptions:
    flow: SubscriptionFlow
    catalog: Callable[[], SubscriptionCatalog]
    source: str
    watched: list[WatchedFile[Any]]
    background: list[Callable[[], Coroutine[Any, Any, None]]]
    key_cache: CachedKeyValidator | None
    closers: list[Callable[[], Awaitable[None]]]


def _build_subscriptions(
    config: AuthzConfig,
    base_dir: Path,
    api: KubernetesApi | None,
    clock: Clock,
    metrics: AuthzMetrics,
    *,
    readiness: Callable[[], Readiness],
) -> _Subscriptions:
    section = config.subscriptions
    watched: list[WatchedFile[Any]] = []
    background: list[Callable[[], Coroutine[Any, Any, None]]] = []
    catalog: Callable[[], SubscriptionCatalog]
    if section.source == "file":
        assert section.file is not None
        catalog_file = _watch(
            resolve_path(base_dir, section.file),
            parse_subscription_file,
            "subscriptions",
            section.reload_interval,
            metrics,
        )
        watched.append(catalog_file)
        catalog = lambda: catalog_file.value  # noqa: E731
    else:
        assert api is not None
        transport = KubernetesWatchTransport(
            api,
            list_timeout=max(5.0, config.kubernetes.timeout),
            watch_seconds=section.watch_timeout,
        )
        watch = SubscriptionWatch(
            transport,
            on_problem=metrics.object_skipped,
            on_error=metrics.watch_error,
        )

        async def run_watch() -> None:
            # not ready until every kind is listed: an empty catalog would deny everyone
            running = asyncio.create_task(watch.run(), name="subscription-watch")
            try:
                await watch.wait_synced()
                readiness().set("subscriptions", True)
                await running
            finally:
                # wait for the informers to close their streams before the API client closes
                running.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await running
                await transport.wait_closed()

        def current() -> SubscriptionCatalog:
            if not watch.synced:
                raise BackendUnavailable(
                    "kubernetes", "not_synced", "the subscription objects are not listed yet"
                )
            return watch.catalog

        background.append(run_watch)
        catalog = current
    keys, key_cache, closers = (
        _build_api_keys(config.api_keys, base_dir, clock, metrics, watched)
        if config.api_keys is not None
        else (None, None, [])
    )
    flow = SubscriptionFlow(
        catalog=catalog,
        keys=keys,
        for_tokens=config.authorization.mode == "subscriptions",
        default_namespace=config.models.default_namespace,
    )
    source = (
        f"file {resolve_path(base_dir, section.file)}"
        if section.source == "file" and section.file is not None
        else "the cluster's MaaSModelRef, MaaSAuthPolicy and MaaSSubscription objects (watched)"
    )
    return _Subscriptions(flow, catalog, source, watched, background, key_cache, closers)


def _build_api_keys(
    section: ApiKeysSection,
    base_dir: Path,
    clock: Clock,
    metrics: AuthzMetrics,
    watched: list[WatchedFile[Any]],
) -> tuple[KeyValidator, CachedKeyValidator | None, list[Callable[[], Awaitable[None]]]]:
    """sk-oai- key validation from its source; a database or maas-api behind a short cache."""
    if section.source == "file":
        assert section.file is not None
        key_file: WatchedFile[ApiKeyFile] = _watch(
            resolve_path(base_dir, section.file),
            parse_api_key_file,
            "api_keys",
            section.reload_interval,
            metrics,
        )
        watched.append(key_file)
        # in memory: no cache in front, so a key file edit applies at the next reload
        return ApiKeyVerifier(lambda: key_file.value, clock), None, []
    inner: KeyValidator
    closers: list[Callable[[], Awaitable[None]]] = []
    if section.source == "postgresql":
        pg = section.postgresql
        assert pg is not None
        store = PostgresApiKeys(
            pg.dsn,
            password=password_reader(resolve_path(base_dir, pg.password_file))
            if pg.password_file
            else lambda: None,
            tenant=pg.tenant,
            max_connections=pg.max_connections,
            timeout=pg.timeout,
            connect_timeout=pg.connect_timeout,
            observe=metrics.key_lookup_observer("postgresql"),
        )
        inner = ApiKeyVerifier(lambda: store, clock)
        closers.append(store.close)
    else:
        api = section.maas_api
        assert api is not None
        validator = MaasApiKeyValidator(
            api.url,
            timeout=api.timeout,
            max_concurrency=api.max_concurrency,
            observe=metrics.key_lookup_observer("maas-api"),
        )
        inner = validator
        closers.append(validator.close)
    cache = section.cache
    cached = CachedKeyValidator(
        inner,
        ttl=cache.ttl,
        negative_ttl=cache.negative_ttl,
        stale_if_error=cache.stale_if_error,
        max_entries=cache.max_entries,
        clock=clock,
        on_event=metrics.cache_observer("api_keys"),
        on_stale=metrics.stale_key_served,
    )
    return cached, cached, closers


async def build_app(
    config: AuthzConfig,
    base_dir: Path,
    *,
    clock: Clock | None = None,
    registry: CollectorRegistry | None = None,
) -> AuthzApp:
    clock = clock or SystemClock()
    registry = registry or new_registry()
    metrics = AuthzMetrics(registry)

    tiers, tier_file = _build_tiers(config, base_dir, metrics)
    api: KubernetesApi | None = None
    admin_needs_api = config.server.admin_api_addr is not None and (
        config.admin.auth.source == "kubernetes" or config.tiers.configmap is not None
    )
    if config.uses_kubernetes() or admin_needs_api:
        kube = config.kubernetes
        api = await KubernetesApi.connect(
            kubeconfig=resolve_path(base_dir, kube.kubeconfig) if kube.kubeconfig else None,
            context=kube.context,
            call_timeout=kube.timeout,
            max_concurrency=kube.max_concurrency,
            observe=metrics.observe_kubernetes,
        )
    identities, identity_cache, key_file = _build_identities(config, base_dir, api, clock, metrics)
    access, access_cache = _build_access(config, api, clock, metrics)
    watched = [w for w in (tier_file, key_file) if w is not None]
    runtime: ServerRuntime | None = None

    def readiness() -> Readiness:
        assert runtime is not None
        return runtime.readiness

    subscriptions = (
        _build_subscriptions(config, base_dir, api, clock, metrics, readiness=readiness)
        if config.uses_subscriptions()
        else None
    )
    if subscriptions is not None:
        watched += subscriptions.watched

    models = config.models
    routing = PathRouting(
        PathTemplate(models.path_template, models.default_namespace),
        tuple(OpenPath(p.path, p.match, p.authenticate) for p in models.open_paths),
        frozenset(p.rstrip("/") or "/" for p in models.body_routes),
    )
    pipeline = CheckPipeline(
        routing=routing,
        identities=identities,
        tiers=tiers,
        access=access,
        limits=CheckLimits(config.identity.max_token_length, config.response.retry_after),
        clock=clock,
        subscriptions=subscriptions.flow if subscriptions else None,
        default_namespace=models.default_namespace,
    )
    limiting = _build_limiting(config, base_dir, registry, clock, metrics)
    inline = (
        InlineLimits(limiting.accounting, retry_after=config.response.retry_after)
        if limiting
        else None
    )
    peeker: Peeker | None = inline or _build_peeker(config)
    servicer = service.AuthorizationService(
        pipeline,
        metrics,
        forward_authorization=config.response.forward_authorization,
        quota=QuotaEndpoint(pipeline, peeker, config.quota.path) if peeker else None,
        limits=inline,
    )
    decisions = DecisionLog(config.admin.decisions, max_readers=config.admin.max_followers)
    access_log = AccessLogService(
        decisions, lambda result: metrics.access_log_entries.labels(result).inc(), charges=inline
    )

    key_cache = subscriptions.key_cache if subscriptions else None

    async def purge(request: web.Request) -> web.Response:
        username = request.query.get("user")
        return web.json_response(_purge(identity_cache, access_cache, key_cache, username))

    policy = PolicyView(
        config,
        tiers,
        str(resolve_path(base_dir, config.tiers.file)) if config.tiers.file else "built-in",
        subscriptions.catalog if subscriptions else None,
        subscriptions.source if subscriptions else "",
        peeker,
    )
    sites: list[HttpSite] = []
    peers = _build_peers(config)
    # the usage ledger, read by the operator API (maas-ratelimit writes it)
    usage_db = (
        config.usage.open(base_dir, "maas-authz")
        if config.usage and config.server.admin_api_addr
        else None
    )
    if config.server.admin_api_addr is not None:
        operator = OperatorApi(
            auth=_build_admin_auth(config, base_dir, api, metrics, watched),
            explainer=Explainer(pipeline, peeker),
            decisions=decisions,
            peeker=peeker,
            policy=policy.show,
            purge=lambda user: _purge(identity_cache, access_cache, key_cache, user),
            tier_of_groups=policy.tier_of,
            editor=PolicyEditor(_editable_parts(config, base_dir, api, tier_file, subscriptions)),
            token_limits_of=policy.token_limits_of,
            on_request=lambda route, outcome: metrics.admin_requests.labels(route, outcome).inc(),
            peers=peers,
            usage=UsageApi(usage_db, config.usage.timezone) if usage_db and config.usage else None,
        )
        sites.append(
            HttpSite(
                config.server.admin_api_addr,
                operator.routes(),
                "server.admin_api_addr",
                tls=config.server.tls,
            )
        )

    async def close_decisions() -> None:
        decisions.close()  # ends live streams first, so the listener closes at once

    runtime = ServerRuntime(
        name="maas-authz",
        grpc_addr=config.server.grpc_addr,
        http_addr=config.server.http_addr,
        services=[
            GrpcService(service.SERVICE_NAME, servicer.register),
            GrpcService(access_log_service.SERVICE_NAME, access_log.register),
        ],
        sites=sites,
        registry=registry,
        drain_timeout=config.server.drain_timeout,
        shutdown_delay=config.server.shutdown_delay,
        background=[
            *(w.watch for w in watched),
            *(subscriptions.background if subscriptions else ()),
            *(limiting.background if limiting else ()),
        ],
        # one hop: the access log streams stay open through the drain (they carry the charges
        # of requests that finish meanwhile); the drain's end closes them
        on_drain=[close_decisions, *([] if inline else [access_log.close])],
        grpc_tls=config.server.tls,
        on_close=[
            *(limiting.on_close if limiting else ()),
            *([api.close] if api else []),
            *([peeker.close] if peeker else []),
            *([peers.close] if peers else []),
            *([usage_db.close] if usage_db else []),
            *(subscriptions.closers if subscriptions else ()),
        ],
        admin_addr=config.server.admin_addr,
        admin_routes=[web.post("/admin/purge", purge)],
    )
    if subscriptions is not None and subscriptions.background:
        # not ready until the watch has listed every kind (run_watch sets it ready)
        runtime.readiness.set("subscriptions", False, "listing")
    return AuthzApp(config, runtime, pipeline, registry, identity_cache, access_cache, watched)


def _editable_parts(
    config: AuthzConfig,
    base_dir: Path,
    api: KubernetesApi | None,
    tier_file: WatchedFile[Any] | None,
    subscriptions: _Subscriptions | None,
) -> list[EditablePart]:
    """What the operator API may edit, each through its source of truth (policy_edit.py)."""
    parts: list[EditablePart] = []
    instance = config.tiers.instance
    tiers_store: PolicyStore | None = None
    if config.tiers.configmap is not None and api is not None:
        cm = config.tiers.configmap
        tiers_store = ConfigMapStore(api, cm.namespace, cm.name, cm.key)
    elif config.tiers.file is not None:
        tiers_store = FileStore(resolve_path(base_dir, config.tiers.file), tier_file)
    if tiers_store is not None:  # built-in tiers have no source to write to
        parts.append(
            EditablePart(
                "tiers", tiers_store, lambda text, src: parse_tier_document(text, src, instance)
            )
        )
    if subscriptions is not None:
        section = config.subscriptions
        store: PolicyStore | None = None
        if section.source == "file" and section.file is not None:
            watched = next((w for w in subscriptions.watched if w.name == "subscriptions"), None)
            store = FileStore(resolve_path(base_dir, section.file), watched)
        elif api is not None:
            store = ObjectsStore(api)
        if store is not None:
            parts.append(EditablePart("subscriptions", store, parse_subscription_file))
    return parts


def _build_peers(config: AuthzConfig) -> Peers | None:
    section = config.admin.peers
    if section is None or config.server.admin_api_addr is None:
        return None
    return Peers(
        dns=section.dns, port=section.port, addresses=section.addresses, timeout=section.timeout
    )


def _build_limiting(
    config: AuthzConfig,
    base_dir: Path,
    registry: CollectorRegistry,
    clock: Clock,
    metrics: AuthzMetrics,
) -> Limiting | None:
    """The one-hop topology's limiter (ratelimit.mode inline): maas-ratelimit's parts."""
    section = config.ratelimit
    if not section.inline:
        return None
    return build_limiting(
        section.limits,
        section.store,
        section.ledger,
        base_dir,
        registry=registry,
        clock=clock,
        process="maas-authz",
        config_reloads=metrics.config_reloads,
        key_prefix="ratelimit.",
    )


def _build_peeker(config: AuthzConfig) -> RateLimitPeeker | None:
    section = config.ratelimit
    if section.target is None:
        return None
    tls = ReloadingClientChannel(section.tls, section.target, "ratelimit") if section.tls else None
    return RateLimitPeeker(
        section.target,
        section.domain,
        timeout=section.timeout,
        max_concurrency=section.max_concurrency,
        tls=tls,
    )


class _ReloadingAdminKeys:
    def __init__(self, watched: WatchedFile[AdminKeys]) -> None:
        self._watched = watched

    async def check(self, token: str, verb: Verb) -> AdminVerdict:
        return await self._watched.value.check(token, verb)


def _build_admin_auth(
    config: AuthzConfig,
    base_dir: Path,
    api: KubernetesApi | None,
    metrics: AuthzMetrics,
    watched: list[WatchedFile[Any]],
) -> AdminAuthenticator:
    auth = config.admin.auth
    if auth.source == "keys":
        assert auth.keys_file is not None
        keys: WatchedFile[AdminKeys] = _watch(
            resolve_path(base_dir, auth.keys_file), parse_admin_keys, "admin_keys", 2.0, metrics
        )
        watched.append(keys)
        return _ReloadingAdminKeys(keys)
    assert api is not None
    return KubernetesAdmins(
        api,
        group=auth.group,
        resource=auth.resource,
        namespace=auth.namespace,
        audiences=auth.audiences,
    )


def _purge(
    identities: CachedTokenReviewer | None,
    access: CachedAccessReviewer | None,
    api_keys: CachedKeyValidator | None,
    username: str | None,
) -> dict[str, int]:
    """Drop cached identities, access decisions and API key verdicts (all, or one user's) for
    instant revocation."""
    counts = {"identities": 0, "access_decisions": 0, "api_keys": 0}
    if api_keys is not None:
        counts["api_keys"] = api_keys.forget_user(username) if username else api_keys.clear()
    if identities is not None:
        counts["identities"] = (
            identities.forget_user(username) if username else identities.cache.clear()
        )
    if access is not None:
        counts["access_decisions"] = (
            access.forget_user(username) if username else access.cache.clear()
        )
    log.info("caches purged", extra={"scope": "user" if username else "all", **counts})
    return counts
