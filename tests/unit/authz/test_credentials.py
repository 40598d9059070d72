"""The bearer token in the Authorization header, and the unverified `exp` of a JWT."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest

from maas_authz.credentials import BadCredentials, bearer_token, jwt_expiry

SECRET = "s3cr3t-T0KEN-value.abc_def~ghi"
LIMIT = 8192


def bad(result: str | BadCredentials) -> BadCredentials:
    assert isinstance(result, BadCredentials), result
    return result


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unsigned_jwt(claims: Any) -> str:
    header = b64url(json.dumps({"alg": "none", "typ": "JWT"}).encode())
    payload = b64url(json.dumps(claims).encode())
    return f"{header}.{payload}.sig"


# --- bearer_token -----------------------------------------------------------------------------


def test_a_bearer_token_is_returned() -> None:
    assert bearer_token(f"Bearer {SECRET}", LIMIT) == SECRET


@pytest.mark.parametrize("scheme", ["bearer", "BEARER", "Bearer", "bEaReR"])
def test_the_scheme_is_case_insensitive(scheme: str) -> None:
    assert bearer_token(f"{scheme} {SECRET}", LIMIT) == SECRET


def test_surrounding_whitespace_is_ignored() -> None:
    assert bearer_token(f"  Bearer   {SECRET}  ", LIMIT) == SECRET


def test_a_jwt_with_padding_characters_is_accepted() -> None:
    token = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2lnbmF0dXJl+/=="
    assert bearer_token(f"Bearer {token}", LIMIT) == token


def test_missing_header() -> None:
    result = bad(bearer_token(None, LIMIT))
    assert result.code == "missing_token"
    assert result.message == "missing Authorization header: send 'Authorization: Bearer <token>'"


@pytest.mark.parametrize("header", ["Bearer", "Bearer ", "Bearer    ", "bearer\t"])
def test_empty_token(header: str) -> None:
    result = bad(bearer_token(header, LIMIT))
    assert result.code == "missing_token"
    assert result.message == "the bearer token is empty"


@pytest.mark.parametrize(
    "header",
    [
        "",
        "   ",
        f"Basic {SECRET}",
        f"Token {SECRET}",
        SECRET,
        f"Bearer:{SECRET}",
        f"Bearer\t{SECRET}",
    ],
)
def test_wrong_scheme(header: str) -> None:
    result = bad(bearer_token(header, LIMIT))
    assert result.code == "invalid_authorization_header"
    assert result.message == (
        "the Authorization header must use the Bearer scheme: 'Authorization: Bearer <token>'"
    )


def test_token_of_exactly_the_maximum_length_is_accepted() -> None:
    token = "a" * 64
    assert bearer_token(f"Bearer {token}", 64) == token


def test_oversized_token() -> None:
    token = "a" * 65
    result = bad(bearer_token(f"Bearer {token}", 64))
    assert result.code == "invalid_token"
    assert result.message == "the bearer token is longer than 64 characters"


@pytest.mark.parametrize(
    "token",
    [
        f"{SECRET} other-token",
        f"{SECRET},other-token",
        f"{SECRET}, other-token",
        f"{SECRET}\tother",
        f'{SECRET}"',
        f"{SECRET};x",
        f"={SECRET}",
        f"{SECRET}=x",
        "tökén",
    ],
)
def test_characters_a_token_cannot_have(token: str) -> None:
    result = bad(bearer_token(f"Bearer {token}", LIMIT))
    assert result.code == "invalid_token"
    assert "a single token is expected, without spaces or commas" in result.message


@pytest.mark.parametrize(
    "header",
    [
        f"Basic {SECRET}",
        f"Bearer {SECRET} {SECRET}",
        f"Bearer {SECRET},{SECRET}",
        f"Bearer {SECRET}{'x' * LIMIT}",
        f"Bearer {SECRET}\x00",
        f'Bearer "{SECRET}"',
        f"{SECRET} {SECRET}",
        SECRET,
    ],
)
def test_no_message_ever_contains_the_token(header: str) -> None:
    result = bad(bearer_token(header, LIMIT))
    assert SECRET not in result.message
    assert SECRET[:8] not in result.message
    assert SECRET not in result.code
    assert SECRET not in repr(result)


# --- jwt_expiry -------------------------------------------------------------------------------


def test_jwt_expiry_reads_exp() -> None:
    assert jwt_expiry(unsigned_jwt({"sub": "x", "exp": 1_700_000_030})) == 1_700_000_030.0


def test_jwt_expiry_returns_a_float() -> None:
    result = jwt_expiry(unsigned_jwt({"exp": 42}))
    assert isinstance(result, float)
    assert result == 42.0


def test_jwt_expiry_fractional_exp() -> None:
    assert jwt_expiry(unsigned_jwt({"exp": 1_700_000_000.5})) == 1_700_000_000.5


def test_jwt_expiry_works_whatever_the_base64_padding() -> None:
    # payloads whose encodings need 0, 1 and 2 padding characters
    for sub in ("", "a", "ab", "abc"):
        token = unsigned_jwt({"sub": sub, "exp": 7})
        assert "=" not in token
        assert jwt_expiry(token) == 7.0, sub


def test_jwt_expiry_without_exp() -> None:
    assert jwt_expiry(unsigned_jwt({"sub": "system:serviceaccount:ns:name"})) is None


@pytest.mark.parametrize(
    "token",
    [
        "",
        "not-a-jwt",
        "a.b",
        "a.b.c.d",
        "a.!!!.c",
        "a.b.c",
        "header.%%%.sig",
        "a.tökén.c",
        f"a.{b64url(b'not json')}.c",
        f"a.{b64url(bytes([0xFF, 0xFE, 0x00]))}.c",
        f"a.{b64url(b'[1, 2, 3]')}.c",
        f"a.{b64url(b'1700000000')}.c",
        f"a.{b64url(b'null')}.c",
        SECRET,
    ],
)
def test_jwt_expiry_of_garbage_is_none(token: str) -> None:
    assert jwt_expiry(token) is None


@pytest.mark.parametrize("exp", ["1700000000", None, [1700000000], {"at": 1}])
def test_jwt_expiry_non_numeric_exp_is_none(exp: Any) -> None:
    assert jwt_expiry(unsigned_jwt({"exp": exp})) is None


@pytest.mark.parametrize("exp", [True, False])
def test_jwt_expiry_boolean_exp_is_none(exp: bool) -> None:
    assert jwt_expiry(unsigned_jwt({"exp": exp})) is None
