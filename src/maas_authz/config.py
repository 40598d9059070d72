"""The maas-authz configuration file; docs/configuration.md documents every key and default."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from maas_authz.model_path import PathTemplate, is_namespace_name
from maas_common.config import Address, Duration, PositiveDuration, StrictModel, parse_address
from maas_common.ledger.settings import LedgerDatabaseSection
from maas_common.periods import TimeZoneName
from maas_common.postgres import has_password
from maas_common.settings import ServerSection
from maas_common.tls import ClientTlsSection
from maas_ratelimit.config import LedgerSection, LimitsSection, StoreSection

MAX_WORKERS = 64


class AuthzServerSection(ServerSection):
    grpc_addr: Address = "0.0.0.0:50051"
    http_addr: Address = "0.0.0.0:8081"
    # POST /admin/purge, off unless set; keep it on loopback (127.0.0.1:8091): kubectl
    # port-forward still reaches it, the network does not
    admin_addr: Address | None = None
    # the operator API and console (admin: section), off unless set; never the public gateway:
    # loopback, or a Service only operators reach (`make demo`: 127.0.0.1:8090)
    admin_api_addr: Address | None = None
    # processes serving grpc_addr together (SO_REUSEPORT) under a supervisor that owns the HTTP
    # and admin listeners; 1 = this process serves, as ever (docs/operations.md, "Worker processes")
    workers: int = 1

    @field_validator("workers", mode="before")
    @classmethod
    def _workers_is_a_number(cls, value: object) -> object:
        if isinstance(value, bool):  # pydantic would take `true` for 1
            raise ValueError(f"expected a whole number from 1 to {MAX_WORKERS}, got {value!r}")
        return value

    @field_validator("workers")
    @classmethod
    def _workers_in_range(cls, value: int, info: ValidationInfo) -> int:
        if not 1 <= value <= MAX_WORKERS:
            raise ValueError(f"expected a whole number from 1 to {MAX_WORKERS}, got {value}")
        grpc_addr = info.data.get("grpc_addr")
        if value > 1 and grpc_addr is not None and parse_address(grpc_addr)[1] == 0:
            raise ValueError(
                f"more than 1 worker needs a fixed port in server.grpc_addr ({grpc_addr}): "
                "each worker binds it, and port 0 would give each its own port"
            )
        return value


class IdentityCacheSection(StrictModel):
    ttl: Duration = 600.0  # as MaaS configured Authorino's TokenReview cache
    negative_ttl: Duration = 10.0
    max_entries: int = Field(100_000, ge=1)


class AccessCacheSection(StrictModel):
    ttl: Duration = 60.0  # as MaaS configured Authorino's SubjectAccessReview cache
    negative_ttl: Duration = 5.0
    max_entries: int = Field(100_000, ge=1)


class KubernetesSection(StrictModel):
    kubeconfig: Path | None = None  # unset: in-cluster service account credentials
    context: str | None = None
    timeout: PositiveDuration = 0.4  # per call; keep 2x below Envoy's ext_authz timeout
    max_concurrency: int = Field(32, ge=1, le=4096)


class StaticKeysSection(StrictModel):
    keys_file: Path
    reload_interval: PositiveDuration = 2.0


class IdentitySection(StrictModel):
    source: Literal["kubernetes", "static"] = "kubernetes"
    audiences: list[str] = Field(default_factory=lambda: ["maas-default-gateway-sa"])
    static: StaticKeysSection | None = None
    cache: IdentityCacheSection = IdentityCacheSection()
    max_token_length: int = Field(8192, ge=16, le=65536)

    @model_validator(mode="after")
    def _static_needs_keys(self) -> IdentitySection:
        if self.source == "static" and self.static is None:
            raise ValueError("source 'static' needs static.keys_file")
        return self


class ConfigMapKeySection(StrictModel):
    namespace: str
    name: str
    key: str = "tiers"


class TiersSection(StrictModel):
    file: Path | None = None  # unset: the platform's default free/premium/enterprise tiers
    instance: str = "maas-default-gateway"
    reload_interval: PositiveDuration = 2.0
    # the ConfigMap `file` is mounted from (the platform's tier-to-group-mapping): policy edits
    # from the operator API are applied to it; unset: to the file itself
    configmap: ConfigMapKeySection | None = None


class OpenPathSection(StrictModel):
    path: str
    match: Literal["exact", "prefix"] = "exact"
    authenticate: bool = True

    @field_validator("path")
    @classmethod
    def _absolute(cls, value: str) -> str:
        if not value.startswith("/"):
            raise ValueError("must start with '/'")
        return value


class ModelsSection(StrictModel):
    path_template: str = "/{namespace}/{model}"
    default_namespace: str | None = None
    open_paths: list[OpenPathSection] = Field(default_factory=list)
    # paths whose model is the JSON body's `model` (OpenAI style), as upstream MaaS routes them
    body_routes: list[str] = Field(
        default_factory=lambda: ["/v1/chat/completions", "/v1/completions"]
    )

    @field_validator("body_routes")
    @classmethod
    def _body_routes_absolute(cls, value: list[str]) -> list[str]:
        for path in value:
            if not path.startswith("/") or "?" in path:
                raise ValueError(f"{path!r} must be a path starting with '/', without a query")
        return value

    @model_validator(mode="after")
    def _template_is_usable(self) -> ModelsSection:
        try:
            PathTemplate(self.path_template, self.default_namespace)
        except ValueError as exc:
            raise ValueError(f"path_template {self.path_template!r} {exc}") from None
        if self.default_namespace is not None and not is_namespace_name(self.default_namespace):
            raise ValueError(
                f"default_namespace {self.default_namespace!r} is not a namespace name"
            )
        return self


class GrantSection(StrictModel):
    models: list[str] = Field(min_length=1)  # "namespace/name", "namespace/*" or "*"
    groups: list[str] = Field(default_factory=list)
    users: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _names_someone(self) -> GrantSection:
        if not self.groups and not self.users:
            raise ValueError("a grant needs groups or users")
        for model in self.models:
            if model != "*" and model.count("/") != 1:
                raise ValueError(f"model {model!r} must be 'namespace/name', 'namespace/*' or '*'")
        return self


class AccessSection(StrictModel):
    source: Literal["kubernetes", "static"] = "kubernetes"
    verb: str = "post"
    group: str = "serving.kserve.io"
    resource: str = "llminferenceservices"
    static_grants: list[GrantSection] = Field(default_factory=list)
    cache: AccessCacheSection = AccessCacheSection()


class AuthorizationSection(StrictModel):
    # tiers: tier-to-group-mapping + SubjectAccessReview (MaaS's old flow), as ever;
    # subscriptions: MaaSAuthPolicy access + MaaSSubscription selection for every credential;
    # both: sk-oai- API keys take the subscription flow, every other credential the tier flow
    mode: Literal["tiers", "subscriptions", "both"] = "tiers"


class SubscriptionsSection(StrictModel):
    # kubernetes: list and watch the three CRDs; file: the same objects as YAML documents
    source: Literal["kubernetes", "file"] = "kubernetes"
    file: Path | None = None
    reload_interval: PositiveDuration = 2.0
    watch_timeout: int = Field(300, ge=10, le=3600)  # seconds the API server keeps a watch open

    @model_validator(mode="after")
    def _file_needs_path(self) -> SubscriptionsSection:
        if self.source == "file" and self.file is None:
            raise ValueError(
                "source 'file' needs file: (MaaSModelRef/MaaSAuthPolicy/MaaSSubscription documents)"
            )
        return self


class PostgresSection(StrictModel):
    # maas-api's database; no password here: password_file (a mounted Secret), re-read at each
    # connect, or the libpq environment (PGPASSWORD, PGPASSFILE)
    dsn: str
    password_file: Path | None = None
    tenant: str = "models-as-a-service"  # maas-api's tenant column, as its lookups filter
    max_connections: int = Field(8, ge=1, le=256)
    timeout: PositiveDuration = 0.5  # per lookup, including the wait for a free connection
    connect_timeout: PositiveDuration = 2.0

    @field_validator("dsn")
    @classmethod
    def _dsn(cls, value: str) -> str:
        if not value.startswith(("postgresql://", "postgres://")):
            raise ValueError(
                f"expected a postgresql:// URL, got {value.rsplit('@', maxsplit=1)[-1]!r}"
            )
        if has_password(value):
            raise ValueError("keep the password out of the DSN: use password_file")
        return value


class MaasApiSection(StrictModel):
    url: str  # e.g. http://maas-api.maas-api.svc:8080; POST /internal/v1/api-keys/validate
    timeout: PositiveDuration = 0.5
    max_concurrency: int = Field(32, ge=1, le=4096)

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError(f"expected an http:// or https:// URL, got {value!r}")
        return value


class KeyCacheSection(StrictModel):
    ttl: Duration = 1.0  # a key revoked in the database stops working within this (+ a lookup)
    negative_ttl: Duration = 1.0
    stale_if_error: Duration = 30.0  # a key valid this recently keeps working while the store fails
    max_entries: int = Field(100_000, ge=1)


class ApiKeysSection(StrictModel):
    # file: maas-api's api_keys rows as YAML, hashes only (demo, clusterless);
    # postgresql: maas-api's table, read-only; maas-api: its validate endpoint over HTTP
    source: Literal["file", "postgresql", "maas-api"] = "file"
    file: Path | None = None
    reload_interval: PositiveDuration = 1.0
    postgresql: PostgresSection | None = None
    maas_api: MaasApiSection | None = None
    cache: KeyCacheSection = KeyCacheSection()

    @model_validator(mode="after")
    def _source_has_settings(self) -> ApiKeysSection:
        if self.source == "file" and self.file is None:
            raise ValueError("source 'file' needs file:")
        if self.source == "postgresql" and self.postgresql is None:
            raise ValueError("source 'postgresql' needs a postgresql: section (at least dsn)")
        if self.source == "maas-api" and self.maas_api is None:
            raise ValueError("source 'maas-api' needs a maas_api: section (at least url)")
        return self


class RateLimitSection(StrictModel):
    # remote (the two-server topology): maas-ratelimit at `target` serves Envoy's rate limit
    # filter, and /v1/quota and explain peek at it (consuming nothing).
    # inline (the one-hop topology, envoy/gateway-one-hop.yaml): this process admits, reserves
    # and charges itself, with maas-ratelimit's limiter on `limits`, `store` and `ledger`
    # (maas-ratelimit's own sections, the same keys and defaults)
    mode: Literal["remote", "inline"] = "remote"
    target: str | None = None
    domain: str = "maas"  # as the Envoy rate limit filter's `domain`
    timeout: PositiveDuration = 0.5
    max_concurrency: int = Field(16, ge=1, le=1024)
    tls: ClientTlsSection | None = None  # maas-ratelimit serves TLS (its server.tls)
    limits: LimitsSection = LimitsSection()
    store: StoreSection = StoreSection()
    ledger: LedgerSection | None = None

    @model_validator(mode="after")
    def _parts_of_the_mode(self) -> RateLimitSection:
        # by value, not by the keys given: a worker validates the supervisor's full dump
        if self.mode == "inline":
            extra = [k for k in ("target", "tls") if getattr(self, k) is not None]
            if extra:
                raise ValueError(f"mode 'inline' limits in this process: remove {extra}")
        else:
            extra = [
                key
                for key, default in (
                    ("limits", LimitsSection()),
                    ("store", StoreSection()),
                    ("ledger", None),
                )
                if getattr(self, key) != default
            ]
            if extra:
                raise ValueError(
                    f"{extra} configure mode 'inline' (the one-hop topology); mode 'remote' "
                    "leaves them to maas-ratelimit"
                )
        return self

    @property
    def inline(self) -> bool:
        return self.mode == "inline"


class QuotaSection(StrictModel):
    # answered in Check for callers with their own credentials; needs ratelimit.target
    path: str = "/v1/quota"

    @field_validator("path")
    @classmethod
    def _quota_path(cls, value: str) -> str:
        if not value.startswith("/") or "?" in value or value.endswith("/"):
            raise ValueError(f"{value!r} must be a path starting with '/', without a query")
        return value


class AdminAuthSection(StrictModel):
    # kubernetes: TokenReview, then a SubjectAccessReview of `verb` (get to read, update to
    # change: purge, policy edits) on group/resource; keys: a file of admin key hashes
    source: Literal["kubernetes", "keys"] = "kubernetes"
    keys_file: Path | None = None
    group: str = "maas.opendatahub.io"
    resource: str = "gatewayadmin"
    namespace: str = ""  # "" = a cluster-wide permission
    audiences: list[str] = Field(default_factory=list)  # [] = the API server's own

    @model_validator(mode="after")
    def _keys_need_a_file(self) -> AdminAuthSection:
        if self.source == "keys" and self.keys_file is None:
            raise ValueError("source 'keys' needs keys_file:")
        return self


class PeersSection(StrictModel):
    # the replicas of this maas-authz, each holding its own decisions and caches: the operator
    # API asks them all (decisions, purge). dns: the headless Service (one address per ready
    # pod), with `port` their server.admin_api_addr port; and/or fixed host:port addresses
    dns: str | None = None
    port: int = Field(8090, ge=1, le=65535)
    addresses: list[Address] = Field(default_factory=list)
    timeout: PositiveDuration = 2.0

    @model_validator(mode="after")
    def _names_some(self) -> PeersSection:
        if not self.dns and not self.addresses:
            raise ValueError("peers needs dns (a headless Service) or addresses")
        return self


class AdminSection(StrictModel):
    # the operator API and console, served on server.admin_api_addr (docs/operations.md)
    auth: AdminAuthSection = AdminAuthSection()
    decisions: int = Field(2000, ge=10, le=1_000_000)  # recent decisions kept in memory
    max_followers: int = Field(32, ge=1, le=1024)  # live decision streams at once
    peers: PeersSection | None = None  # unset: this process is the only replica


class UsageSection(LedgerDatabaseSection):
    # the usage ledger maas-ratelimit writes, read by the operator API (GET /admin/v1/usage)
    timezone: TimeZoneName = "UTC"  # of dates, months and days in queries, unless tz= says


class ResponseSection(StrictModel):
    forward_authorization: bool = False
    retry_after: int = Field(5, ge=1, le=3600)  # seconds, sent with 503


class AuthzConfig(StrictModel):
    server: AuthzServerSection = AuthzServerSection()
    identity: IdentitySection = IdentitySection()
    tiers: TiersSection = TiersSection()
    models: ModelsSection = ModelsSection()
    access: AccessSection = AccessSection()
    kubernetes: KubernetesSection = KubernetesSection()
    response: ResponseSection = ResponseSection()
    authorization: AuthorizationSection = AuthorizationSection()
    subscriptions: SubscriptionsSection = SubscriptionsSection()
    api_keys: ApiKeysSection | None = None
    ratelimit: RateLimitSection = RateLimitSection()
    quota: QuotaSection = QuotaSection()
    admin: AdminSection = AdminSection()
    usage: UsageSection | None = None

    @model_validator(mode="after")
    def _operator_api_in_one_process(self) -> AuthzConfig:
        if self.server.admin_api_addr is not None and self.server.workers > 1:
            raise ValueError(
                "server.admin_api_addr (the operator API) keeps its decisions in one process: "
                f"it needs server.workers 1, not {self.server.workers}"
            )
        return self

    @model_validator(mode="after")
    def _inline_limits_shared_by_workers(self) -> AuthzConfig:
        if (
            self.ratelimit.inline
            and self.server.workers > 1
            and (self.ratelimit.store.type == "memory" or self.ratelimit.ledger is not None)
        ):
            raise ValueError(
                "ratelimit.mode 'inline' with server.workers > 1 needs ratelimit.store.type "
                "'redis' (a memory store is one process's) and no ratelimit.ledger (its journal "
                f"is one process's); or server.workers 1, not {self.server.workers}"
            )
        return self

    @model_validator(mode="after")
    def _subscription_flow_needs_its_parts(self) -> AuthzConfig:
        if self.authorization.mode == "tiers":
            return self
        if self.api_keys is None and self.authorization.mode == "both":
            raise ValueError("authorization.mode 'both' routes sk-oai- keys: it needs api_keys:")
        return self

    def uses_subscriptions(self) -> bool:
        return self.authorization.mode != "tiers"

    def uses_kubernetes(self) -> bool:
        return (
            self.identity.source == "kubernetes"
            or self.access.source == "kubernetes"
            or (self.uses_subscriptions() and self.subscriptions.source == "kubernetes")
        )
