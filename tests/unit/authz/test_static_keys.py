"""Static API keys: only SHA-256 digests are stored, and a key matches by its digest only."""

from __future__ import annotations

import hashlib

import pytest

from maas_authz.identity import Identity
from maas_authz.static_keys import StaticKeyReviewer, parse_static_keys
from maas_common.errors import ConfigError

ALICE_KEY = "sk-alice-0123456789"
BOB_KEY = "sk-bob-9876543210"


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


KEY_FILE = f"""\
keys:
  - sha256: {digest(ALICE_KEY)}
    username: alice
    uid: alice-1
    groups: [tier-premium-users, team-a]
  - sha256: {digest(BOB_KEY)}
    username: bob
"""


def parse_error(text: str) -> ConfigError:
    with pytest.raises(ConfigError) as caught:
        parse_static_keys(text, "keys.yaml")
    return caught.value


@pytest.fixture
def reviewer() -> StaticKeyReviewer:
    return parse_static_keys(KEY_FILE, "keys.yaml")


@pytest.mark.asyncio
async def test_a_key_authenticates_as_its_identity(reviewer: StaticKeyReviewer) -> None:
    assert await reviewer.review(ALICE_KEY) == Identity(
        "alice", "alice-1", ("tier-premium-users", "team-a")
    )
    bob = await reviewer.review(BOB_KEY)
    assert bob is not None and bob.username == "bob"
    assert len(reviewer) == 2


@pytest.mark.asyncio
async def test_uid_defaults_to_username_and_groups_to_none(reviewer: StaticKeyReviewer) -> None:
    assert await reviewer.review(BOB_KEY) == Identity("bob", "bob", ())


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "token",
    [
        "sk-wrong",
        "",
        ALICE_KEY + " ",
        ALICE_KEY.upper(),
        ALICE_KEY[:-1],
        digest(ALICE_KEY),  # the stored digest itself is not a key
        digest(ALICE_KEY).upper(),
    ],
)
async def test_anything_but_the_key_is_refused(reviewer: StaticKeyReviewer, token: str) -> None:
    assert await reviewer.review(token) is None


@pytest.mark.asyncio
async def test_an_uppercase_digest_in_the_file_matches() -> None:
    text = f"keys:\n  - sha256: {digest(ALICE_KEY).upper()}\n    username: alice\n"
    reviewer = parse_static_keys(text, "keys.yaml")
    assert await reviewer.review(ALICE_KEY) == Identity("alice", "alice", ())


@pytest.mark.asyncio
async def test_an_empty_key_list_refuses_everything() -> None:
    reviewer = parse_static_keys("keys: []\n", "keys.yaml")
    assert len(reviewer) == 0
    assert await reviewer.review(ALICE_KEY) is None


@pytest.mark.parametrize(
    "value",
    [
        ALICE_KEY,  # the raw key instead of its digest
        "z" * 64,  # not hex
        digest(ALICE_KEY)[:-1],  # too short
        digest(ALICE_KEY) + "0",  # too long
        hashlib.sha1(ALICE_KEY.encode()).hexdigest(),
    ],
)
def test_a_value_that_is_not_a_hex_digest_is_refused(value: str) -> None:
    error = parse_error(f"keys:\n  - sha256: '{value}'\n    username: alice\n")
    assert error.source == "keys.yaml"
    assert error.key == "keys[0].sha256"
    assert str(error) == (
        "keys.yaml: keys[0].sha256: expected the 64-character hex SHA-256 digest of the key, "
        "not the key"
    )
    assert ALICE_KEY not in str(error)


def test_error_names_the_position_of_the_bad_entry() -> None:
    text = KEY_FILE + "  - sha256: not-a-digest\n    username: carol\n"
    assert parse_error(text).key == "keys[2].sha256"


def test_duplicate_keys_are_refused() -> None:
    text = KEY_FILE + f"  - sha256: {digest(ALICE_KEY).upper()}\n    username: mallory\n"
    error = parse_error(text)
    assert str(error) == "keys.yaml: keys[2].sha256: the same key is listed twice"


def test_missing_username_is_refused() -> None:
    error = parse_error(f"keys:\n  - sha256: {digest(ALICE_KEY)}\n")
    assert str(error) == "keys.yaml: keys[0].username: is required"


def test_empty_username_is_refused() -> None:
    error = parse_error(f"keys:\n  - sha256: {digest(ALICE_KEY)}\n    username: ''\n")
    assert error.key == "keys[0].username"


def test_unknown_key_is_refused() -> None:
    error = parse_error(f"keys:\n  - sha256: {digest(ALICE_KEY)}\n    username: a\n    key: x\n")
    assert str(error) == (
        "keys.yaml: keys[0].key: unknown key (expected one of: groups, sha256, uid, username)"
    )


def test_an_empty_file_is_refused() -> None:
    assert str(parse_error("")) == "keys.yaml: keys: is required"
