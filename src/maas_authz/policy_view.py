"""The effective policy as the operator API shows it, each part with where it came from."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from maas_authz.config import AuthzConfig
from maas_authz.model_path import ModelRef
from maas_authz.quota import Peeker
from maas_authz.subscriptions import SubscriptionCatalog, token_limits_text
from maas_authz.tiers import TierMapping
from maas_common.errors import BackendUnavailable

_PROBE_USER = "maas-admin:policy-probe"  # a peek for a user no one is: the limits as configured


@dataclass
class PolicyView:
    config: AuthzConfig
    tiers: Callable[[], TierMapping]
    tiers_source: str  # a file path, or "built-in"
    catalog: Callable[[], SubscriptionCatalog] | None
    catalog_source: str
    peeker: Peeker | None

    def tier_of(self, groups: tuple[str, ...]) -> str | None:
        tier = self.tiers().resolve(groups)
        return tier.name if tier else None

    def token_limits_of(self, subscription: str, model: str) -> str | None:
        """The token_limits entry of `subscription` (namespace/name) for `model`, or None."""
        if self.catalog is None or "/" not in model:
            return None
        namespace, _, name = model.partition("/")
        for sub in self.catalog().subscriptions:
            if sub.qualified_name == subscription:
                entry = sub.models.get(ModelRef(namespace, name))
                return token_limits_text(entry) if entry else None
        return None

    async def show(self) -> dict[str, Any]:
        config = self.config
        tiers = self.tiers()
        view: dict[str, Any] = {
            "authorization": {"mode": config.authorization.mode},
            "tiers": {
                "source": self.tiers_source,
                "instance": config.tiers.instance,
                "tiers": [
                    {"name": t.name, "level": t.level, "groups": sorted(t.groups)}
                    for t in tiers.tiers
                ],
            },
            "access": self._access(),
            "models": {
                "source": "maas-authz configuration (models)",
                "path_template": config.models.path_template,
                "default_namespace": config.models.default_namespace,
                "body_routes": config.models.body_routes,
                "open_paths": [p.model_dump() for p in config.models.open_paths],
            },
            "limits": await self._limits(tiers),
        }
        if self.catalog is not None:
            view["subscriptions"] = self._subscriptions()
        return view

    def _access(self) -> dict[str, Any]:
        access = self.config.access
        if access.source == "static":
            return {
                "source": "maas-authz configuration (access.static_grants)",
                "grants": [g.model_dump() for g in access.static_grants],
            }
        return {
            "source": "Kubernetes RBAC (SubjectAccessReview)",
            "check": {"verb": access.verb, "group": access.group, "resource": access.resource},
        }

    async def _limits(self, tiers: TierMapping) -> dict[str, Any]:
        if self.peeker is None:
            return {"source": "unknown: ratelimit.target is not set", "by_tier": {}}
        by_tier: dict[str, Any] = {}
        try:
            for tier in tiers.tiers:
                peek = await self.peeker.peek([{"tier": tier.name, "user": _PROBE_USER}])
                by_tier[tier.name] = [
                    {k: limit[k] for k in ("name", "unit", "limit", "window_seconds", "shadow")}
                    for limit in peek.limits
                ]
        except BackendUnavailable as exc:
            return {"source": f"maas-ratelimit did not answer: {exc}", "by_tier": by_tier}
        return {
            "source": "maas-ratelimit (its limits file), limits that apply to every model",
            "by_tier": by_tier,
        }

    def _subscriptions(self) -> dict[str, Any]:
        assert self.catalog is not None
        try:
            catalog = self.catalog()
        except BackendUnavailable as exc:
            return {"source": self.catalog_source, "error": str(exc)}
        return {
            "source": self.catalog_source,
            "subscriptions": [
                {
                    "name": sub.qualified_name,
                    "priority": sub.priority,
                    "phase": sub.phase,
                    "groups": sorted(sub.groups),
                    "users": sorted(sub.users),
                    "models": {
                        str(ref): token_limits_text(model) for ref, model in sub.models.items()
                    },
                }
                for sub in catalog.subscriptions
            ],
            "auth_policies": len(catalog.policies),
            "models": sorted(str(ref) for ref in catalog.models),
        }
