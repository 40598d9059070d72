"""Subscriptions: who may call which model, under which subscription, with which token limits.

Today's MaaS flow (upstream maas-controller's CRDs, maas.opendatahub.io/v1alpha1) in three kinds:

- MaaSModelRef: a model the platform exposes, `<namespace>/<name>`;
- MaaSAuthPolicy: subjects (groups, users) allowed to call some model refs;
- MaaSSubscription: owners (groups, users) and, per model ref, token rate limits and a billing
  rate; a user may own several.

Pure: Kubernetes objects (as the API server returns them, plain mappings) in, decisions out. A
broken object becomes an `InvalidObject` naming it and the field, and is left out of the catalog;
the others still apply. Selection follows upstream maas-api's selector (`Select`): the requested
subscription (the client's `X-MaaS-Subscription`, or the one an API key is bound to) by
`namespace/name` or bare name, else the only subscription of the user that includes the model;
several is an error that asks for the header. `priority` orders candidates (a bare name that
exists in several namespaces picks the highest); upstream uses it again when minting an API key,
which is maas-api's business, not the gateway's.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any, Literal, TypeVar

from maas_authz.identity import Identity
from maas_authz.model_path import ModelRef, is_namespace_name, is_object_name
from maas_ratelimit.bucket import countable

T = TypeVar("T")

GROUP = "maas.opendatahub.io"
VERSION = "v1alpha1"
Kind = Literal["MaaSModelRef", "MaaSAuthPolicy", "MaaSSubscription"]
PLURALS: dict[Kind, str] = {
    "MaaSModelRef": "maasmodelrefs",
    "MaaSAuthPolicy": "maasauthpolicies",
    "MaaSSubscription": "maassubscriptions",
}

# the CRD's own pattern: 1 to 9999 seconds, minutes or hours (no days)
_WINDOW = re.compile(r"^([1-9]\d{0,3})(s|m|h)$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600}
MAX_TOKEN_LIMIT = 1_000_000_000
# the phases in which upstream lets a subscription serve inference; an object without a phase
# (no controller has reconciled it) is served too: we validated it ourselves
SERVING_PHASES = frozenset({"Active", "Degraded"})


@dataclass(frozen=True, slots=True)
class ObjectKey:
    kind: Kind
    namespace: str
    name: str

    def __str__(self) -> str:
        return f"{self.kind} {self.namespace}/{self.name}"


class InvalidObject(ValueError):
    """An object that cannot be used: which one, which field, and what was expected."""

    def __init__(self, key: ObjectKey | str, field: str, problem: str) -> None:
        super().__init__(f"{key}: {field}: {problem}")
        self.key = key
        self.field = field
        self.problem = problem


@dataclass(frozen=True, slots=True)
class ModelEntry:
    """A MaaSModelRef: `ref` is how requests and the other two kinds name it."""

    ref: ModelRef
    kind: str  # LLMInferenceService | ExternalModel
    target: str  # the LLMInferenceService's (or ExternalModel's) name


@dataclass(frozen=True, slots=True)
class AuthPolicy:
    key: ObjectKey
    models: frozenset[ModelRef]
    groups: frozenset[str]
    users: frozenset[str]

    def admits(self, identity: Identity) -> bool:
        return identity.username in self.users or not self.groups.isdisjoint(identity.groups)


@dataclass(frozen=True, slots=True)
class TokenRateLimit:
    limit: int
    window: str  # as written, e.g. "1m"
    window_seconds: int


@dataclass(frozen=True, slots=True)
class SubscribedModel:
    ref: ModelRef
    token_limits: tuple[TokenRateLimit, ...]
    billing_per_token: Decimal | None


@dataclass(frozen=True, slots=True)
class Subscription:
    key: ObjectKey
    groups: frozenset[str]
    users: frozenset[str]
    models: Mapping[ModelRef, SubscribedModel]
    priority: int = 0
    phase: str | None = None
    organization_id: str = ""
    cost_center: str = ""
    labels: Mapping[str, str] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.key.name

    @property
    def qualified_name(self) -> str:
        return f"{self.key.namespace}/{self.key.name}"

    @property
    def max_limit(self) -> int:
        return max((lim.limit for m in self.models.values() for lim in m.token_limits), default=0)

    def owned_by(self, identity: Identity) -> bool:
        return identity.username in self.users or not self.groups.isdisjoint(identity.groups)


# --- the answers -------------------------------------------------------------------------------

DenialCode = Literal[
    "unauthorized",
    "not_found",
    "access_denied",
    "multiple_subscriptions",
    "model_not_in_subscription",
    "model_unhealthy",
]


@dataclass(frozen=True, slots=True)
class SubscriptionDenied:
    """403 as upstream answers it: `message` is the body, `code` goes in x-ext-auth-reason."""

    code: DenialCode
    message: str


@dataclass(frozen=True, slots=True)
class Selection:
    subscription: Subscription
    model: SubscribedModel
    # what the request runs under, as the metadata hands it on (computed once per selection)
    terms: tuple[tuple[str, str], ...] = field(init=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "terms", _terms(self.subscription, self.model))


def token_limits_text(model: SubscribedModel) -> str:
    """The token limits as maas-ratelimit reads them (its `token_limits` descriptor entry):
    `limit/window_seconds`, comma-separated, e.g. `100/60,5000/3600`."""
    return ",".join(f"{lim.limit}/{lim.window_seconds}" for lim in model.token_limits)


def _terms(subscription: Subscription, model: SubscribedModel) -> tuple[tuple[str, str], ...]:
    terms = [
        ("subscription", subscription.qualified_name),
        ("subscription_name", subscription.name),
        ("token_limits", token_limits_text(model)),
    ]
    if model.billing_per_token is not None:
        # travels with the usage (the limiter's after-response descriptors), for budgets
        terms.append(("billing_rate", str(model.billing_per_token)))
    if subscription.organization_id:
        terms.append(("organization_id", subscription.organization_id))
    if subscription.cost_center:
        terms.append(("cost_center", subscription.cost_center))
    return tuple(terms)


NO_ACCESS = SubscriptionDenied("unauthorized", "Access denied")
NO_SUBSCRIPTION = SubscriptionDenied("not_found", "no matching subscription found for user")
UNKNOWN_SUBSCRIPTION = SubscriptionDenied("not_found", "requested subscription not found")
NOT_OWNER = SubscriptionDenied("access_denied", "access denied to requested subscription")
SEVERAL_SUBSCRIPTIONS = SubscriptionDenied(
    "multiple_subscriptions",
    "user has access to multiple subscriptions, must specify subscription using "
    "X-MaaS-Subscription header",
)


def _model_not_in(subscription: str, model: ModelRef) -> SubscriptionDenied:
    return SubscriptionDenied(
        "model_not_in_subscription", f"subscription {subscription} does not include model {model}"
    )


def _not_serving(phase: str) -> SubscriptionDenied:
    return SubscriptionDenied(
        "model_unhealthy", f"subscription is in {phase} phase (allowed: Active, Degraded)"
    )


# --- the catalog -------------------------------------------------------------------------------


@dataclass(frozen=True)
class SubscriptionCatalog:
    """One consistent snapshot of the three kinds; rebuilt whole when any object changes."""

    models: Mapping[ModelRef, ModelEntry]
    policies: tuple[AuthPolicy, ...]
    subscriptions: tuple[Subscription, ...]  # by priority, then max limit, then name

    @classmethod
    def build(
        cls,
        model_refs: Iterable[Mapping[str, Any]],
        auth_policies: Iterable[Mapping[str, Any]],
        subscriptions: Iterable[Mapping[str, Any]],
    ) -> tuple[SubscriptionCatalog, list[InvalidObject]]:
        """The catalog of every usable object, and what was wrong with the others."""
        problems: list[InvalidObject] = []
        models = {e.ref: e for e in _parse_all(parse_model_ref, model_refs, problems)}
        policies = tuple(_parse_all(parse_auth_policy, auth_policies, problems))
        subs = sorted(
            _parse_all(parse_subscription, subscriptions, problems),
            key=lambda s: (-s.priority, -s.max_limit, s.name, s.key.namespace),
        )
        return cls(models, policies, tuple(subs)), problems

    def allowed(self, identity: Identity, model: ModelRef) -> bool:
        """MaaSAuthPolicy access: some policy names the model and admits the identity."""
        if model not in self.models:
            return False
        return any(model in p.models and p.admits(identity) for p in self.policies)

    def resolve(self, name: str, default_namespace: str | None) -> ModelRef | None:
        """The model a bare name (a body's `model`) stands for: the only MaaSModelRef of that
        name, else the one in `default_namespace`; None when none or several could be meant."""
        found = [ref for ref in self.models if ref.name == name]
        if len(found) == 1:
            return found[0]
        for ref in found:
            if ref.namespace == default_namespace:
                return ref
        return None

    def select(
        self, identity: Identity, model: ModelRef, requested: str | None = None
    ) -> Selection | SubscriptionDenied:
        """The subscription this request runs under (access already granted), or why none."""
        if requested:
            chosen = self._requested(requested)
            if chosen is None:
                return UNKNOWN_SUBSCRIPTION
            if not chosen.owned_by(identity):
                return NOT_OWNER
            entry = chosen.models.get(model)
            if entry is None:
                return _model_not_in(requested, model)
            return _serving(chosen, entry)
        candidates = [s for s in self.subscriptions if model in s.models and s.owned_by(identity)]
        if not candidates:
            return NO_SUBSCRIPTION
        if len(candidates) > 1:
            return SEVERAL_SUBSCRIPTIONS
        return _serving(candidates[0], candidates[0].models[model])

    def _requested(self, requested: str) -> Subscription | None:
        for sub in self.subscriptions:
            if sub.qualified_name == requested:
                return sub
        if "/" not in requested:
            for sub in self.subscriptions:  # highest priority first
                if sub.name == requested:
                    return sub
        return None


def _serving(subscription: Subscription, model: SubscribedModel) -> Selection | SubscriptionDenied:
    if subscription.phase is not None and subscription.phase not in SERVING_PHASES:
        return _not_serving(subscription.phase)
    return Selection(subscription, model)


# --- parsing the objects -----------------------------------------------------------------------


def _parse_all(
    parse: Callable[[Mapping[str, Any]], T | None],
    objects: Iterable[Mapping[str, Any]],
    problems: list[InvalidObject],
) -> list[T]:
    parsed: list[T] = []
    for obj in objects:
        try:
            item = parse(obj)
        except InvalidObject as exc:
            problems.append(exc)
            continue
        if item is not None:
            parsed.append(item)
    return parsed


def object_key(kind: Kind, obj: Mapping[str, Any]) -> ObjectKey:
    meta = obj.get("metadata")
    if not isinstance(meta, Mapping):
        raise InvalidObject(f"{kind} (unnamed)", "metadata", "is missing")
    name, namespace = meta.get("name"), meta.get("namespace")
    if not isinstance(name, str) or not name:
        raise InvalidObject(f"{kind} (unnamed)", "metadata.name", "is missing")
    if not isinstance(namespace, str) or not namespace:
        raise InvalidObject(f"{kind} {name}", "metadata.namespace", "is missing")
    return ObjectKey(kind, namespace, name)


def _open(kind: Kind, obj: Mapping[str, Any]) -> tuple[_Reader, Mapping[str, Any]] | None:
    """A reader for the object and its spec; None for an object being deleted (left out)."""
    key = object_key(kind, obj)
    meta = obj["metadata"]
    if meta.get("deletionTimestamp"):
        return None
    read = _Reader(key)
    return read, read.mapping(obj, "spec", "spec")


class _Reader:
    """Typed reads of one object's fields, each failure naming the object and the field."""

    def __init__(self, key: ObjectKey) -> None:
        self.key = key

    def fail(self, path: str, problem: str) -> InvalidObject:
        return InvalidObject(self.key, path, problem)

    def mapping(self, parent: Mapping[str, Any], name: str, path: str) -> Mapping[str, Any]:
        value = parent.get(name)
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            raise self.fail(path, f"expected an object, got {type(value).__name__}")
        return value

    def items(self, parent: Mapping[str, Any], name: str, path: str) -> Sequence[Any]:
        value = parent.get(name)
        if value is None:
            return []
        if not isinstance(value, list):
            raise self.fail(path, f"expected a list, got {type(value).__name__}")
        return value

    def text(self, parent: Mapping[str, Any], name: str, path: str, *, required: bool) -> str:
        value = parent.get(name)
        if value is None or value == "":
            if required:
                raise self.fail(path, "is required")
            return ""
        if not isinstance(value, str):
            raise self.fail(path, f"expected a string, got {type(value).__name__}")
        return value

    def model_ref(self, item: Any, path: str) -> ModelRef:
        if not isinstance(item, Mapping):
            raise self.fail(path, "expected {name, namespace}")
        name = self.text(item, "name", f"{path}.name", required=True)
        namespace = self.text(item, "namespace", f"{path}.namespace", required=True)
        if not is_namespace_name(namespace):
            raise self.fail(f"{path}.namespace", f"{namespace!r} is not a namespace name")
        if not is_object_name(name):
            raise self.fail(f"{path}.name", f"{name!r} is not an object name")
        return ModelRef(namespace, name)

    def subjects(self, spec: Mapping[str, Any], path: str) -> tuple[frozenset[str], frozenset[str]]:
        groups = []
        for i, group in enumerate(self.items(spec, "groups", f"{path}.groups")):
            if not isinstance(group, Mapping):
                raise self.fail(f"{path}.groups[{i}]", "expected {name: GROUP}")
            groups.append(self.text(group, "name", f"{path}.groups[{i}].name", required=True))
        users = []
        for i, user in enumerate(self.items(spec, "users", f"{path}.users")):
            if not isinstance(user, str) or not user:
                raise self.fail(f"{path}.users[{i}]", "expected a username")
            users.append(user)
        return frozenset(groups), frozenset(users)


def parse_model_ref(obj: Mapping[str, Any]) -> ModelEntry | None:
    opened = _open("MaaSModelRef", obj)
    if opened is None:
        return None
    read, spec = opened
    key = read.key
    target = read.mapping(spec, "modelRef", "spec.modelRef")
    return ModelEntry(
        ref=ModelRef(key.namespace, key.name),
        kind=read.text(target, "kind", "spec.modelRef.kind", required=True),
        target=read.text(target, "name", "spec.modelRef.name", required=True),
    )


def parse_auth_policy(obj: Mapping[str, Any]) -> AuthPolicy | None:
    opened = _open("MaaSAuthPolicy", obj)
    if opened is None:
        return None
    read, spec = opened
    key = read.key
    refs = read.items(spec, "modelRefs", "spec.modelRefs")
    if not refs:
        raise read.fail("spec.modelRefs", "needs at least one {name, namespace}")
    models = frozenset(read.model_ref(r, f"spec.modelRefs[{i}]") for i, r in enumerate(refs))
    groups, users = read.subjects(read.mapping(spec, "subjects", "spec.subjects"), "spec.subjects")
    if not groups and not users:
        raise read.fail("spec.subjects", "needs groups or users")
    return AuthPolicy(key, models, groups, users)


def parse_window(window: object) -> int:
    """Seconds of a tokenRateLimits window (`1m`, `30s`, `2h`: the CRD's pattern)."""
    match = _WINDOW.match(window) if isinstance(window, str) else None
    if match is None:
        raise ValueError(f"expected 1 to 9999 followed by s, m or h (e.g. 1m), got {window!r}")
    return int(match.group(1)) * _UNIT_SECONDS[match.group(2)]


def _token_limit(read: _Reader, item: Any, path: str) -> TokenRateLimit:
    if not isinstance(item, Mapping):
        raise read.fail(path, "expected {limit, window}")
    limit = item.get("limit")
    if isinstance(limit, bool) or not isinstance(limit, int):
        raise read.fail(f"{path}.limit", f"expected a whole number, got {limit!r}")
    if not 1 <= limit <= MAX_TOKEN_LIMIT:
        raise read.fail(f"{path}.limit", f"expected 1 to {MAX_TOKEN_LIMIT}, got {limit}")
    try:
        seconds = parse_window(item.get("window"))
    except ValueError as exc:
        raise read.fail(f"{path}.window", str(exc)) from None
    if not countable(limit, seconds * 1000):
        raise read.fail(
            path,
            f"{limit} tokens per {item['window']} is too large to count exactly; use a shorter "
            "window or a smaller limit",
        )
    return TokenRateLimit(limit, str(item["window"]), seconds)


def _billing(read: _Reader, ref: Mapping[str, Any], path: str) -> Decimal | None:
    rate = read.mapping(ref, "billingRate", path)
    if not rate:
        return None
    text = read.text(rate, "perToken", f"{path}.perToken", required=True)
    try:
        value = Decimal(text)
    except InvalidOperation:
        raise read.fail(f"{path}.perToken", f"expected a decimal number, got {text!r}") from None
    if not value.is_finite() or value < 0:
        raise read.fail(f"{path}.perToken", f"expected a price of 0 or more, got {text!r}")
    return value


def parse_subscription(obj: Mapping[str, Any]) -> Subscription | None:
    opened = _open("MaaSSubscription", obj)
    if opened is None:
        return None
    read, spec = opened
    key = read.key
    groups, users = read.subjects(read.mapping(spec, "owner", "spec.owner"), "spec.owner")
    refs = read.items(spec, "modelRefs", "spec.modelRefs")
    if not refs:
        raise read.fail("spec.modelRefs", "needs at least one model")
    models: dict[ModelRef, SubscribedModel] = {}
    for i, item in enumerate(refs):
        path = f"spec.modelRefs[{i}]"
        ref = read.model_ref(item, path)
        if ref in models:
            raise read.fail(path, f"model {ref} is listed twice")
        limits = read.items(item, "tokenRateLimits", f"{path}.tokenRateLimits")
        if not limits:
            raise read.fail(f"{path}.tokenRateLimits", "needs at least one {limit, window}")
        models[ref] = SubscribedModel(
            ref,
            tuple(
                _token_limit(read, lim, f"{path}.tokenRateLimits[{j}]")
                for j, lim in enumerate(limits)
            ),
            _billing(read, item, f"{path}.billingRate"),
        )
    priority = spec.get("priority", 0)
    if isinstance(priority, bool) or not isinstance(priority, int):
        raise read.fail("spec.priority", f"expected a whole number, got {priority!r}")
    metadata = read.mapping(spec, "tokenMetadata", "spec.tokenMetadata")
    labels = read.mapping(metadata, "labels", "spec.tokenMetadata.labels")
    status = read.mapping(obj, "status", "status")
    phase = status.get("phase")
    return Subscription(
        key=key,
        groups=groups,
        users=users,
        models=models,
        priority=priority,
        phase=phase if isinstance(phase, str) and phase else None,
        organization_id=read.text(
            metadata, "organizationId", "spec.tokenMetadata.organizationId", required=False
        ),
        cost_center=read.text(
            metadata, "costCenter", "spec.tokenMetadata.costCenter", required=False
        ),
        labels={str(k): str(v) for k, v in labels.items()},
    )
