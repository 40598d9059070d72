"""The subscription flow's phases after authentication: MaaSAuthPolicy access, then the
MaaSSubscription the request runs under (as upstream maas-api selects it).

Who takes this flow is authorization.mode's choice: `subscriptions` sends every credential
here, `both` only sk-oai- API keys. Denials take upstream's form (the message as a text/plain
body, the code in x-ext-auth-reason), so clients and runbooks written for MaaS read them as ever.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from maas_authz.api_keys import KeyValidator
from maas_authz.decision import Allow, Decision, Deny
from maas_authz.identity import Identity
from maas_authz.model_path import ModelRef, OpenPath
from maas_authz.responses import GROUP_HEADER, SUBSCRIPTION_HEADER, USERNAME_HEADER
from maas_authz.subscriptions import NO_ACCESS, SubscriptionCatalog, SubscriptionDenied

# identity headers only the gateway may set: a request that brings its own is refused outright
FORGEABLE_HEADERS = (USERNAME_HEADER, GROUP_HEADER)
AUTHENTICATED = "system:authenticated"
_MAX_REQUESTED = 253 + 1 + 63  # namespace/name
_MAX_DECIDED = 4096


def token_groups(groups: tuple[str, ...]) -> tuple[str, ...]:
    """A token identity's groups for X-MaaS-Group: system:authenticated first, as upstream
    renders them (the default subscription is granted to it), each group once."""
    rest = tuple(dict.fromkeys(g for g in groups if g != AUTHENTICATED))
    return (AUTHENTICATED, *rest)


@dataclass(frozen=True, slots=True)
class Subject:
    """Who a request in the subscription flow is, before its model is known."""

    identity: Identity
    requested: str | None  # the subscription it names: a key's bound one, or the header's
    key_id: str = ""


class SubscriptionFlow:
    def __init__(
        self,
        *,
        catalog: Callable[[], SubscriptionCatalog],  # the snapshot in force for each request
        keys: KeyValidator | None,
        for_tokens: bool,  # mode `subscriptions`: tokens too, not only API keys
        default_namespace: str | None = None,
    ) -> None:
        self._catalog = catalog
        self._keys = keys
        self.for_tokens = for_tokens
        self._default_namespace = default_namespace
        # the decisions made on one catalog snapshot, by everything they depend on: the same
        # few (identity, model) pairs come again and again; a new snapshot starts afresh
        self._decided_on: SubscriptionCatalog | None = None
        self._decided: dict[tuple[Subject, ModelRef | str], Decision] = {}

    def forged_headers(self, headers: Mapping[str, str]) -> Deny | None:
        for name in FORGEABLE_HEADERS:
            if name in headers:
                return Deny(
                    403,
                    "identity_header_forbidden",
                    f"the {name} header is set by the gateway; a request must not send it",
                    plain=True,
                )
        return None

    async def key_subject(self, token: str) -> Subject | Deny:
        """Who an sk-oai- key is: its own groups, and the subscription it is bound to (a
        client's X-MaaS-Subscription cannot move a key to another subscription, as upstream).
        Raises BackendUnavailable when the key store cannot tell."""
        if self._keys is None:
            return Deny(401, "invalid_api_key", "API keys are not accepted here", plain=True)
        verdict = await self._keys.verify(token)
        if isinstance(verdict, str):
            return Deny(401, "invalid_api_key", verdict, token_presented=True, plain=True)
        identity = Identity(verdict.username, verdict.key_id, verdict.groups)
        return Subject(identity, verdict.subscription, verdict.key_id)

    def token_subject(self, identity: Identity, headers: Mapping[str, str]) -> Subject | Deny:
        """A token identity, its groups as upstream sends them, and the subscription its
        X-MaaS-Subscription header names (if any)."""
        requested = headers.get(SUBSCRIPTION_HEADER, "").strip()
        if len(requested) > _MAX_REQUESTED:
            return Deny(
                400,
                "invalid_subscription_header",
                f"X-MaaS-Subscription is longer than {_MAX_REQUESTED} characters",
                plain=True,
            )
        with_groups = Identity(identity.username, identity.uid, token_groups(identity.groups))
        return Subject(with_groups, requested or None, "")

    def authorize(self, subject: Subject, target: ModelRef | OpenPath | str) -> Decision:
        """Access and subscription for `subject` on `target`. Raises BackendUnavailable while
        the subscription objects are not listed yet."""
        if isinstance(target, OpenPath):  # e.g. /v1/models: authenticated, no subscription
            return Allow(
                subject.identity,
                None,
                None,
                subscription_flow=True,
                key_id=subject.key_id,
                named_subscription=subject.requested or "",
            )
        catalog = self._catalog()
        if catalog is not self._decided_on:
            self._decided_on, self._decided = catalog, {}
        memo = (subject, target)
        decision = self._decided.get(memo)
        if decision is None:
            decision = self._decide(catalog, subject, target)
            if len(self._decided) >= _MAX_DECIDED:
                self._decided.clear()
            self._decided[memo] = decision
        return decision

    def _decide(
        self, catalog: SubscriptionCatalog, subject: Subject, target: ModelRef | str
    ) -> Decision:
        identity = subject.identity
        if isinstance(target, str):
            resolved = catalog.resolve(target, self._default_namespace)
            if resolved is None:
                return Deny(
                    404, "model_not_found", f"model {target!r} is not served here", plain=True
                )
            target = resolved
        if not catalog.allowed(identity, target):
            return _denied(NO_ACCESS, identity.username)
        chosen = catalog.select(identity, target, subject.requested)
        if isinstance(chosen, SubscriptionDenied):
            return _denied(chosen, identity.username)
        return Allow(
            identity, None, target, subscription_flow=True, selection=chosen, key_id=subject.key_id
        )


def _denied(denial: SubscriptionDenied, user: str) -> Deny:
    return Deny(403, denial.code, denial.message, plain=True, user=user)
