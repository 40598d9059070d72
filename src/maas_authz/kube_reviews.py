"""TokenReview and SubjectAccessReview wire shapes: request bodies and result parsing, pure."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from maas_authz.identity import Identity
from maas_authz.model_path import ModelRef


class MalformedReview(ValueError):
    """The API server answered with something that is not a review result."""


@dataclass(frozen=True, slots=True)
class ResourceCheck:
    """The RBAC question asked for a model: verb on group/resource, namespace and name."""

    verb: str = "post"
    group: str = "serving.kserve.io"
    resource: str = "llminferenceservices"


def token_review_body(token: str, audiences: Sequence[str]) -> dict[str, Any]:
    spec: dict[str, Any] = {"token": token}
    if audiences:
        spec["audiences"] = list(audiences)
    return {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "spec": spec}


def parse_token_review(body: Any, audiences: Sequence[str]) -> Identity | None:
    """The identity of an authenticated review, None for an unauthenticated one.

    A bad token is not an HTTP error: the API server answers 201 with `authenticated` unset and an
    `error` string. When audiences were asked for, the answer must name at least one of them.
    """
    status = _status_of(body)
    if not status.get("authenticated"):
        return None
    user = status.get("user")
    if not isinstance(user, dict) or not isinstance(user.get("username"), str):
        raise MalformedReview("an authenticated TokenReview without user.username")
    if audiences:
        granted = status.get("audiences")
        if not isinstance(granted, list):
            return None
        if not {a for a in granted if isinstance(a, str)} & set(audiences):
            return None
    groups = user.get("groups") or []
    if not isinstance(groups, list) or not all(isinstance(g, str) for g in groups):
        raise MalformedReview("TokenReview user.groups is not a list of strings")
    uid = user.get("uid")
    uid = uid if isinstance(uid, str) else ""
    return Identity(username=user["username"], uid=uid, groups=tuple(groups))


def subject_access_review_body(
    identity: Identity, model: ModelRef, check: ResourceCheck
) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "user": identity.username,
        "groups": list(identity.groups),
        "resourceAttributes": {
            "group": check.group,
            "resource": check.resource,
            "verb": check.verb,
            "namespace": model.namespace,
            "name": model.name,
        },
    }
    if identity.uid:
        spec["uid"] = identity.uid
    return {"apiVersion": "authorization.k8s.io/v1", "kind": "SubjectAccessReview", "spec": spec}


def parse_subject_access_review(body: Any) -> bool:
    status = _status_of(body)
    allowed = status.get("allowed")
    if not isinstance(allowed, bool):
        raise MalformedReview("SubjectAccessReview status.allowed is missing or not a boolean")
    return allowed and not status.get("denied", False)


def _status_of(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise MalformedReview("the review is not a JSON object")
    status = body.get("status")
    if not isinstance(status, dict):
        raise MalformedReview("the review has no status object")
    return status
