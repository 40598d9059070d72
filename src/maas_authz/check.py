"""The Check decision as four phases: route -> authenticate -> resolve tier -> authorize model.

In the subscription flow (authorization.mode) the last two are MaaSAuthPolicy access and the
choice of a MaaSSubscription instead (subscription_check.py), and sk-oai- API keys authenticate.
Pure of wire formats: it takes a path, the request headers and body, and returns an Allow or a
Deny. Time and I/O come in through the reviewers it is given.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from maas_authz.access import AccessReviewer
from maas_authz.api_keys import is_api_key
from maas_authz.body_model import model_in_body
from maas_authz.credentials import BadCredentials, bearer_token
from maas_authz.decision import Allow, Decision, Deny
from maas_authz.identity import Identity, TokenReviewer
from maas_authz.model_path import BadPath, BodyRoute, ModelRef, OpenPath, PathRouting
from maas_authz.subscription_check import Subject, SubscriptionFlow
from maas_authz.tiers import Tier, TierMapping
from maas_common.clock import Clock, SystemClock
from maas_common.errors import BackendUnavailable
from maas_common.logs import LogThrottle

log = logging.getLogger(__name__)

_MAX_CACHED_ROUTES = 4096
_MAX_CACHED_PATH = 512  # longer paths are classified every time, never kept
_BODY_OFF_LOOP = 256 * 1024  # bodies this large are parsed in a thread, not on the event loop
_NO_HEADERS: Mapping[str, str] = {}


@dataclass(frozen=True, slots=True)
class CheckLimits:
    max_token_length: int = 8192
    retry_after_seconds: int = 5


class CheckPipeline:
    def __init__(
        self,
        *,
        routing: PathRouting,
        identities: TokenReviewer,
        tiers: Callable[[], TierMapping],
        access: AccessReviewer,
        limits: CheckLimits | None = None,
        clock: Clock | None = None,
        subscriptions: SubscriptionFlow | None = None,
        default_namespace: str | None = None,
    ) -> None:
        self._routing = routing
        self._subscriptions = subscriptions  # None: authorization.mode tiers
        self._default_namespace = default_namespace  # for body models in the tier flow
        self._identities = identities
        self._tiers = tiers  # a callable, so a reloaded mapping applies to the next request
        self._access = access
        self._limits = limits or CheckLimits()
        self._unavailable_log = LogThrottle(clock or SystemClock(), seconds=5.0)
        # path (without its query) -> what the routing made of it; the routing never changes,
        # and the same few paths come again and again
        self._routes: dict[str, ModelRef | OpenPath | BodyRoute | BadPath] = {}

    def route(self, raw_path: str) -> ModelRef | OpenPath | BodyRoute | BadPath:
        """What the path is for (cached; explain routes with it too)."""
        path = raw_path.partition("?")[0]  # classify() ignores the query; so may the cache key
        target = self._routes.get(path)
        if target is None:
            target = self._routing.classify(path)
            if len(path) <= _MAX_CACHED_PATH:
                if len(self._routes) >= _MAX_CACHED_ROUTES:
                    del self._routes[next(iter(self._routes))]  # the oldest
                self._routes[path] = target
        return target

    async def decide(
        self,
        path: str,
        authorization: str | None,
        *,
        headers: Mapping[str, str] = _NO_HEADERS,
        body: bytes = b"",
    ) -> Decision:
        # 1. route: refuse what cannot be a valid request before any Kubernetes call
        routed = self.route(path)
        if isinstance(routed, BadPath):
            return Deny(routed.status, routed.code, routed.message)
        if isinstance(routed, OpenPath) and not routed.authenticate:
            return Allow(identity=None, tier=None, model=None)
        return await self.decide_routed(routed, authorization, headers=headers, body=body)

    async def decide_routed(
        self,
        routed: ModelRef | OpenPath | BodyRoute,
        authorization: str | None,
        *,
        headers: Mapping[str, str] = _NO_HEADERS,
        body: bytes = b"",
    ) -> Decision:
        """2-4 for a request already routed (also /v1/quota and explain, which route their own)."""
        # the subscription flow refuses client X-MaaS-Username/Group outright (the tier flow
        # strips them, as ever); before authentication, so a forger learns nothing of the key
        flow = self._subscriptions
        if flow is not None and flow.for_tokens:
            forged = flow.forged_headers(headers)
            if forged is not None:
                return forged

        # 2. authenticate (a body is read only once the caller is known)
        token = bearer_token(authorization, self._limits.max_token_length)
        if isinstance(token, BadCredentials):
            # RFC 6750: only a presented bearer token gets error="invalid_token" in the challenge
            return Deny(
                401, token.code, token.message, token_presented=token.code == "invalid_token"
            )
        if flow is not None and is_api_key(token):
            forged = None if flow.for_tokens else flow.forged_headers(headers)  # else done above
            if forged is not None:
                return forged
            try:
                subject = await flow.key_subject(token)
            except BackendUnavailable as exc:
                return self._unavailable(exc, "API key validation")
            return await self._subscribed(flow, subject, routed, body)
        try:
            identity = await self._identities.review(token)
        except BackendUnavailable as exc:
            return self._unavailable(exc, "authentication")
        if identity is None:
            return Deny(
                401,
                "invalid_token",
                "the token is not valid: expired, revoked, or issued for another audience",
                token_presented=True,
            )
        return await self.decide_for(identity, routed, headers=headers, body=body)

    async def decide_for(
        self,
        identity: Identity,
        routed: ModelRef | OpenPath | BodyRoute,
        *,
        headers: Mapping[str, str] = _NO_HEADERS,
        body: bytes = b"",
    ) -> Decision:
        """3-4 for an authenticated identity (explain calls it with a synthetic one)."""
        flow = self._subscriptions
        if flow is not None and flow.for_tokens:
            return await self._subscribed(flow, flow.token_subject(identity, headers), routed, body)
        target = await _target(routed, body)
        if isinstance(target, Deny):
            return target
        if isinstance(target, str):  # a body's model: the tier flow names it in one namespace
            if self._default_namespace is None:
                return Deny(
                    404,
                    "model_not_found",
                    f"model {target!r} cannot be found: set models.default_namespace to serve "
                    "body-named models in the tier flow",
                )
            target = ModelRef(self._default_namespace, target)

        # 3. resolve tier
        tier = self._tiers().resolve(identity.groups)
        if tier is None:
            return Deny(
                403,
                "no_tier",
                f"user {identity.userid!r} belongs to no tier; ask an administrator to add one "
                "of your groups to a tier",
                user=identity.username,
            )

        # 4. authorize model
        if isinstance(target, OpenPath):
            return Allow(identity, tier, None)
        try:
            allowed = await self._access.allowed(identity, target)
        except BackendUnavailable as exc:
            return self._unavailable(exc, "model access check", tier)
        if not allowed:
            return Deny(
                403,
                "model_access_denied",
                f"{_who(identity, tier)} has no access to model {target.name!r} "
                f"in namespace {target.namespace!r}",
                tier=tier.name,
                user=identity.username,
            )
        return Allow(identity, tier, target)

    async def _subscribed(
        self,
        flow: SubscriptionFlow,
        subject: Subject | Deny,
        routed: ModelRef | OpenPath | BodyRoute,
        body: bytes,
    ) -> Decision:
        """3-4 of the subscription flow: MaaSAuthPolicy access, then the subscription."""
        if isinstance(subject, Deny):
            return subject
        target = await _target(routed, body)
        if isinstance(target, Deny):
            return target
        try:
            return flow.authorize(subject, target)
        except BackendUnavailable as exc:
            return self._unavailable(exc, "subscription check")

    def _unavailable(self, exc: BackendUnavailable, phase: str, tier: Tier | None = None) -> Deny:
        self._unavailable_log.log(
            log,
            logging.WARNING,
            "%s failed, answering 503: %s",
            phase,
            exc,
            extra={"backend": exc.backend, "kind": exc.kind},
        )
        return Deny(
            503,
            "auth_backend_unavailable",
            f"the {phase} could not be completed right now; retry later",
            tier=tier.name if tier else "",
            retry_after=self._limits.retry_after_seconds,
        )


async def _target(
    routed: ModelRef | OpenPath | BodyRoute, body: bytes
) -> ModelRef | OpenPath | str | Deny:
    """What the request is for: the path's model or open path, or the body's model name."""
    if not isinstance(routed, BodyRoute):
        return routed
    if len(body) > _BODY_OFF_LOOP:
        named = await asyncio.to_thread(model_in_body, body)
    else:
        named = model_in_body(body)
    if isinstance(named, BadPath):
        return Deny(named.status, named.code, named.message)
    return named


def _who(identity: Identity, tier: Tier) -> str:
    return f"user {identity.userid!r} (tier {tier.name!r})"
