"""TokenReview / SubjectAccessReview wire shapes, parsed from the recorded answers of a real API
server (see shared/docs/kubernetes.md)."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from maas_authz.identity import Identity
from maas_authz.kube_reviews import (
    MalformedReview,
    ResourceCheck,
    parse_subject_access_review,
    parse_token_review,
    subject_access_review_body,
    token_review_body,
)
from maas_authz.model_path import ModelRef

AUDIENCES = ["maas-default-gateway-sa"]
SA_USERNAME = "system:serviceaccount:maas-default-gateway-tier-free:alice"
SA_GROUPS = [
    "system:serviceaccounts",
    "system:serviceaccounts:maas-default-gateway-tier-free",
    "system:authenticated",
]

AUTHENTICATED: dict[str, Any] = {
    "kind": "TokenReview",
    "apiVersion": "authentication.k8s.io/v1",
    "metadata": {"creationTimestamp": None},
    "spec": {"token": "REDACTED", "audiences": AUDIENCES},
    "status": {
        "authenticated": True,
        "user": {
            "username": SA_USERNAME,
            "uid": "6c1b1e0e-8d3d-4a0b-9f61-2d3c1d0f0a11",
            "groups": SA_GROUPS,
            "extra": {"authentication.kubernetes.io/pod-name": ["x"]},
        },
        "audiences": AUDIENCES,
    },
}

UNAUTHENTICATED: dict[str, Any] = {
    "kind": "TokenReview",
    "apiVersion": "authentication.k8s.io/v1",
    "metadata": {"creationTimestamp": None},
    "spec": {"token": "REDACTED", "audiences": AUDIENCES},
    "status": {"user": {}, "error": "invalid bearer token"},
}


def authenticated(**status_changes: Any) -> dict[str, Any]:
    body = copy.deepcopy(AUTHENTICATED)
    for key, value in status_changes.items():
        if value is _DELETE:
            del body["status"][key]
        else:
            body["status"][key] = value
    return body


_DELETE = object()


# --- TokenReview ------------------------------------------------------------------------------


def test_authenticated_review_gives_the_identity() -> None:
    identity = parse_token_review(AUTHENTICATED, AUDIENCES)
    assert identity == Identity(
        username=SA_USERNAME,
        uid="6c1b1e0e-8d3d-4a0b-9f61-2d3c1d0f0a11",
        groups=tuple(SA_GROUPS),
    )
    assert isinstance(identity.groups, tuple)


def test_userid_of_a_service_account_is_its_name() -> None:
    identity = parse_token_review(AUTHENTICATED, AUDIENCES)
    assert identity is not None
    assert identity.userid == "alice"


@pytest.mark.parametrize(
    ("username", "userid"),
    [
        ("alice@example.com", "alice@example.com"),
        ("kube:admin", "kube:admin"),
        ("system:serviceaccount:ns:bob", "bob"),
        ("system:serviceaccount:ns:", "system:serviceaccount:ns:"),
        ("system:serviceaccount:ns", "system:serviceaccount:ns"),
        ("system:serviceaccount:ns:a:b", "system:serviceaccount:ns:a:b"),
        ("system:serviceaccounts:ns:bob", "system:serviceaccounts:ns:bob"),
    ],
)
def test_userid_is_the_username_unless_a_service_account(username: str, userid: str) -> None:
    assert Identity(username, "uid", ()).userid == userid


def test_unauthenticated_review_gives_none() -> None:
    assert parse_token_review(UNAUTHENTICATED, AUDIENCES) is None
    assert parse_token_review(UNAUTHENTICATED, []) is None


def test_authenticated_false_gives_none_even_with_a_user() -> None:
    assert parse_token_review(authenticated(authenticated=False), AUDIENCES) is None


def test_audiences_requested_but_missing_in_status_gives_none() -> None:
    assert parse_token_review(authenticated(audiences=_DELETE), AUDIENCES) is None


@pytest.mark.parametrize(
    "granted", [[], ["https://kubernetes.default.svc"], "maas-default-gateway-sa", None]
)
def test_audiences_disjoint_or_not_a_list_gives_none(granted: Any) -> None:
    assert parse_token_review(authenticated(audiences=granted), AUDIENCES) is None


def test_non_string_audiences_are_ignored_not_a_crash() -> None:
    # unhashable entries once raised TypeError (a 500) instead of being treated as no audience
    assert parse_token_review(authenticated(audiences=[{}, ["x"], 3]), AUDIENCES) is None
    body = authenticated(audiences=[{}, "maas-default-gateway-sa"])
    assert parse_token_review(body, AUDIENCES) is not None


def test_one_shared_audience_is_enough() -> None:
    body = authenticated(audiences=["other", "maas-default-gateway-sa"])
    identity = parse_token_review(body, ["maas-default-gateway-sa", "third"])
    assert identity is not None
    assert identity.username == SA_USERNAME


def test_audiences_not_requested_are_not_checked() -> None:
    identity = parse_token_review(authenticated(audiences=_DELETE), [])
    assert identity is not None
    assert identity.userid == "alice"


def test_missing_groups_and_uid_default_to_empty() -> None:
    body = authenticated(user={"username": "alice"})
    assert parse_token_review(body, AUDIENCES) == Identity("alice", "", ())


def test_non_string_uid_becomes_empty() -> None:
    body = authenticated(user={"username": "alice", "uid": 12, "groups": []})
    assert parse_token_review(body, AUDIENCES) == Identity("alice", "", ())


@pytest.mark.parametrize(
    "body",
    [
        None,
        [],
        "status",
        {"kind": "TokenReview"},
        {"status": None},
        {"status": ["authenticated"]},
    ],
)
def test_malformed_token_review_bodies(body: Any) -> None:
    with pytest.raises(MalformedReview):
        parse_token_review(body, AUDIENCES)


@pytest.mark.parametrize(
    ("user", "message"),
    [
        (None, "an authenticated TokenReview without user.username"),
        ({}, "an authenticated TokenReview without user.username"),
        ({"username": 7}, "an authenticated TokenReview without user.username"),
        ({"username": "a", "groups": "g"}, "TokenReview user.groups is not a list of strings"),
        ({"username": "a", "groups": ["g", 1]}, "TokenReview user.groups is not a list of strings"),
    ],
)
def test_malformed_authenticated_users(user: Any, message: str) -> None:
    with pytest.raises(MalformedReview) as caught:
        parse_token_review(authenticated(user=user), AUDIENCES)
    assert str(caught.value) == message


def test_malformed_review_is_a_value_error() -> None:
    assert issubclass(MalformedReview, ValueError)


def test_token_review_body_with_audiences() -> None:
    body = token_review_body("tok", ("a", "b"))
    assert body == {
        "apiVersion": "authentication.k8s.io/v1",
        "kind": "TokenReview",
        "spec": {"token": "tok", "audiences": ["a", "b"]},
    }
    assert isinstance(body["spec"]["audiences"], list)


def test_token_review_body_without_audiences_omits_the_key() -> None:
    assert token_review_body("tok", [])["spec"] == {"token": "tok"}


# --- SubjectAccessReview ----------------------------------------------------------------------

MODEL = ModelRef("llm", "tiny")


def sar(status: Any) -> dict[str, Any]:
    return {
        "apiVersion": "authorization.k8s.io/v1",
        "kind": "SubjectAccessReview",
        "status": status,
    }


def test_sar_allowed() -> None:
    assert parse_subject_access_review(sar({"allowed": True, "reason": "RBAC: allowed"})) is True


def test_sar_not_allowed() -> None:
    assert parse_subject_access_review(sar({"allowed": False})) is False
    assert parse_subject_access_review(sar({"allowed": False, "reason": "no RBAC"})) is False


def test_sar_denied_overrides_allowed() -> None:
    assert parse_subject_access_review(sar({"allowed": True, "denied": True})) is False


def test_sar_denied_false_with_allowed_true() -> None:
    assert parse_subject_access_review(sar({"allowed": True, "denied": False})) is True


@pytest.mark.parametrize(
    "body",
    [
        None,
        [],
        {"kind": "SubjectAccessReview"},
        sar(None),
        sar({}),
        sar({"allowed": "true"}),
        sar({"allowed": 1}),
    ],
)
def test_malformed_sar_bodies(body: Any) -> None:
    with pytest.raises(MalformedReview):
        parse_subject_access_review(body)


def test_sar_body_includes_resource_attributes_and_uid() -> None:
    identity = Identity(SA_USERNAME, "uid-1", tuple(SA_GROUPS))
    body = subject_access_review_body(identity, MODEL, ResourceCheck())
    assert body == {
        "apiVersion": "authorization.k8s.io/v1",
        "kind": "SubjectAccessReview",
        "spec": {
            "user": SA_USERNAME,
            "uid": "uid-1",
            "groups": SA_GROUPS,
            "resourceAttributes": {
                "group": "serving.kserve.io",
                "resource": "llminferenceservices",
                "verb": "post",
                "namespace": "llm",
                "name": "tiny",
            },
        },
    }
    assert isinstance(body["spec"]["groups"], list)


def test_sar_body_omits_uid_when_unset() -> None:
    body = subject_access_review_body(Identity("alice", "", ()), MODEL, ResourceCheck())
    assert "uid" not in body["spec"]
    assert body["spec"]["groups"] == []


def test_sar_body_uses_a_custom_resource_check() -> None:
    check = ResourceCheck(verb="get", group="example.com", resource="models")
    body = subject_access_review_body(Identity("alice", "", ("g",)), ModelRef("ns", "m"), check)
    assert body["spec"]["resourceAttributes"] == {
        "group": "example.com",
        "resource": "models",
        "verb": "get",
        "namespace": "ns",
        "name": "m",
    }


def test_resource_check_defaults_are_the_platforms() -> None:
    assert ResourceCheck() == ResourceCheck("post", "serving.kserve.io", "llminferenceservices")
