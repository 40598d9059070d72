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
prices:                      # what the usage ledger charges where no billingRate came with the
  - model: "*"               #   request: "namespace/name" or "*" (the first match wins)
    prompt_per_million: 0.50
    completion_per_million: 1.50
budgets:                     # spend limits, enforced on admission like tokens limits
  - name: free-monthly       # unique among limits and budgets
    tier: free               # or subscription: namespace/name, or "*" (every subscription)
    per: user                # user (default) | tier | subscription: whose spend is counted
    kind: cost               # cost (currency, from prices / billingRate) | tokens
    limit: 5.00
    period: month            # day | week | month (calendar, in `timezone`), or window: 30d
    timezone: Europe/Berlin  # default UTC
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from fractions import Fraction
from typing import Literal

from pydantic import Field, field_validator, model_validator

from maas_common.config import Duration, StrictModel, parse_yaml_text, validate
from maas_common.errors import ConfigError
from maas_common.ledger.records import format_cost
from maas_common.periods import CalendarPeriod, TimeZoneName, calendar_period, zone
from maas_ratelimit.bucket import BucketSpec, countable

_NAME = re.compile(r"^[a-z0-9]([-a-z0-9_.]*[a-z0-9])?$")
Kind = Literal["requests", "tokens"]
Per = Literal["user", "model"]
_KEY_SEPARATOR = "\x1f"
# a cost budget's prices in micro-units per token: (prompt, completion)
Pricing = tuple[Fraction, Fraction]
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


class PriceSpec(StrictModel):
    model: str
    prompt_per_million: Decimal = Field(Decimal(0), ge=0, le=1_000_000)
    completion_per_million: Decimal = Field(Decimal(0), ge=0, le=1_000_000)

    @field_validator("model")
    @classmethod
    def _model(cls, value: str) -> str:
        if value != "*" and value.count("/") != 1:
            raise ValueError(f"model {value!r} must be 'namespace/name' or '*'")
        return value


MICROS = 1_000_000  # a cost budget counts micro-units of the currency
_TIME_UNITS_MS = (1, 1_000, 60_000, 3_600_000)  # a rolling budget's bucket clock, finest first


class BudgetSpec(StrictModel):
    name: str
    tier: str | None = None
    subscription: str | None = None
    per: Literal["user", "tier", "subscription"] = "user"
    kind: Literal["tokens", "cost"]
    limit: Decimal = Field(gt=0)
    period: CalendarPeriod | None = None
    window: Duration | None = None
    timezone: TimeZoneName = "UTC"
    models: list[str] = Field(default_factory=list)
    shadow: bool = False
    cost: CostSpec = CostSpec()  # tokens budgets: weights, as for tokens limits

    _name = field_validator("name")(LimitSpec._name.__func__)  # type: ignore[attr-defined]
    _models = field_validator("models")(LimitSpec._models.__func__)  # type: ignore[attr-defined]

    @field_validator("subscription")
    @classmethod
    def _subscription(cls, value: str | None) -> str | None:
        if value is not None and value != "*" and value.count("/") != 1:
            raise ValueError(f"{value!r} must be 'namespace/name' or '*'")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> BudgetSpec:
        if (self.tier is None) == (self.subscription is None):
            raise ValueError("a budget names exactly one of tier or subscription")
        if (self.period is None) == (self.window is None):
            raise ValueError("a budget has exactly one of period (calendar) or window (rolling)")
        if self.per == "tier" and self.tier is None:
            raise ValueError("per: tier needs tier:")
        if self.per == "subscription" and self.subscription is None:
            raise ValueError("per: subscription needs subscription:")
        if self.kind == "tokens" and self.limit != self.limit.to_integral_value():
            raise ValueError("a tokens budget's limit is a whole number")
        if self.kind == "cost" and "cost" in self.model_fields_set:
            raise ValueError("cost (token weights) applies to tokens budgets only")
        if self.window is not None and (self.window < 1 or self.window != int(self.window)):
            raise ValueError("a budget's window is whole seconds, at least 1s")
        units = self.units
        if self.window is None and not countable(units, 1):
            raise ValueError(f"limit {self.limit} is too large to count exactly")
        if self.window is not None and self.time_unit_ms() is None:
            raise ValueError(
                f"limit {self.limit} per {self.window:.0f}s is too large to count exactly"
            )
        return self

    @property
    def units(self) -> int:
        """The limit in what the bucket counts: tokens, or micro-units of the currency."""
        return int(self.limit * MICROS) if self.kind == "cost" else int(self.limit)

    def time_unit_ms(self) -> int | None:
        """The finest clock unit in which a rolling budget's bucket stays exact."""
        assert self.window is not None
        window_ms = round(self.window * 1000)
        for unit in _TIME_UNITS_MS:
            if window_ms % unit == 0 and countable(self.units, window_ms // unit):
                return unit
        return None


class LimitsFileSpec(StrictModel):
    domain: str = "maas"
    limits: list[LimitSpec]
    prices: list[PriceSpec] = Field(default_factory=list)
    budgets: list[BudgetSpec] = Field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Price:
    """A model's price per million prompt and completion tokens (the ledger's cost)."""

    prompt_per_million: Decimal
    completion_per_million: Decimal


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


class Budget:
    """What makes a Limit a budget: its clock, its subject, and whether it counts money.

    A calendar budget's bucket is frozen at its period's end (store.py: it never refills, and a
    new period is a new bucket); a rolling budget's bucket refills continuously over its window,
    like a tokens limit, on a clock of `unit_ms` (seconds or minutes for long windows: exact).
    """

    __slots__ = ("_current", "money", "per", "period", "timezone", "tz", "unit_ms", "window_ms")

    def __init__(
        self,
        *,
        money: bool,
        per: str,
        period: CalendarPeriod | None,
        timezone: str,
        window_ms: int = 0,
        unit_ms: int = 1,
    ) -> None:
        self.money, self.per, self.period = money, per, period
        self.timezone, self.tz = timezone, zone(timezone)
        self.window_ms, self.unit_ms = window_ms, unit_ms
        self._current: tuple[str, int, int] = ("", 0, 0)  # (id, start, end) of the last period

    def current(self, now_ms: int) -> tuple[str, int, int]:
        """(id, start ms, end ms) of the calendar period holding now_ms."""
        assert self.period is not None
        current = self._current
        if not current[1] <= now_ms < current[2]:
            current = self._current = calendar_period(self.period, self.tz, now_ms)
        return current

    def clock(self, now_ms: int) -> tuple[str, int]:
        """(key suffix, the bucket's time `at`) at now_ms."""
        if self.period is not None:
            name, _, end = self.current(now_ms)
            return name, end
        return "", now_ms // self.unit_ms

    @property
    def span(self) -> str:
        if self.period is not None:
            return f"{self.period} ({self.timezone})"
        return format_window(self.window_ms)


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
    budget: Budget | None = None  # a spend limit (kind "tokens": it takes the same paths)
    _key_prefix: str = field(init=False, repr=False, compare=False)  # see counter_key

    def __post_init__(self) -> None:
        object.__setattr__(self, "_key_prefix", self.name + _KEY_SEPARATOR)

    def tokens_to_charge(self, kind: str, count: int, pricing: Pricing | None = None) -> int:
        """Weighted tokens for `count` tokens of `kind` (rounded up: never under-charge); for a
        cost budget, their cost in micro-units at `pricing` (0 without a price)."""
        if self.budget is not None and self.budget.money:
            if pricing is None:
                return 0
            rate = pricing[1] if kind == "completion_tokens" else pricing[0]
            return -(-count * rate.numerator // rate.denominator)
        if kind == "prompt_tokens":
            return _weighted(count, self.prompt_weight)
        if kind == "completion_tokens":
            return _weighted(count, self.completion_weight)
        return count  # total_tokens: no split known, weight 1

    def weigh(self, prompt: int, completion: int, pricing: Pricing | None = None) -> int:
        """Weighted tokens for `prompt` prompt and `completion` completion tokens (a cost
        budget: their cost in micro-units)."""
        if self.budget is not None and self.budget.money:
            return self.tokens_to_charge("prompt_tokens", prompt, pricing) + self.tokens_to_charge(
                "completion_tokens", completion, pricing
            )
        prompt_weight, completion_weight = self.prompt_weight, self.completion_weight
        if prompt_weight == 1.0 and completion_weight == 1.0:  # the default: no call at all
            return prompt + completion
        return _weighted(prompt, prompt_weight) + _weighted(completion, completion_weight)

    @property
    def description(self) -> str:
        """What a client is told, e.g. "free tier: 5 requests per 2m"."""
        if self.tier == "*":
            scope = "every subscription"
        else:
            scope = f"subscription {self.tier}" if self.subscription else f"{self.tier} tier"
        budget = self.budget
        if budget is not None:
            amount = self.amount_text(self.spec.limit)
            amount = f"cost {amount}" if budget.money else f"{amount} tokens"
            return f"{scope}: budget {self.name}, {amount} per {budget.span} per {budget.per}"
        window = format_window(self.spec.window_ms)
        return f"{scope}: {self.spec.limit} {self.kind} per {window}"

    def amount_text(self, units: int) -> str:
        """A count of this limit's units as told to people (a cost budget's in currency)."""
        if self.budget is not None and self.budget.money:
            return format_cost(units * 1000)  # micro-units -> the ledger's nano-units
        return str(units)

    @property
    def unit(self) -> str:
        """Envoy's RateLimit.Unit when the window is exactly one unit, else UNKNOWN."""
        if self.budget is not None and (self.budget.period or self.budget.unit_ms != 1):
            return "UNKNOWN"
        return _UNITS.get(self.spec.window_ms, "UNKNOWN")

    def budget_key(self, user: str, subject: str, suffix: str) -> str:
        """A budget's counter: per user, or shared by the tier or subscription (`subject`),
        and per calendar period (`suffix`)."""
        assert self.budget is not None
        owner = user if self.budget.per == "user" else subject
        key = f"{self._key_prefix}{owner}"
        if self.budget.per == "user" and self.tier == "*":
            key = f"{key}{_KEY_SEPARATOR}{subject}"  # a user's spend under each subscription
        return f"{key}{_KEY_SEPARATOR}{suffix}" if suffix else key

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
    prices: tuple[tuple[str, Price], ...] = ()  # (model or "*", price), the first match wins
    # budgets of subscriptions (their `tier` is the subscription, or "*" for every one)
    subscription_budgets: tuple[Limit, ...] = ()

    def __post_init__(self) -> None:
        by_tier: dict[str, list[Limit]] = {}
        for limit in self.limits:
            by_tier.setdefault(limit.tier, []).append(limit)
        object.__setattr__(self, "_by_tier", {t: tuple(ls) for t, ls in by_tier.items()})
        # the configured names, for bounded metric labels (maas_common.metrics.BoundedLabel)
        object.__setattr__(self, "tiers", frozenset(by_tier))
        object.__setattr__(
            self,
            "names",
            frozenset(limit.name for limit in (*self.limits, *self.subscription_budgets)),
        )
        object.__setattr__(
            self, "models", frozenset(model for limit in self.limits for model in limit.models)
        )

    tiers: frozenset[str] = field(init=False)
    names: frozenset[str] = field(init=False)
    models: frozenset[str] = field(init=False)

    def price_for(self, model: str) -> Price | None:
        for pattern, price in self.prices:
            if pattern in ("*", model):
                return price
        return None

    def budgets_of_subscription(self, subscription: str, model: str | None) -> tuple[Limit, ...]:
        return tuple(
            budget
            for budget in self.subscription_budgets
            if budget.tier in ("*", subscription) and budget.applies_to(model)
        )

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
    prices = tuple(
        (item.model, Price(item.prompt_per_million, item.completion_per_million))
        for item in spec.prices
    )
    subscription_budgets: list[Limit] = []
    for index, budget in enumerate(spec.budgets):
        if budget.name in names:
            raise ConfigError(
                source, f"budgets[{index}].name", f"{budget.name!r} is already a limit or budget"
            )
        names.add(budget.name)
        made = _budget(budget)
        (subscription_budgets if made.subscription else limits).append(made)
    return LimitTable(spec.domain, tuple(limits), prices, tuple(subscription_budgets))


def _budget(spec: BudgetSpec) -> Limit:
    if spec.window is not None:
        window_ms = round(spec.window * 1000)
        unit_ms = spec.time_unit_ms() or 1
        bucket = BucketSpec(spec.units, window_ms // unit_ms)
    else:
        window_ms, unit_ms, bucket = 0, 1, BucketSpec(spec.units, 1)
    return Limit(
        name=spec.name,
        tier=spec.tier if spec.tier is not None else spec.subscription or "",
        kind="tokens",
        spec=bucket,
        per_model=False,
        models=frozenset(spec.models),
        shadow=spec.shadow,
        prompt_weight=spec.cost.prompt_tokens,
        completion_weight=spec.cost.completion_tokens,
        subscription=spec.subscription is not None,
        budget=Budget(
            money=spec.kind == "cost",
            per=spec.per,
            period=spec.period,
            timezone=spec.timezone,
            window_ms=window_ms,
            unit_ms=unit_ms,
        ),
    )


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
