"""sk-oai API keys: format, hash (as maas-api stores it) and the verdict on a record."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta

import pytest

from maas_authz.api_keys import (
    ApiKeyRecord,
    KeyIdentity,
    KeyParts,
    hash_key,
    hash_parts,
    is_api_key,
    judge,
    parse_key,
)

NOW = datetime(2026, 12, 7, 12, 0, tzinfo=UTC)
KEY = "sk-oai-AbC123xyz_s3cr3tVALUE42"


def record(**changes: object) -> ApiKeyRecord:
    fields: dict[str, object] = {
        "id": "0b6f1c3e-8d5a-4f1e-9c2b-1a2b3c4d5e6f",
        "username": "alice",
        "groups": ("team-a", "system:authenticated"),
        "status": "active",
        "expires_at": NOW + timedelta(days=1),
        "subscription": "premium",
        "name": "laptop",
    }
    fields.update(changes)
    return ApiKeyRecord(**fields)  # type: ignore[arg-type]


def test_the_stored_hash_is_sha256_of_key_id_nul_secret_in_hex() -> None:
    expected = hashlib.sha256(b"AbC123xyz\x00s3cr3tVALUE42").hexdigest()
    assert hash_parts("AbC123xyz", "s3cr3tVALUE42") == expected
    assert hash_key(KEY) == expected
    assert parse_key(KEY) == KeyParts("AbC123xyz", "s3cr3tVALUE42")


def test_the_secret_is_split_at_the_first_underscore_only() -> None:
    # base62 has no underscore, so a second one makes the secret invalid, as in maas-api
    assert parse_key("sk-oai-id_sec_ret") is None


@pytest.mark.parametrize(
    "token",
    [
        "sk-oai-",
        "sk-oai-_secret",
        "sk-oai-keyid_",
        "sk-oai-keyidsecret",
        "sk-oai-key-id_secret",
        "sk-oai-keyid_sec ret",
        "sk-oai-kéy_secret",
        "sk-OAI-keyid_secret",
        "sk-demo-free",
        "sk-oai-" + "a" * 300 + "_b",
    ],
)
def test_malformed_keys_are_not_parsed(token: str) -> None:
    assert parse_key(token) is None
    assert hash_key(token) is None


def test_only_the_sk_oai_prefix_marks_an_api_key() -> None:
    assert is_api_key(KEY)
    assert is_api_key("sk-oai-broken")  # still an API key: refused as one, not sent to TokenReview
    assert not is_api_key("sk-demo-free")
    assert not is_api_key("eyJhbGciOi.x.y")


def test_an_active_unexpired_key_names_its_owner_groups_and_subscription() -> None:
    assert judge(record(subscription=" premium "), NOW) == KeyIdentity(
        key_id="0b6f1c3e-8d5a-4f1e-9c2b-1a2b3c4d5e6f",
        key_name="laptop",
        username="alice",
        groups=("team-a", "system:authenticated"),
        subscription="premium",
        expires_at=record().expires_at,  # so that caches never keep the verdict beyond it
    )
    assert isinstance(judge(record(expires_at=None), NOW), KeyIdentity)


@pytest.mark.parametrize(
    ("found", "reason"),
    [
        (None, "key not found"),
        (record(status="revoked"), "key revoked or expired"),
        (record(status="expired"), "key revoked or expired"),
        (record(status="something-else"), "key revoked or expired"),
        (record(expires_at=NOW), "key revoked or expired"),
        (record(expires_at=NOW - timedelta(seconds=1)), "key revoked or expired"),
        (record(subscription=""), "key has no subscription bound"),
        (record(subscription="  "), "key has no subscription bound"),
    ],
)
def test_keys_are_refused_with_maas_apis_reasons(found: ApiKeyRecord | None, reason: str) -> None:
    assert judge(found, NOW) == reason
