"""The outcome of a Check, independent of any wire format."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from maas_authz.identity import Identity
from maas_authz.model_path import ModelRef
from maas_authz.subscriptions import Selection
from maas_authz.tiers import Tier


@dataclass(frozen=True, slots=True)
class Allow:
    identity: Identity | None  # None only on an open path that needs no authentication
    tier: Tier | None
    model: ModelRef | None  # None on open paths
    # the subscription flow (authorization.mode): identity headers in MaaS's X-MaaS-* form
    subscription_flow: bool = False
    selection: Selection | None = None  # the subscription and its terms for `model`
    key_id: str = ""  # the sk-oai- key's id (never the key), when one authenticated
    # on open paths (no selection): the subscription the request names (a key's bound one, or
    # the client's X-MaaS-Subscription), passed on as upstream does, e.g. for maas-api's listing
    named_subscription: str = ""


@dataclass(frozen=True, slots=True)
class Deny:
    status: int  # the HTTP status the client gets
    code: str  # machine-readable reason; also the `reason` metric label
    message: str  # for the client: says what is wrong, never echoes a credential
    tier: str = ""  # known once the tier is resolved; for metrics
    user: str = ""  # known once authenticated; for the access log (never sent to the client)
    retry_after: int | None = None
    token_presented: bool = False  # selects the RFC 6750 form of WWW-Authenticate
    # upstream MaaS's form: the message as a text/plain body, the code in x-ext-auth-reason
    plain: bool = False


@dataclass(frozen=True, slots=True)
class QuotaReply:
    """A 200 answer to /v1/quota (quota.py), with what the access log should record."""

    body: dict[str, Any]
    headers: list[tuple[str, str]]
    metadata: dict[str, str]


Decision = Allow | Deny
