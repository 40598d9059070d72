"""Who may use the operator API (admin_api.py): admin keys from a file, or Kubernetes.

Two permissions: `get` (read: explain, decisions, quota, policy) and `update` (change: purge).
- keys: a YAML file of SHA-256 digests, each with a name and `access: read | write`
  (`make demo` has one, for `sk-demo-admin`); re-read when it changes.
- kubernetes: the bearer token through a TokenReview, then a SubjectAccessReview of the verb on
  `resource` in `group` (default maas.opendatahub.io/gatewayadmin), cluster-wide or in
  `namespace`; so `oc adm policy add-cluster-role-to-user` with a ClusterRole granting
  get/update on gatewayadmin decides (k8s/components/operator/rbac.yaml has one).
"""

from __future__ import annotations

import hmac
import re
from dataclasses import dataclass
from typing import Literal, Protocol

from pydantic import Field, field_validator

from maas_authz.credentials import token_digest
from maas_authz.identity import TokenReviewer
from maas_authz.kube_reviews import ResourceCheck
from maas_authz.kubernetes import KubernetesApi, SubjectAccessReviewer, TokenReviewReviewer
from maas_authz.model_path import ModelRef
from maas_common.config import StrictModel, parse_yaml_text, validate
from maas_common.errors import ConfigError

Verb = Literal["get", "update"]
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True, slots=True)
class AdminVerdict:
    status: Literal["ok", "unauthenticated", "forbidden"]
    operator: str = ""  # who, for the audit log line (never the credential)


class AdminAuthenticator(Protocol):
    """Raises maas_common.errors.BackendUnavailable when it cannot tell."""

    async def check(self, token: str, verb: Verb) -> AdminVerdict: ...


class AdminKeySpec(StrictModel):
    name: str = Field(min_length=1, max_length=128)
    sha256: str  # hex digest of the key: `printf %s "$KEY" | sha256sum`
    access: Literal["read", "write"] = "read"

    @field_validator("sha256")
    @classmethod
    def _hex(cls, value: str) -> str:
        if not _SHA256.match(value):
            raise ValueError("must be 64 lowercase hex digits (sha256sum of the key)")
        return value


class AdminKeyFileSpec(StrictModel):
    keys: list[AdminKeySpec] = Field(min_length=1)


@dataclass(frozen=True, slots=True)
class AdminKeys:
    by_digest: dict[bytes, AdminKeySpec]

    async def check(self, token: str, verb: Verb) -> AdminVerdict:
        digest = token_digest(token)
        found = None
        for known, spec in self.by_digest.items():  # a few keys: compare each, in constant time
            if hmac.compare_digest(known, digest):
                found = spec
        if found is None:
            return AdminVerdict("unauthenticated")
        if verb == "update" and found.access != "write":
            return AdminVerdict("forbidden", found.name)
        return AdminVerdict("ok", found.name)


def parse_admin_keys(text: str, source: str) -> AdminKeys:
    spec = validate(AdminKeyFileSpec, parse_yaml_text(text, source), source)
    by_digest: dict[bytes, AdminKeySpec] = {}
    for index, key in enumerate(spec.keys):
        digest = bytes.fromhex(key.sha256)
        if digest in by_digest:
            raise ConfigError(source, f"keys[{index}].sha256", "the same key is listed twice")
        by_digest[digest] = key
    return AdminKeys(by_digest)


class KubernetesAdmins:
    def __init__(
        self,
        api: KubernetesApi,
        *,
        group: str,
        resource: str,
        namespace: str,
        audiences: list[str],
        identities: TokenReviewer | None = None,
    ) -> None:
        self._identities = identities or TokenReviewReviewer(api, audiences)
        self._reviewers = {
            verb: SubjectAccessReviewer(api, ResourceCheck(verb, group, resource))
            for verb in ("get", "update")
        }
        self._scope = ModelRef(namespace, "")  # namespace "" = cluster-wide

    async def check(self, token: str, verb: Verb) -> AdminVerdict:
        identity = await self._identities.review(token)
        if identity is None:
            return AdminVerdict("unauthenticated")
        if not await self._reviewers[verb].allowed(identity, self._scope):
            return AdminVerdict("forbidden", identity.username)
        return AdminVerdict("ok", identity.username)
