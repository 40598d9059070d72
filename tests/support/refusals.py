"""The 429 the README shows for the free tier's requests limit, as every test tier expects it."""

from __future__ import annotations

from typing import Any


def free_requests_refusal_headers(retry_after: int | str) -> list[tuple[str, str]]:
    """The headers maas-ratelimit adds to the refusal, in order."""
    return [
        ("retry-after", str(retry_after)),
        ("x-maas-ratelimit-limit", "free-requests"),
        ("content-type", "application/json"),
    ]


def free_requests_refusal_body(retry_after: int | str) -> dict[str, Any]:
    """The JSON body, in the OpenAI error shape."""
    return {
        "error": {
            "message": "rate limit exceeded: free tier: 5 requests per 2m; "
            f"retry in {retry_after}s",
            "type": "requests",
            "code": "rate_limit_exceeded",
        }
    }
