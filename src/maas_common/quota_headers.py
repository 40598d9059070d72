"""The x-ratelimit-*-requests / -tokens headers, written the same way by both servers:
maas-ratelimit on model responses, maas-authz on GET /v1/quota (OpenAI's names and format)."""

from __future__ import annotations


def reset_text(milliseconds: int) -> str:
    """A wait as OpenAI's reset headers write it ("1s", "6m0s"), rounded up to the second."""
    seconds = -(-milliseconds // 1000)
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes}m{seconds}s"


def quota_header_triple(
    unit: str, limit: int, remaining: int, reset_ms: int
) -> list[tuple[str, str]]:
    """limit, remaining and reset of one unit ("requests" or "tokens")."""
    return [
        (f"x-ratelimit-limit-{unit}", str(limit)),
        (f"x-ratelimit-remaining-{unit}", str(remaining)),
        (f"x-ratelimit-reset-{unit}", reset_text(reset_ms)),
    ]
