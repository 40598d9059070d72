"""The limits file (limits.py): parsing, the platform's defaults, lookup and counter keys."""

from __future__ import annotations

import pytest

from maas_common.errors import ConfigError
from maas_ratelimit.bucket import DEBT_WINDOWS, BucketSpec
from maas_ratelimit.limits import DEFAULT_LIMITS, Limit, LimitTable, format_window, parse_limits

SOURCE = "limits.yaml"


def one_limit(extra: str = "", *, limit: str = "5", window: str = "2m") -> str:
    return (
        "limits:\n"
        f"  - {{name: free-requests, tier: free, kind: requests, limit: {limit}, "
        f"window: {window}{extra}}}\n"
    )


def tokens_limit(extra: str = "") -> str:
    return (
        "limits:\n"
        f"  - {{name: free-tokens, tier: free, kind: tokens, limit: 100, window: 1m{extra}}}\n"
    )


def config_error(text: str) -> str:
    with pytest.raises(ConfigError) as caught:
        parse_limits(text, SOURCE)
    assert caught.value.source == SOURCE
    return str(caught.value)


def names(limits: object) -> list[str]:
    assert isinstance(limits, list | tuple)
    return [limit.name for limit in limits]


# --- the platform's defaults --------------------------------------------------------------------


def test_default_limits() -> None:
    table = parse_limits(DEFAULT_LIMITS, "built-in limits")
    assert table.domain == "maas"
    summary = [
        (limit.name, limit.tier, limit.kind, limit.spec, limit.description, limit.unit)
        for limit in table.limits
    ]
    assert summary == [
        ("free-requests", "free", "requests", BucketSpec(5, 120_000),
         "free tier: 5 requests per 2m", "UNKNOWN"),
        ("free-tokens", "free", "tokens", BucketSpec(100, 60_000),
         "free tier: 100 tokens per 1m", "MINUTE"),
        ("premium-requests", "premium", "requests", BucketSpec(20, 120_000),
         "premium tier: 20 requests per 2m", "UNKNOWN"),
        ("premium-tokens", "premium", "tokens", BucketSpec(50_000, 60_000),
         "premium tier: 50000 tokens per 1m", "MINUTE"),
        ("enterprise-requests", "enterprise", "requests", BucketSpec(50, 120_000),
         "enterprise tier: 50 requests per 2m", "UNKNOWN"),
        ("enterprise-tokens", "enterprise", "tokens", BucketSpec(100_000, 60_000),
         "enterprise tier: 100000 tokens per 1m", "MINUTE"),
    ]  # fmt: skip
    for limit in table.limits:
        assert limit.per_model is False
        assert limit.models == frozenset()
        assert limit.shadow is False


def test_default_limits_by_tier() -> None:
    table = parse_limits(DEFAULT_LIMITS, "built-in limits")
    assert names(table.for_tier("free", None)) == ["free-requests", "free-tokens"]
    assert names(table.for_tier("premium", "llm/tiny")) == ["premium-requests", "premium-tokens"]
    assert names(table.for_tier("enterprise", None)) == [
        "enterprise-requests",
        "enterprise-tokens",
    ]
    assert names(table.for_tier("gold", None)) == []
    assert names(table.for_tier("Free", None)) == []  # tiers are case-sensitive


# --- fields and defaults ------------------------------------------------------------------------


def test_missing_domain_defaults_to_maas() -> None:
    assert parse_limits(one_limit(), SOURCE).domain == "maas"


def test_explicit_domain() -> None:
    table = parse_limits("domain: other\n" + one_limit(), SOURCE)
    assert table.domain == "other"


def test_an_empty_list_of_limits_is_allowed() -> None:
    table = parse_limits("limits: []\n", SOURCE)
    assert table.limits == ()
    assert table.for_tier("free", None) == []


def test_defaults_of_one_limit() -> None:
    (limit,) = parse_limits(one_limit(), SOURCE).limits
    assert limit == Limit(
        name="free-requests",
        tier="free",
        kind="requests",
        spec=BucketSpec(5, 120_000),
        per_model=False,
        models=frozenset(),
        shadow=False,
    )


def test_every_field_set() -> None:
    text = one_limit(", per: [user, model], models: [llm/tiny, llm/big], shadow: true")
    (limit,) = parse_limits(text, SOURCE).limits
    assert limit.per_model is True
    assert limit.models == frozenset({"llm/tiny", "llm/big"})
    assert limit.shadow is True


def test_per_model_first_is_accepted() -> None:
    (limit,) = parse_limits(one_limit(", per: [model, user]"), SOURCE).limits
    assert limit.per_model is True


@pytest.mark.parametrize(
    ("window", "window_ms", "unit", "description"),
    [
        ("1s", 1_000, "SECOND", "free tier: 5 requests per 1s"),
        ("90s", 90_000, "UNKNOWN", "free tier: 5 requests per 90s"),
        ("1m", 60_000, "MINUTE", "free tier: 5 requests per 1m"),
        ("60s", 60_000, "MINUTE", "free tier: 5 requests per 1m"),
        ("2m", 120_000, "UNKNOWN", "free tier: 5 requests per 2m"),
        ("1h", 3_600_000, "HOUR", "free tier: 5 requests per 1h"),
        ("1d", 86_400_000, "DAY", "free tier: 5 requests per 1d"),
        ("1500ms", 1_500, "UNKNOWN", "free tier: 5 requests per 1500ms"),
        ("1001ms", 1_001, "UNKNOWN", "free tier: 5 requests per 1001ms"),
        ("1.001s", 1_001, "UNKNOWN", "free tier: 5 requests per 1001ms"),
        ("1.5", 1_500, "UNKNOWN", "free tier: 5 requests per 1500ms"),  # bare number: seconds
        ("30", 30_000, "UNKNOWN", "free tier: 5 requests per 30s"),
    ],
)
def test_windows(window: str, window_ms: int, unit: str, description: str) -> None:
    (limit,) = parse_limits(one_limit(window=window), SOURCE).limits
    assert limit.spec == BucketSpec(5, window_ms)
    assert limit.unit == unit
    assert limit.description == description


def test_every_whole_millisecond_window_is_accepted() -> None:
    # "1001ms" is 1.0010000000000001 s as a float: still a whole number of milliseconds
    for window_ms in range(1_000, 3_001):
        (limit,) = parse_limits(one_limit(window=f"{window_ms}ms"), SOURCE).limits
        assert limit.spec.window_ms == window_ms


@pytest.mark.parametrize(
    ("window_ms", "expected"),
    [
        (1_000, "1s"),
        (59_000, "59s"),
        (60_000, "1m"),
        (120_000, "2m"),
        (3_600_000, "1h"),
        (7_200_000, "2h"),
        (86_400_000, "1d"),
        (172_800_000, "2d"),
        (90_000, "90s"),
        (5_400_000, "90m"),
        (1_500, "1500ms"),
    ],
)
def test_format_window(window_ms: int, expected: str) -> None:
    assert format_window(window_ms) == expected


def test_a_tokens_description() -> None:
    text = "limits:\n  - {name: t, tier: premium, kind: tokens, limit: 50000, window: 1h}\n"
    (limit,) = parse_limits(text, SOURCE).limits
    assert limit.description == "premium tier: 50000 tokens per 1h"
    assert limit.unit == "HOUR"


# --- cost: weights of prompt and completion tokens ----------------------------------------------


def weights(text: str) -> tuple[float, float]:
    (limit,) = parse_limits(text, SOURCE).limits
    return limit.prompt_weight, limit.completion_weight


def test_cost_defaults_to_one_and_one() -> None:
    assert weights(tokens_limit()) == (1.0, 1.0)
    assert weights(tokens_limit(", cost: {}")) == (1.0, 1.0)
    assert weights(one_limit()) == (1.0, 1.0)  # requests limits carry the neutral weights
    for limit in parse_limits(DEFAULT_LIMITS, "built-in limits").limits:
        assert (limit.prompt_weight, limit.completion_weight) == (1.0, 1.0)


@pytest.mark.parametrize(
    ("cost", "expected"),
    [
        ("{prompt_tokens: 1, completion_tokens: 4}", (1.0, 4.0)),
        ("{completion_tokens: 4}", (1.0, 4.0)),
        ("{prompt_tokens: 0.5}", (0.5, 1.0)),
        ("{prompt_tokens: 0.25, completion_tokens: 1.5}", (0.25, 1.5)),
        ("{prompt_tokens: 0, completion_tokens: 1000}", (0.0, 1000.0)),  # both bounds included
    ],
)
def test_cost_weights(cost: str, expected: tuple[float, float]) -> None:
    assert weights(tokens_limit(f", cost: {cost}")) == expected


def test_cost_in_block_style() -> None:
    text = (
        "limits:\n"
        "  - name: free-tokens\n"
        "    tier: free\n"
        "    kind: tokens\n"
        "    limit: 100\n"
        "    window: 1m\n"
        "    cost:\n"
        "      prompt_tokens: 1\n"
        "      completion_tokens: 4\n"
    )
    assert weights(text) == (1.0, 4.0)


def test_a_limit_with_a_cost_equals_one_built_with_those_weights() -> None:
    (limit,) = parse_limits(tokens_limit(", cost: {completion_tokens: 4}"), SOURCE).limits
    assert limit == Limit(
        name="free-tokens",
        tier="free",
        kind="tokens",
        spec=BucketSpec(100, 60_000),
        per_model=False,
        models=frozenset(),
        shadow=False,
        prompt_weight=1.0,
        completion_weight=4.0,
    )


# --- for_tier and model filters -----------------------------------------------------------------

FILTERED = """\
limits:
  - {name: free-requests, tier: free, kind: requests, limit: 5, window: 2m}
  - {name: free-tiny, tier: free, kind: requests, limit: 2, window: 1m, models: [llm/tiny]}
  - {name: free-big, tier: free, kind: tokens, limit: 10, window: 1m, models: [llm/big, llm/huge]}
  - {name: premium-requests, tier: premium, kind: requests, limit: 20, window: 2m}
  - {name: free-per-model, tier: free, kind: requests, limit: 3, window: 1m, per: [user, model]}
"""


@pytest.mark.parametrize(
    ("tier", "model", "expected"),
    [
        ("free", None, ["free-requests", "free-per-model"]),  # filtered limits need a model
        ("free", "llm/tiny", ["free-requests", "free-tiny", "free-per-model"]),
        ("free", "llm/big", ["free-requests", "free-big", "free-per-model"]),
        ("free", "llm/huge", ["free-requests", "free-big", "free-per-model"]),
        ("free", "llm/other", ["free-requests", "free-per-model"]),
        ("free", "other/tiny", ["free-requests", "free-per-model"]),  # namespace matters
        ("free", "", ["free-requests", "free-per-model"]),
        ("premium", "llm/tiny", ["premium-requests"]),
        ("enterprise", "llm/tiny", []),
    ],
)
def test_for_tier_with_model_filters(tier: str, model: str | None, expected: list[str]) -> None:
    table = parse_limits(FILTERED, SOURCE)
    assert names(table.for_tier(tier, model)) == expected


def test_applies_to() -> None:
    table = parse_limits(FILTERED, SOURCE)
    everything, tiny = table.limits[0], table.limits[1]
    assert everything.applies_to(None)
    assert everything.applies_to("x/y")
    assert tiny.applies_to("llm/tiny")
    assert not tiny.applies_to(None)
    assert not tiny.applies_to("llm/tiny2")


def test_table_keeps_the_file_order() -> None:
    table = parse_limits(FILTERED, SOURCE)
    assert names(table.limits) == [
        "free-requests",
        "free-tiny",
        "free-big",
        "premium-requests",
        "free-per-model",
    ]


def test_a_table_built_by_hand_groups_by_tier() -> None:
    spec = BucketSpec(1, 1_000)
    a = Limit("a", "free", "requests", spec, False, frozenset(), False)
    b = Limit("b", "premium", "requests", spec, False, frozenset(), False)
    c = Limit("c", "free", "tokens", spec, False, frozenset(), False)
    table = LimitTable("maas", (a, b, c))
    assert list(table.for_tier("free", None)) == [a, c]
    assert list(table.for_tier("premium", None)) == [b]


# --- counter keys -------------------------------------------------------------------------------


def test_counter_key_per_user() -> None:
    table = parse_limits(FILTERED, SOURCE)
    per_user = table.limits[0]
    assert per_user.counter_key("alice", None) == "free-requests\x1falice"
    # the model is not part of a per-user key: one counter over every model
    assert per_user.counter_key("alice", "llm/tiny") == "free-requests\x1falice"
    assert per_user.counter_key("bob", "llm/tiny") == "free-requests\x1fbob"


def test_counter_key_per_user_and_model() -> None:
    table = parse_limits(FILTERED, SOURCE)
    per_model = table.limits[4]
    assert per_model.counter_key("alice", "llm/tiny") == "free-per-model\x1falice\x1fllm/tiny"
    assert per_model.counter_key("alice", "llm/big") == "free-per-model\x1falice\x1fllm/big"
    assert per_model.counter_key("alice", None) == "free-per-model\x1falice\x1f"


def test_counter_keys_of_different_limits_never_collide() -> None:
    table = parse_limits(FILTERED, SOURCE)
    keys = {
        limit.counter_key(user, model)
        for limit in table.limits
        for user in ("alice", "bob", "free-requests")
        for model in (None, "llm/tiny", "llm/big")
    }
    # 4 per-user limits x 3 users + 1 per-model limit x 3 users x 3 models
    assert len(keys) == 4 * 3 + 3 * 3


# --- errors -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            one_limit(limit="0"),
            "limits.yaml: limits[0].limit: input should be greater than or equal to 1",
        ),
        (
            one_limit(limit="-3"),
            "limits.yaml: limits[0].limit: input should be greater than or equal to 1",
        ),
        (
            one_limit(window="0.5s"),
            "limits.yaml: limits[0].window: a window must be at least 1s, in whole milliseconds",
        ),
        (
            one_limit(window="999ms"),
            "limits.yaml: limits[0].window: a window must be at least 1s, in whole milliseconds",
        ),
        (
            one_limit(window="1.0005s"),
            "limits.yaml: limits[0].window: a window must be at least 1s, in whole milliseconds",
        ),
        (
            one_limit(window="1000.5ms"),
            "limits.yaml: limits[0].window: a window must be at least 1s, in whole milliseconds",
        ),
        (
            one_limit(window="abc"),
            "limits.yaml: limits[0].window: expected a duration such as 500ms, 2s, 2m, 1h or 1d, "
            "got 'abc'",
        ),
        (
            one_limit(", per: [model]"),
            "limits.yaml: limits[0].per: must contain 'user', optionally 'model', each once",
        ),
        (
            one_limit(", per: [user, user]"),
            "limits.yaml: limits[0].per: must contain 'user', optionally 'model', each once",
        ),
        (
            one_limit(", per: []"),
            "limits.yaml: limits[0].per: must contain 'user', optionally 'model', each once",
        ),
        (
            one_limit(", models: [tiny]"),
            "limits.yaml: limits[0].models: model 'tiny' must be 'namespace/name'",
        ),
        (
            one_limit(", models: [llm/tiny, a/b/c]"),
            "limits.yaml: limits[0].models: model 'a/b/c' must be 'namespace/name'",
        ),
        (
            one_limit(", modles: [llm/tiny]"),
            "limits.yaml: limits[0].modles: unknown key "
            "(expected one of: cost, kind, limit, models, name, per, shadow, tier, window)",
        ),
        (
            "domian: maas\n" + one_limit(),
            "limits.yaml: domian: unknown key (expected one of: budgets, domain, limits, prices)",
        ),
        (
            one_limit().replace("kind: requests", "kind: bytes"),
            "limits.yaml: limits[0].kind: input should be 'requests' or 'tokens'",
        ),
        (
            one_limit().replace("name: free-requests", "name: Free"),
            "limits.yaml: limits[0].name: 'Free' must be lowercase letters, digits, '-', '_' "
            "or '.'",
        ),
        (
            one_limit(", cost: {completion_tokens: 4}"),
            "limits.yaml: limits[0]: cost applies to tokens limits only",
        ),
        (
            one_limit(", cost: {prompt_tokens: 1, completion_tokens: 1}"),
            "limits.yaml: limits[0]: cost applies to tokens limits only",
        ),
        (one_limit(", cost: {}"), "limits.yaml: limits[0]: cost applies to tokens limits only"),
        (
            tokens_limit(", cost: {prompt_tokens: -1}"),
            "limits.yaml: limits[0].cost.prompt_tokens: input should be greater than or equal to 0",
        ),
        (
            tokens_limit(", cost: {completion_tokens: -0.5}"),
            "limits.yaml: limits[0].cost.completion_tokens: input should be greater than or equal "
            "to 0",
        ),
        (
            tokens_limit(", cost: {completion_tokens: 1001}"),
            "limits.yaml: limits[0].cost.completion_tokens: input should be less than or equal to "
            "1000",
        ),
        (
            tokens_limit(", cost: {completion_tokens: .nan}"),
            "limits.yaml: limits[0].cost.completion_tokens: input should be less than or equal to "
            "1000",
        ),
        (
            tokens_limit(", cost: {completion_tokens: abc}"),
            "limits.yaml: limits[0].cost.completion_tokens: input should be a valid number, "
            "unable to parse string as a number",
        ),
        (
            tokens_limit(", cost: {output_tokens: 4}"),
            "limits.yaml: limits[0].cost.output_tokens: unknown key "
            "(expected one of: completion_tokens, prompt_tokens)",
        ),
        (
            tokens_limit(", cost: 4"),
            "limits.yaml: limits[0].cost: input should be a valid dictionary or instance of "
            "CostSpec",
        ),
        ("domain: maas\n", "limits.yaml: limits: is required"),
        ("", "limits.yaml: limits: is required"),
    ],
)
def test_config_errors(text: str, expected: str) -> None:
    assert config_error(text) == expected


def test_a_missing_field_names_it() -> None:
    text = "limits:\n  - {name: a, tier: free, limit: 1, window: 1m}\n"
    assert config_error(text) == "limits.yaml: limits[0].kind: is required"


def test_an_error_in_a_later_limit_names_its_index() -> None:
    text = one_limit() + "  - {name: b, tier: free, kind: tokens, limit: 0, window: 1m}\n"
    assert config_error(text) == (
        "limits.yaml: limits[1].limit: input should be greater than or equal to 1"
    )


def test_a_name_longer_than_63_characters() -> None:
    ok = "a" * 63
    assert parse_limits(one_limit().replace("free-requests", ok), SOURCE).limits[0].name == ok
    message = config_error(one_limit().replace("free-requests", "a" * 64))
    assert message.startswith("limits.yaml: limits[0].name: 'aaaa")


def test_duplicate_names() -> None:
    text = one_limit() + (
        "  - {name: other, tier: free, kind: tokens, limit: 1, window: 1m}\n"
        "  - {name: free-requests, tier: premium, kind: requests, limit: 20, window: 2m}\n"
    )
    with pytest.raises(ConfigError) as caught:
        parse_limits(text, SOURCE)
    assert str(caught.value) == "limits.yaml: limits[2].name: limit 'free-requests' is listed twice"
    assert caught.value.key == "limits[2].name"


def test_too_large_limit_times_window() -> None:
    assert config_error(one_limit(limit="1000000000", window="100d")) == (
        "limits.yaml: limits[0]: limit x window is too large to count exactly "
        "(1000000000 per 8640000.0s); use a shorter window"
    )


def test_the_largest_exact_limit_times_window_is_accepted() -> None:
    # levels range over +-(DEBT_WINDOWS + 1) x capacity, which must stay below 2**53:
    # with a 1 d window (86_400_000 ms) the largest limit is floor((2**53 - 1) / 65 / 86_400_000)
    day_ms = 86_400_000
    largest = (2**53 - 1) // ((DEBT_WINDOWS + 1) * day_ms)
    (limit,) = parse_limits(one_limit(limit=str(largest), window="1d"), SOURCE).limits
    assert limit.spec.capacity == largest * day_ms
    message = config_error(one_limit(limit=str(largest + 1), window="1d"))
    assert message.startswith("limits.yaml: limits[0]: limit x window is too large")


def test_a_limit_must_fit_envoys_uint32() -> None:
    message = config_error(one_limit(limit=str(2**32), window="1s"))
    assert message.startswith("limits.yaml: limits[0].limit: input should be less than or equal")


def test_invalid_yaml() -> None:
    message = config_error("limits: [\n")
    assert message.startswith("limits.yaml: is not valid YAML at line 2, column 1: ")
