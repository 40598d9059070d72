"""The limits file: which limits apply to which tier, and how a descriptor finds its limits.

domain: maas                 # must equal the Envoy rate limit filter's `domain`
limits:
  - name: free-requests      # unique; part of the counter key
    tier: free
    kind: requests           # requests (taken on admission) | tokens (post-paid LLM tokens)
    limit: 5
    window: 2m
    per: [user]              # counter per user (default), or [user, model]
    models: []               # only these models ("namespace/name"); empty = every model
    shadow: false            # count and report, never refuse
    cost:                    # tokens limits: weight of each kind of token (default 1 and 1)
      prompt_tokens: 1
      completion_tokens: 4   # e.g. output tokens cost four times as much
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Literal

from pydantic import Field, field_validator, model_validator

from maas_common.config import Duration, StrictModel, parse_yaml_text, validate
from maas_common.errors import ConfigError
from maas_ratelimit.bucket import BucketSpec, countable

_NAME = re.compile(r"^[a-z0-9]([-a-z0-9_.]*[a-z0-9])?$")
Kind = Literal["requests", "tokens"]
Per = Literal["user", "model"]
_KEY_SEPARATOR = "\x1f"
_UNITS = {1_000: "SECOND", 60_000: "MINUTE", 3_600_000: "HOUR", 86_400_000: "DAY"}


class CostSpec(StrictModel):
    prompt_tokens: float = Field(1.0, ge=0, le=1000)
    completion_tokens: float = Field(1.0, ge=0, le=1000)


class LimitSpec(StrictModel):
    name: str
    tier: str
    kind: Kind
    limit: int = Field(ge=1, le=2**32 - 1)  # Envoy's requests_per_unit is a uint32
    window: Duration
    per: list[Per] = Field(default_factory=lambda: list[Per](["user"]))
    models: list[str] = Field(default_factory=list)
    shadow: bool = False
    cost: CostSpec = CostSpec()

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not _NAME.match(value) or len(value) > 63:
            raise ValueError(f"{value!r} must be lowercase letters, digits, '-', '_' or '.'")
        return value

    @field_validator("window")
    @classmethod
    def _window(cls, value: float) -> float:
        # compare in milliseconds with a float tolerance: "1001ms" is 1.0010000000000001 s
        ms = value * 1000
        if value < 1 or abs(ms - round(ms)) > max(1e-6, ms * 1e-12):
            raise ValueError("a window must be at least 1s, in whole milliseconds")
        return value

    @field_validator("per")
    @classmethod
    def _per(cls, value: list[str]) -> list[str]:
        if "user" not in value or len(set(value)) != len(value):
            raise ValueError("must contain 'user', optionally 'model', each once")
        return value

    @field_validator("models")
    @classmethod
    def _models(cls, value: list[str]) -> list[str]:
        for model in value:
            if model.count("/") != 1:
                raise ValueError(f"model {model!r} must be 'namespace/name'")
        return value

    @model_validator(mode="after")
    def _cost_for_tokens_only(self) -> LimitSpec:
        if self.kind == "requests" and "cost" in self.model_fields_set:
            raise ValueError("cost applies to tokens limits only")
        return self

    @model_validator(mode="after")
    def _exact(self) -> LimitSpec:
        if not countable(self.limit, round(self.window * 1000)):
            raise ValueError(
                f"limit x window is too large to count exactly ({self.limit} per {self.window}s); "
                "use a shorter window"
            )
        return self


class LimitsFileSpec(StrictModel):
    domain: str = "maas"
    limits: list[LimitSpec]


def format_window(window_ms: int) -> str:
    for unit_ms, suffix in ((86_400_000, "d"), (3_600_000, "h"), (60_000, "m"), (1_000, "s")):
        if window_ms % unit_ms == 0:
            return f"{window_ms // unit_ms}{suffix}"
    return f"{window_ms}ms"


_RATIOS: dict[float, tuple[int, int]] = {}  # weight -> (numerator, denominator); from config


def _weighted(count: int, weight: float) -> int:
    # exact: the weight as written (1.1, not 1.100000000000000088...), so 100 x 1.1 is 110, not 111
    if weight == 1.0:
        return count
    ratio = _RATIOS.get(weight)
    if ratio is None:
        exact = Fraction(repr(weight))
        ratio = _RATIOS[weight] = (exact.numerator, exact.denominator)
    return -(-count * ratio[0] // ratio[1])  # ceil(count x weight), in integers


@dataclass(frozen=True, slots=True)
class Limit:
    name: str
    tier: str
    kind: Kind
    spec: BucketSpec
    per_model: bool
    models: frozenset[str]
    shadow: bool
    prompt_weight: float = 1.0
    completion_weight: float = 1.0
    # a MaaSSubscription's token limit: `tier` holds the subscription (namespace/name)
    subscription: bool = False
    _key_prefix: str = field(init=False, repr=False, compare=False)  # see counter_key

    def __post_init__(self) -> None:
        object.__setattr__(self, "_key_prefix", self.name + _KEY_SEPARATOR)

    def tokens_to_charge(self, kind: str, count: int) -> int:
        """Weighted tokens for `count` tokens of `kind` (rounded up: never under-charge)."""
        if kind == "prompt_tokens":
            return _weighted(count, self.prompt_weight)
        if kind == "completion_tokens":
            return _weighted(count, self.completion_weight)
        return count  # total_tokens: no split known, weight 1

    def weigh(self, prompt: int, completion: int) -> int:
        """Weighted tokens for `prompt` prompt and `completion` completion tokens."""
        prompt_weight, completion_weight = self.prompt_weight, self.completion_weight
        if prompt_weight == 1.0 and completion_weight == 1.0:  # the default: no call at all
            return prompt + completion
        return _weighted(prompt, prompt_weight) + _weighted(completion, completion_weight)

    @property
    def description(self) -> str:
        """What a client is told, e.g. "free tier: 5 requests per 2m"."""
        window = format_window(self.spec.window_ms)
        scope = f"subscription {self.tier}" if self.subscription else f"{self.tier} tier"
        return f"{scope}: {self.spec.limit} {self.kind} per {window}"

    @property
    def unit(self) -> str:
        """Envoy's RateLimit.Unit when the window is exactly one unit, else UNKNOWN."""
        return _UNITS.get(self.spec.window_ms, "UNKNOWN")

    def applies_to(self, model: str | None) -> bool:
        return not self.models or (model is not None and model in self.models)

    def counter_key(self, user: str, model: str | None) -> str:
        # \x1f (unit separator) cannot occur in names, users are opaque: no ambiguity
        if self.per_model:
            return f"{self._key_prefix}{user}{_KEY_SEPARATOR}{model or ''}"
        return self._key_prefix + user


@dataclass(frozen=True)
class LimitTable:
    domain: str
    limits: tuple[Limit, ...]

    def __post_init__(self) -> None:
        by_tier: dict[str, list[Limit]] = {}
        for limit in self.limits:
            by_tier.setdefault(limit.tier, []).append(limit)
        object.__setattr__(self, "_by_tier", {t: tuple(ls) for t, ls in by_tier.items()})
        # the configured names, for bounded metric labels (maas_common.metrics.BoundedLabel)
        object.__setattr__(self, "tiers", frozenset(by_tier))
        object.__setattr__(self, "names", frozenset(limit.name for limit in self.limits))
        object.__setattr__(
            self, "models", frozenset(model for limit in self.limits for model in limit.models)
        )

    tiers: frozenset[str] = field(init=False)
    names: frozenset[str] = field(init=False)
    models: frozenset[str] = field(init=False)

    def for_tier(self, tier: str, model: str | None) -> Sequence[Limit]:
        limits: dict[str, tuple[Limit, ...]] = self._by_tier  # type: ignore[attr-defined]
        return [limit for limit in limits.get(tier, ()) if limit.applies_to(model)]


MAX_SUBSCRIPTION_LIMITS = 16  # token limits one subscription may set on one model


def subscription_limits(subscription: str, text: str) -> tuple[Limit, ...] | None:
    """A subscription's token limits for one model, from maas-authz's `token_limits` entry
    (`limit/window_seconds`, comma-separated): one bucket per user and model each; None when
    the entry is not that (a bug upstream of us: refused, never taken for "no limit")."""
    limits: list[Limit] = []
    for index, part in enumerate(text.split(",")):
        limit_text, slash, window_text = part.partition("/")
        if not (slash and limit_text.isdigit() and window_text.isdigit()):
            return None
        if not (limit_text.isascii() and window_text.isascii()) or len(part) > 24:
            return None
        limit, window_ms = int(limit_text), int(window_text) * 1000
        if limit < 1 or window_ms < 1000 or not countable(limit, window_ms):
            return None
        limits.append(
            Limit(
                name=f"{subscription}/tokens-{index}",
                tier=subscription,
                kind="tokens",
                spec=BucketSpec(limit, window_ms),
                per_model=True,
                models=frozenset(),
                shadow=False,
                subscription=True,
            )
        )
    if not limits or len(limits) > MAX_SUBSCRIPTION_LIMITS:
        return None
    return tuple(limits)


def parse_limits(text: str, source: str) -> LimitTable:
    spec = validate(LimitsFileSpec, parse_yaml_text(text, source), source)
    names: set[str] = set()
    limits = []
    for index, item in enumerate(spec.limits):
        if item.name in names:
            raise ConfigError(
                source, f"limits[{index}].name", f"limit {item.name!r} is listed twice"
            )
        names.add(item.name)
        limits.append(
            Limit(
                name=item.name,
                tier=item.tier,
                kind=item.kind,
                spec=BucketSpec(item.limit, round(item.window * 1000)),
                per_model="model" in item.per,
                models=frozenset(item.models),
                shadow=item.shadow,
                prompt_weight=item.cost.prompt_tokens,
                completion_weight=item.cost.completion_tokens,
            )
        )
    return LimitTable(spec.domain, tuple(limits))


# The platform's defaults (Kuadrant RateLimitPolicy / TokenRateLimitPolicy of MaaS).
DEFAULT_LIMITS = """\
domain: maas
limits:
  - {name: free-requests, tier: free, kind: requests, limit: 5, window: 2m}
  - {name: free-tokens, tier: free, kind: tokens, limit: 100, window: 1m}
  - {name: premium-requests, tier: premium, kind: requests, limit: 20, window: 2m}
  - {name: premium-tokens, tier: premium, kind: tokens, limit: 50000, window: 1m}
  - {name: enterprise-requests, tier: enterprise, kind: requests, limit: 50, window: 2m}
  - {name: enterprise-tokens, tier: enterprise, kind: tokens, limit: 100000, window: 1m}
"""
