"""The subscription catalog: parsing the three CRDs, MaaSAuthPolicy access, and selection as
upstream maas-api's selector answers (codes and messages)."""

from __future__ import annotations

from collections.abc import Sequence
from decimal import Decimal
from typing import Any

import pytest

from maas_authz.identity import Identity
from maas_authz.model_path import ModelRef
from maas_authz.subscriptions import (
    NO_SUBSCRIPTION,
    NOT_OWNER,
    SEVERAL_SUBSCRIPTIONS,
    UNKNOWN_SUBSCRIPTION,
    InvalidObject,
    Selection,
    SubscriptionCatalog,
    SubscriptionDenied,
    TokenRateLimit,
    parse_subscription,
    parse_window,
)

NS = "models-as-a-service"
TINY = ModelRef("llm", "tiny")
BIG = ModelRef("llm", "big")
ALICE = Identity("alice", "uid-a", ("team-a", "system:authenticated"))
BOB = Identity("bob", "uid-b", ("team-b", "system:authenticated"))
CAROL = Identity("carol", "uid-c", ("system:authenticated",))


def model_ref(name: str, namespace: str = "llm") -> dict[str, Any]:
    return {
        "apiVersion": "maas.opendatahub.io/v1alpha1",
        "kind": "MaaSModelRef",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"modelRef": {"kind": "LLMInferenceService", "name": name}},
    }


def policy(
    name: str, models: Sequence[str], groups: Sequence[str] = (), users: Sequence[str] = ()
) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "namespace": NS},
        "spec": {
            "modelRefs": [{"namespace": m.split("/")[0], "name": m.split("/")[1]} for m in models],
            "subjects": {"groups": [{"name": g} for g in groups], "users": list(users)},
        },
    }


def subscription(
    name: str,
    models: dict[str, list[dict[str, Any]]],
    *,
    groups: Sequence[str] = (),
    users: Sequence[str] = (),
    priority: int | None = None,
    namespace: str = NS,
    **extra: Any,
) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "owner": {"groups": [{"name": g} for g in groups], "users": list(users)},
        "modelRefs": [
            {"namespace": m.split("/")[0], "name": m.split("/")[1], "tokenRateLimits": limits}
            for m, limits in models.items()
        ],
    }
    if priority is not None:
        spec["priority"] = priority
    spec.update(extra.pop("spec", {}))
    return {"metadata": {"name": name, "namespace": namespace}, "spec": spec, **extra}


PER_MINUTE = [{"limit": 100, "window": "1m"}]


def catalog(*subs: dict[str, Any], policies: list[Any] | None = None) -> SubscriptionCatalog:
    built, problems = SubscriptionCatalog.build(
        [model_ref("tiny"), model_ref("big")],
        policies
        if policies is not None
        else [policy("all", ["llm/tiny", "llm/big"], ["team-a", "team-b"])],
        subs,
    )
    assert problems == []
    return built


# --- access -----------------------------------------------------------------------------------


def test_access_comes_from_auth_policy_subjects_on_model_refs() -> None:
    cat = catalog(
        policies=[
            policy("tiny-for-team-a", ["llm/tiny"], groups=["team-a"]),
            policy("big-for-bob", ["llm/big"], users=["bob"]),
        ]
    )
    assert cat.allowed(ALICE, TINY)
    assert not cat.allowed(ALICE, BIG)
    assert cat.allowed(BOB, BIG)
    assert not cat.allowed(BOB, TINY)
    assert not cat.allowed(CAROL, TINY)


def test_a_policy_on_a_model_without_a_model_ref_grants_nothing() -> None:
    cat = catalog(policies=[policy("ghost", ["llm/ghost"], groups=["team-a"])])
    assert not cat.allowed(ALICE, ModelRef("llm", "ghost"))


# --- selection --------------------------------------------------------------------------------


def test_the_only_subscription_that_includes_the_model_is_selected() -> None:
    cat = catalog(
        subscription("free", {"llm/tiny": PER_MINUTE}, groups=["system:authenticated"]),
        subscription("big-only", {"llm/big": PER_MINUTE}, groups=["team-a"]),
    )
    chosen = cat.select(ALICE, TINY)
    assert isinstance(chosen, Selection)
    assert chosen.subscription.name == "free"
    assert chosen.model.token_limits == (TokenRateLimit(100, "1m", 60),)


def test_no_owned_subscription_with_the_model_is_not_found() -> None:
    cat = catalog(subscription("team-b", {"llm/tiny": PER_MINUTE}, groups=["team-b"]))
    assert cat.select(ALICE, TINY) == NO_SUBSCRIPTION
    assert (NO_SUBSCRIPTION.code, NO_SUBSCRIPTION.message) == (
        "not_found",
        "no matching subscription found for user",
    )


def test_several_owned_subscriptions_need_the_header() -> None:
    cat = catalog(
        subscription("free", {"llm/tiny": PER_MINUTE}, groups=["system:authenticated"]),
        subscription("premium", {"llm/tiny": PER_MINUTE}, groups=["team-a"], priority=10),
    )
    assert cat.select(ALICE, TINY) == SEVERAL_SUBSCRIPTIONS
    assert SEVERAL_SUBSCRIPTIONS.code == "multiple_subscriptions"
    assert "X-MaaS-Subscription" in SEVERAL_SUBSCRIPTIONS.message
    # the header picks one, by bare name or namespace/name
    for requested in ("premium", f"{NS}/premium"):
        chosen = cat.select(ALICE, TINY, requested)
        assert isinstance(chosen, Selection) and chosen.subscription.name == "premium"
    # carol owns only free, so she needs no header
    chosen = cat.select(CAROL, TINY)
    assert isinstance(chosen, Selection) and chosen.subscription.name == "free"


def test_a_requested_subscription_must_exist_be_owned_and_include_the_model() -> None:
    cat = catalog(
        subscription("premium", {"llm/tiny": PER_MINUTE}, groups=["team-a"]),
        subscription("big", {"llm/big": PER_MINUTE}, users=["alice"]),
    )
    assert cat.select(ALICE, TINY, "nope") == UNKNOWN_SUBSCRIPTION
    assert cat.select(ALICE, TINY, "other-ns/premium") == UNKNOWN_SUBSCRIPTION
    assert cat.select(BOB, TINY, "premium") == NOT_OWNER
    assert (NOT_OWNER.code, NOT_OWNER.message) == (
        "access_denied",
        "access denied to requested subscription",
    )
    assert cat.select(ALICE, TINY, "big") == SubscriptionDenied(
        "model_not_in_subscription", "subscription big does not include model llm/tiny"
    )


def test_a_bare_name_in_several_namespaces_picks_the_highest_priority() -> None:
    cat = catalog(
        subscription(
            "gold", {"llm/tiny": PER_MINUTE}, groups=["team-a"], namespace="a", priority=1
        ),
        subscription(
            "gold",
            {"llm/tiny": [{"limit": 5, "window": "1h"}]},
            groups=["team-a"],
            namespace="b",
            priority=7,
        ),
    )
    chosen = cat.select(ALICE, TINY, "gold")
    assert isinstance(chosen, Selection) and chosen.subscription.key.namespace == "b"
    chosen = cat.select(ALICE, TINY, "a/gold")
    assert isinstance(chosen, Selection) and chosen.subscription.key.namespace == "a"


def test_candidates_are_ordered_by_priority_then_largest_limit_then_name() -> None:
    cat = catalog(
        subscription("c", {"llm/tiny": [{"limit": 10, "window": "1m"}]}, users=["x"]),
        subscription("b", {"llm/tiny": [{"limit": 99, "window": "1m"}]}, users=["x"]),
        subscription("a", {"llm/tiny": [{"limit": 10, "window": "1m"}]}, users=["x"]),
        subscription("z", {"llm/tiny": [{"limit": 1, "window": "1m"}]}, users=["x"], priority=5),
    )
    assert [s.name for s in cat.subscriptions] == ["z", "b", "a", "c"]


@pytest.mark.parametrize(
    ("phase", "served"),
    [(None, True), ("Active", True), ("Degraded", True), ("Pending", False), ("Failed", False)],
)
def test_a_phase_set_by_the_controller_is_honoured(phase: str | None, served: bool) -> None:
    extra = {"status": {"phase": phase}} if phase else {}
    cat = catalog(subscription("s", {"llm/tiny": PER_MINUTE}, users=["alice"], **extra))
    chosen = cat.select(ALICE, TINY)
    if served:
        assert isinstance(chosen, Selection)
    else:
        assert chosen == SubscriptionDenied(
            "model_unhealthy", f"subscription is in {phase} phase (allowed: Active, Degraded)"
        )


def test_objects_being_deleted_are_left_out() -> None:
    deleting = subscription("s", {"llm/tiny": PER_MINUTE}, users=["alice"])
    deleting["metadata"]["deletionTimestamp"] = "2026-12-07T10:00:00Z"
    assert catalog(deleting).select(ALICE, TINY) == NO_SUBSCRIPTION


# --- parsing ----------------------------------------------------------------------------------


def test_every_field_of_a_subscription_is_read() -> None:
    sub = parse_subscription(
        subscription(
            "premium",
            {
                "llm/tiny": [{"limit": 1000, "window": "1m"}, {"limit": 50000, "window": "24h"}],
                "llm/big": PER_MINUTE,
            },
            groups=["team-a"],
            users=["bob"],
            priority=3,
            spec={
                "tokenMetadata": {
                    "organizationId": "org-1",
                    "costCenter": "cc-42",
                    "labels": {"env": "prod"},
                },
            },
        )
        | {"status": {"phase": "Active"}}
    )
    assert sub is not None
    assert sub.qualified_name == f"{NS}/premium"
    assert sub.groups == {"team-a"} and sub.users == {"bob"}
    assert sub.priority == 3 and sub.phase == "Active"
    assert (sub.organization_id, sub.cost_center, dict(sub.labels)) == (
        "org-1",
        "cc-42",
        {"env": "prod"},
    )
    assert sub.models[TINY].token_limits == (
        TokenRateLimit(1000, "1m", 60),
        TokenRateLimit(50000, "24h", 86400),
    )
    assert sub.max_limit == 50000


def test_billing_rate_is_an_exact_decimal() -> None:
    sub = parse_subscription(
        subscription(
            "paid",
            {"llm/tiny": PER_MINUTE},
            users=["alice"],
            spec={
                "modelRefs": [
                    {
                        "namespace": "llm",
                        "name": "tiny",
                        "tokenRateLimits": PER_MINUTE,
                        "billingRate": {"perToken": "0.0000025"},
                    }
                ]
            },
        )
    )
    assert sub is not None and sub.models[TINY].billing_per_token == Decimal("0.0000025")


@pytest.mark.parametrize(
    ("window", "seconds"), [("1s", 1), ("30s", 30), ("1m", 60), ("2h", 7200), ("9999h", 35996400)]
)
def test_windows_follow_the_crd_pattern(window: str, seconds: int) -> None:
    assert parse_window(window) == seconds


@pytest.mark.parametrize("window", ["0m", "1d", "10000s", "01m", "1", "m", "1M", " 1m", 60, None])
def test_windows_outside_the_crd_pattern_are_refused(window: object) -> None:
    with pytest.raises(ValueError, match="expected 1 to 9999 followed by s, m or h"):
        parse_window(window)


@pytest.mark.parametrize(
    ("change", "field", "problem"),
    [
        ({"modelRefs": []}, "spec.modelRefs", "needs at least one model"),
        (
            {"modelRefs": [{"namespace": "llm", "name": "tiny", "tokenRateLimits": []}]},
            "spec.modelRefs[0].tokenRateLimits",
            "needs at least one",
        ),
        (
            {
                "modelRefs": [
                    {
                        "namespace": "llm",
                        "name": "tiny",
                        "tokenRateLimits": [{"limit": 0, "window": "1m"}],
                    }
                ]
            },
            "spec.modelRefs[0].tokenRateLimits[0].limit",
            "expected 1 to 1000000000, got 0",
        ),
        (
            {
                "modelRefs": [
                    {
                        "namespace": "llm",
                        "name": "tiny",
                        "tokenRateLimits": [{"limit": "100", "window": "1m"}],
                    }
                ]
            },
            "spec.modelRefs[0].tokenRateLimits[0].limit",
            "expected a whole number",
        ),
        (
            {
                "modelRefs": [
                    {
                        "namespace": "llm",
                        "name": "tiny",
                        "tokenRateLimits": [{"limit": 100, "window": "1d"}],
                    }
                ]
            },
            "spec.modelRefs[0].tokenRateLimits[0].window",
            "got '1d'",
        ),
        (
            {
                "modelRefs": [
                    {
                        "namespace": "llm",
                        "name": "tiny",
                        "tokenRateLimits": [{"limit": 1_000_000_000, "window": "24h"}],
                    }
                ]
            },
            "spec.modelRefs[0].tokenRateLimits[0]",
            "too large to count exactly",
        ),
        (
            {"modelRefs": [{"namespace": "LLM", "name": "tiny", "tokenRateLimits": PER_MINUTE}]},
            "spec.modelRefs[0].namespace",
            "is not a namespace name",
        ),
        (
            {"modelRefs": [{"namespace": "llm", "tokenRateLimits": PER_MINUTE}]},
            "spec.modelRefs[0].name",
            "is required",
        ),
        (
            {
                "modelRefs": [
                    {"namespace": "llm", "name": "tiny", "tokenRateLimits": PER_MINUTE},
                    {"namespace": "llm", "name": "tiny", "tokenRateLimits": PER_MINUTE},
                ]
            },
            "spec.modelRefs[1]",
            "listed twice",
        ),
        (
            {
                "modelRefs": [
                    {
                        "namespace": "llm",
                        "name": "tiny",
                        "tokenRateLimits": PER_MINUTE,
                        "billingRate": {"perToken": "cheap"},
                    }
                ]
            },
            "spec.modelRefs[0].billingRate.perToken",
            "expected a decimal number",
        ),
        (
            {
                "modelRefs": [
                    {
                        "namespace": "llm",
                        "name": "tiny",
                        "tokenRateLimits": PER_MINUTE,
                        "billingRate": {"perToken": "-1"},
                    }
                ]
            },
            "spec.modelRefs[0].billingRate.perToken",
            "0 or more",
        ),
        ({"priority": "high"}, "spec.priority", "expected a whole number"),
        ({"owner": {"groups": ["team-a"]}}, "spec.owner.groups[0]", "expected {name: GROUP}"),
        ({"owner": "team-a"}, "spec.owner", "expected an object"),
    ],
)
def test_a_broken_subscription_names_itself_and_the_field(
    change: dict[str, Any], field: str, problem: str
) -> None:
    broken = subscription("broken", {"llm/tiny": PER_MINUTE}, users=["alice"], spec=change)
    with pytest.raises(InvalidObject) as caught:
        parse_subscription(broken)
    assert caught.value.field == field
    assert problem in caught.value.problem
    assert str(caught.value).startswith(f"MaaSSubscription {NS}/broken: {field}: ")


def test_a_broken_object_is_reported_and_skipped_while_the_others_apply() -> None:
    good = subscription("good", {"llm/tiny": PER_MINUTE}, users=["alice"])
    bad = subscription("bad", {"llm/tiny": [{"limit": 1, "window": "1w"}]}, users=["alice"])
    unnamed = {"spec": {}}
    built, problems = SubscriptionCatalog.build(
        [model_ref("tiny"), {"metadata": {"name": "x", "namespace": "llm"}, "spec": {}}],
        [policy("p", ["llm/tiny"], users=["alice"]), policy("empty", ["llm/tiny"])],
        [good, bad, unnamed],
    )
    assert sorted(str(p) for p in problems) == [
        "MaaSAuthPolicy models-as-a-service/empty: spec.subjects: needs groups or users",
        "MaaSModelRef llm/x: spec.modelRef.kind: is required",
        "MaaSSubscription (unnamed): metadata: is missing",
        "MaaSSubscription models-as-a-service/bad: spec.modelRefs[0].tokenRateLimits[0].window: "
        "expected 1 to 9999 followed by s, m or h (e.g. 1m), got '1w'",
    ]
    assert [s.name for s in built.subscriptions] == ["good"]
    assert built.allowed(ALICE, TINY)
    chosen = built.select(ALICE, TINY)
    assert isinstance(chosen, Selection) and chosen.subscription.name == "good"
