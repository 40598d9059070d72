"""Tiers: which service level a user's groups put them in (the `tier-to-group-mapping` format).

The platform's ConfigMap `tier-to-group-mapping` holds, under key `tiers`, a YAML list of
`{name, displayName?, description?, level, groups[]}`. A tier also owns the implicit group
`system:serviceaccounts:<instance>-tier-<name>` (the namespace maas-api mints tokens in). The
highest level among matching tiers wins; ties go to the tier listed first.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from pydantic import Field, field_validator

from maas_common.config import StrictModel, parse_yaml_text, validate
from maas_common.errors import ConfigError

_TIER_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


class TierSpec(StrictModel):
    name: str
    displayName: str | None = None
    description: str | None = None
    level: int
    groups: list[str] = Field(default_factory=list)

    @field_validator("name")
    @classmethod
    def _name_is_a_label(cls, value: str) -> str:
        if not _TIER_NAME.match(value) or len(value) > 63:
            raise ValueError(
                f"tier name {value!r} must be a lowercase DNS label (it is part of a namespace)"
            )
        return value


class TierListSpec(StrictModel):
    tiers: list[TierSpec] = Field(min_length=1)


@dataclass(frozen=True, slots=True)
class Tier:
    name: str
    level: int
    groups: frozenset[str]


class TierMapping:
    def __init__(self, tiers: Iterable[Tier]) -> None:
        self.tiers = tuple(tiers)
        # group -> best (level, -position) for that group, so resolve() is one dict probe per group
        self._by_group: dict[str, tuple[int, int, Tier]] = {}
        for position, tier in enumerate(self.tiers):
            rank = (tier.level, -position, tier)
            for group in tier.groups:
                best = self._by_group.get(group)
                if best is None or rank[:2] > best[:2]:
                    self._by_group[group] = rank

    def resolve(self, groups: Iterable[str]) -> Tier | None:
        best: tuple[int, int, Tier] | None = None
        for group in groups:
            rank = self._by_group.get(group)
            if rank is not None and (best is None or rank[:2] > best[:2]):
                best = rank
        return best[2] if best else None

    def names(self) -> list[str]:
        return [tier.name for tier in self.tiers]


def build_mapping(spec: TierListSpec, instance: str) -> TierMapping:
    return TierMapping(
        Tier(
            name=t.name,
            level=t.level,
            groups=frozenset([*t.groups, f"system:serviceaccounts:{instance}-tier-{t.name}"]),
        )
        for t in spec.tiers
    )


def parse_tier_document(text: str, source: str, instance: str) -> TierMapping:
    """Accepts the ConfigMap's `tiers` value (a list), `{tiers: [...]}`, or a whole ConfigMap."""
    data: Any = parse_yaml_text(text, source)
    if isinstance(data, dict) and data.get("kind") == "ConfigMap":
        configmap_data = data.get("data")
        tiers_text = configmap_data.get("tiers") if isinstance(configmap_data, dict) else None
        if not isinstance(tiers_text, str):
            raise ConfigError(
                source, "data.tiers", "the ConfigMap must hold a YAML list in key 'tiers'"
            )
        source = f"{source} (data.tiers)"
        data = parse_yaml_text(tiers_text, source)
    if isinstance(data, list):
        data = {"tiers": data}
    elif not isinstance(data, dict):
        raise ConfigError(source, "(top level)", "expected a list of tiers or a 'tiers:' key")
    spec = validate(TierListSpec, data, source)
    names = [t.name for t in spec.tiers]
    for index, name in enumerate(names):
        namespace = f"{instance}-tier-{name}"
        if len(namespace) > 63:
            raise ConfigError(
                source,
                f"tiers[{index}].name",
                f"namespace {namespace!r} would be longer than 63 characters",
            )
        if name in names[:index]:
            raise ConfigError(source, f"tiers[{index}].name", f"tier {name!r} is listed twice")
    return build_mapping(spec, instance)


DEFAULT_TIERS = """\
- name: free
  displayName: Free Tier
  level: 0
  groups: [tier-free-users, system:authenticated]
- name: premium
  displayName: Premium Tier
  level: 1
  groups: [tier-premium-users]
- name: enterprise
  displayName: Enterprise Tier
  level: 2
  groups: [tier-enterprise-users]
"""
