"""Tiers: the `tier-to-group-mapping` format, its three document shapes and tier resolution."""

from __future__ import annotations

import pytest

from maas_authz.tiers import DEFAULT_TIERS, Tier, TierMapping, parse_tier_document
from maas_common.errors import ConfigError

INSTANCE = "maas-default-gateway"


def defaults(instance: str = INSTANCE) -> TierMapping:
    return parse_tier_document(DEFAULT_TIERS, "built-in tiers", instance)


def resolved_name(mapping: TierMapping, *groups: str) -> str | None:
    tier = mapping.resolve(groups)
    return tier.name if tier else None


def parse_error(text: str, source: str = "tiers.yaml") -> str:
    with pytest.raises(ConfigError) as caught:
        parse_tier_document(text, source, INSTANCE)
    return str(caught.value)


# --- the platform defaults ------------------------------------------------------------------


def test_default_tiers_are_free_premium_enterprise_in_order() -> None:
    mapping = defaults()
    assert mapping.names() == ["free", "premium", "enterprise"]
    assert [t.level for t in mapping.tiers] == [0, 1, 2]


def test_default_free_tier_owns_system_authenticated() -> None:
    mapping = defaults()
    assert resolved_name(mapping, "system:authenticated") == "free"
    assert resolved_name(mapping, "tier-free-users") == "free"


@pytest.mark.parametrize(
    ("group", "tier"),
    [("tier-premium-users", "premium"), ("tier-enterprise-users", "enterprise")],
)
def test_default_paid_tiers_by_group(group: str, tier: str) -> None:
    assert resolved_name(defaults(), group) == tier


def test_default_tier_groups_include_the_implicit_service_account_group() -> None:
    free = defaults().tiers[0]
    assert free.groups == frozenset(
        {
            "tier-free-users",
            "system:authenticated",
            "system:serviceaccounts:maas-default-gateway-tier-free",
        }
    )


def test_a_maas_minted_service_account_token_resolves_to_its_tier() -> None:
    # the groups a TokenReview gives a ServiceAccount in maas-default-gateway-tier-premium
    groups = [
        "system:serviceaccounts",
        "system:serviceaccounts:maas-default-gateway-tier-premium",
        "system:authenticated",
    ]
    assert resolved_name(defaults(), *groups) == "premium"


# --- resolution rules ------------------------------------------------------------------------


def test_highest_level_wins_whatever_the_group_order() -> None:
    mapping = defaults()
    assert resolved_name(mapping, "tier-enterprise-users", "system:authenticated") == "enterprise"
    assert resolved_name(mapping, "system:authenticated", "tier-enterprise-users") == "enterprise"
    assert (
        resolved_name(mapping, "tier-premium-users", "tier-free-users", "tier-enterprise-users")
        == "enterprise"
    )


def test_highest_level_wins_even_when_listed_last() -> None:
    mapping = parse_tier_document(
        """
        - {name: gold, level: 5, groups: [g]}
        - {name: bronze, level: 1, groups: [g]}
        - {name: platinum, level: 9, groups: [g]}
        """,
        "tiers.yaml",
        INSTANCE,
    )
    assert resolved_name(mapping, "g") == "platinum"


def test_ties_go_to_the_tier_listed_first_for_a_shared_group() -> None:
    mapping = parse_tier_document(
        "- {name: alpha, level: 1, groups: [shared]}\n- {name: beta, level: 1, groups: [shared]}",
        "tiers.yaml",
        INSTANCE,
    )
    assert resolved_name(mapping, "shared") == "alpha"


def test_ties_go_to_the_tier_listed_first_across_groups() -> None:
    mapping = parse_tier_document(
        "- {name: alpha, level: 1, groups: [a]}\n- {name: beta, level: 1, groups: [b]}",
        "tiers.yaml",
        INSTANCE,
    )
    # whichever of the user's groups comes first, the tier listed first wins
    assert resolved_name(mapping, "b", "a") == "alpha"
    assert resolved_name(mapping, "a", "b") == "alpha"
    swapped = parse_tier_document(
        "- {name: beta, level: 1, groups: [b]}\n- {name: alpha, level: 1, groups: [a]}",
        "tiers.yaml",
        INSTANCE,
    )
    assert resolved_name(swapped, "a", "b") == "beta"


def test_tier_mapping_built_directly_applies_the_same_rules() -> None:
    low = Tier("low", 0, frozenset({"x"}))
    high = Tier("high", 3, frozenset({"y"}))
    tie = Tier("tie", 3, frozenset({"z"}))
    mapping = TierMapping([low, high, tie])
    assert mapping.resolve(["x", "z", "y"]) is high
    assert mapping.resolve(["x"]) is low
    assert mapping.resolve([]) is None


def test_implicit_group_uses_a_custom_instance() -> None:
    mapping = defaults(instance="gw-2")
    assert resolved_name(mapping, "system:serviceaccounts:gw-2-tier-enterprise") == "enterprise"
    assert resolved_name(mapping, "system:serviceaccounts:gw-2-tier-premium") == "premium"
    # the default instance's namespace no longer counts
    assert (
        resolved_name(mapping, "system:serviceaccounts:maas-default-gateway-tier-premium") is None
    )


def test_implicit_group_alone_is_enough_for_a_tier_without_groups() -> None:
    mapping = parse_tier_document("- {name: solo, level: 3}", "tiers.yaml", "inst")
    assert mapping.tiers[0].groups == frozenset({"system:serviceaccounts:inst-tier-solo"})
    assert resolved_name(mapping, "system:serviceaccounts:inst-tier-solo") == "solo"


def test_no_matching_group_gives_no_tier() -> None:
    mapping = parse_tier_document(
        "- {name: premium, level: 1, groups: [tier-premium-users]}", "tiers.yaml", INSTANCE
    )
    assert mapping.resolve(["system:authenticated", "someone-else"]) is None
    assert mapping.resolve([]) is None


def test_group_names_are_matched_exactly() -> None:
    mapping = defaults()
    assert resolved_name(mapping, "Tier-Premium-Users") is None
    assert resolved_name(mapping, "tier-premium-users ") is None
    assert resolved_name(mapping, "system:serviceaccounts:maas-default-gateway-tier-") is None


# --- accepted document shapes ------------------------------------------------------------------

BARE_LIST = """\
- name: free
  displayName: Free Tier
  description: for everyone
  level: 0
  groups: [system:authenticated]
- name: premium
  level: 1
  groups: [tier-premium-users]
"""


def _assert_two_tier_mapping(mapping: TierMapping) -> None:
    assert mapping.names() == ["free", "premium"]
    assert resolved_name(mapping, "system:authenticated") == "free"
    assert resolved_name(mapping, "system:authenticated", "tier-premium-users") == "premium"


def test_shape_bare_list() -> None:
    _assert_two_tier_mapping(parse_tier_document(BARE_LIST, "tiers.yaml", INSTANCE))


def test_shape_tiers_mapping() -> None:
    indented = "".join(f"  {line}\n" for line in BARE_LIST.splitlines())
    _assert_two_tier_mapping(parse_tier_document("tiers:\n" + indented, "tiers.yaml", INSTANCE))


def test_shape_whole_configmap_with_data_tiers_string() -> None:
    indented = "".join(f"    {line}\n" for line in BARE_LIST.splitlines())
    configmap = (
        "apiVersion: v1\n"
        "kind: ConfigMap\n"
        "metadata:\n"
        "  name: tier-to-group-mapping\n"
        "  namespace: maas-api\n"
        "data:\n"
        "  tiers: |\n" + indented
    )
    _assert_two_tier_mapping(parse_tier_document(configmap, "configmap.yaml", INSTANCE))


# --- errors, with exact messages -------------------------------------------------------------


def test_error_duplicate_tier_name() -> None:
    text = "- {name: free, level: 0}\n- {name: paid, level: 1}\n- {name: free, level: 2}"
    assert parse_error(text) == "tiers.yaml: tiers[2].name: tier 'free' is listed twice"


def test_error_bad_tier_name_uppercase() -> None:
    assert parse_error("- {name: Free, level: 0}") == (
        "tiers.yaml: tiers[0].name: tier name 'Free' must be a lowercase DNS label "
        "(it is part of a namespace)"
    )


@pytest.mark.parametrize("name", ["-free", "free-", "free_tier", "free.tier", "", "a" * 64])
def test_error_bad_tier_names(name: str) -> None:
    message = parse_error(f"- {{name: '{name}', level: 0}}")
    assert message.startswith("tiers.yaml: tiers[0].name: tier name ")
    assert "must be a lowercase DNS label" in message


def test_longest_tier_name_that_still_makes_a_namespace_is_accepted() -> None:
    name = "a" * (63 - len(f"{INSTANCE}-tier-"))
    mapping = parse_tier_document(f"- {{name: {name}, level: 0}}", "tiers.yaml", INSTANCE)
    assert mapping.names() == [name]


def test_tier_name_whose_namespace_would_be_too_long_is_refused() -> None:
    name = "a" * (64 - len(f"{INSTANCE}-tier-"))
    assert parse_error(f"- {{name: {name}, level: 0}}") == (
        f"tiers.yaml: tiers[0].name: namespace '{INSTANCE}-tier-{name}' would be longer than "
        "63 characters"
    )


def test_error_unknown_key() -> None:
    assert parse_error("- {name: free, level: 0, colour: blue}") == (
        "tiers.yaml: tiers[0].colour: unknown key "
        "(expected one of: description, displayName, groups, level, name)"
    )


def test_error_unknown_top_level_key_next_to_tiers() -> None:
    assert parse_error("tiers: [{name: free, level: 0}]\nextra: 1") == (
        "tiers.yaml: extra: unknown key (expected one of: tiers)"
    )


def test_error_missing_level() -> None:
    assert parse_error("- {name: free}\n") == "tiers.yaml: tiers[0].level: is required"


def test_error_missing_level_on_the_second_tier() -> None:
    assert parse_error("- {name: free, level: 0}\n- {name: paid}") == (
        "tiers.yaml: tiers[1].level: is required"
    )


@pytest.mark.parametrize("text", ["[]", "tiers: []"])
def test_error_empty_list(text: str) -> None:
    assert parse_error(text) == (
        "tiers.yaml: tiers: list should have at least 1 item after validation, not 0"
    )


def test_error_configmap_without_data_tiers() -> None:
    text = "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: tier-to-group-mapping}\ndata: {}\n"
    assert parse_error(text, "cm.yaml") == (
        "cm.yaml: data.tiers: the ConfigMap must hold a YAML list in key 'tiers'"
    )


def test_error_configmap_without_data_at_all() -> None:
    assert parse_error("kind: ConfigMap\n", "cm.yaml") == (
        "cm.yaml: data.tiers: the ConfigMap must hold a YAML list in key 'tiers'"
    )


def test_error_configmap_whose_data_is_not_a_mapping() -> None:
    assert parse_error("kind: ConfigMap\ndata: just-a-string\n", "cm.yaml") == (
        "cm.yaml: data.tiers: the ConfigMap must hold a YAML list in key 'tiers'"
    )


def test_error_configmap_whose_tiers_is_a_list_not_a_string() -> None:
    assert parse_error("kind: ConfigMap\ndata:\n  tiers: [{name: free, level: 0}]\n") == (
        "tiers.yaml: data.tiers: the ConfigMap must hold a YAML list in key 'tiers'"
    )


def test_error_inside_configmap_tiers_names_the_embedded_source() -> None:
    text = 'kind: ConfigMap\ndata:\n  tiers: "- {name: free}"\n'
    assert parse_error(text, "cm.yaml") == "cm.yaml (data.tiers): tiers[0].level: is required"


@pytest.mark.parametrize("text", ["42", "", "just text"])
def test_error_document_that_is_neither_list_nor_mapping(text: str) -> None:
    assert parse_error(text) == (
        "tiers.yaml: (top level): expected a list of tiers or a 'tiers:' key"
    )


def test_error_invalid_yaml_names_the_line() -> None:
    message = parse_error("- {name: free, level: 0\n")
    assert message.startswith("tiers.yaml: is not valid YAML at line ")
