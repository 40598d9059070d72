"""Reading the bearer token out of a request, and what can be read from the token itself."""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
from dataclasses import dataclass

# RFC 6750 b64token: the characters a bearer token may contain.
_TOKEN68 = re.compile(r"[A-Za-z0-9\-._~+/]+=*")


@dataclass(frozen=True, slots=True)
class BadCredentials:
    """Why the Authorization header is unusable; `message` never contains the token."""

    code: str
    message: str


def bearer_token(header: str | None, max_length: int) -> str | BadCredentials:
    if header is None:
        return BadCredentials(
            "missing_token", "missing Authorization header: send 'Authorization: Bearer <token>'"
        )
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "bearer":
        return BadCredentials(
            "invalid_authorization_header",
            "the Authorization header must use the Bearer scheme: 'Authorization: Bearer <token>'",
        )
    token = token.strip()
    if not token:
        return BadCredentials("missing_token", "the bearer token is empty")
    if len(token) > max_length:
        return BadCredentials(
            "invalid_token", f"the bearer token is longer than {max_length} characters"
        )
    if not _TOKEN68.fullmatch(token):
        return BadCredentials(
            "invalid_token",
            "the bearer token contains characters a token cannot have "
            "(a single token is expected, without spaces or commas)",
        )
    return token


def token_digest(token: str) -> bytes:
    """SHA-256 of a credential: what caches key on and key files store, never the credential."""
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()


def jwt_expiry(token: str) -> float | None:
    """The `exp` claim of a JWT-shaped token, unverified; None when there is none.

    Only ever used to shorten a cache entry of a token that Kubernetes has already validated, so
    reading it without checking the signature is safe: a forged value can only make it shorter.
    """
    parts = token.split(".")
    if len(parts) != 3:
        return None
    payload = parts[1] + "=" * (-len(parts[1]) % 4)
    try:
        claims = json.loads(base64.urlsafe_b64decode(payload))
    except (binascii.Error, ValueError):
        return None
    exp = claims.get("exp") if isinstance(claims, dict) else None
    if isinstance(exp, int | float) and not isinstance(exp, bool):
        return float(exp)
    return None
