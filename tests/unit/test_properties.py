"""Property-based tests (hypothesis) over the decoders and decision functions that read what a
client, Envoy, the API server or an operator's file sends: whatever the input, each answers
with a value of its declared kind or a ConfigError naming the file, never another exception,
and what it accepts obeys its contract.

Profiles (MAAS_HYPOTHESIS_PROFILE): `ci` (default; deterministic, a few hundred examples per
property) and `long` (randomized, 20,000 each: `MAAS_HYPOTHESIS_PROFILE=long pytest
tests/unit/test_properties.py`).
"""

from __future__ import annotations

import base64
import json
import os
import string
from typing import Any

import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from maas_authz.admin_auth import parse_admin_keys
from maas_authz.api_key_store import parse_api_key_file
from maas_authz.api_keys import hash_key, parse_key
from maas_authz.body_model import model_in_body
from maas_authz.credentials import BadCredentials, bearer_token, jwt_expiry
from maas_authz.kube_reviews import (
    MalformedReview,
    parse_subject_access_review,
    parse_token_review,
)
from maas_authz.model_path import (
    BadPath,
    BodyRoute,
    ModelRef,
    OpenPath,
    PathRouting,
    PathTemplate,
    is_namespace_name,
    is_object_name,
)
from maas_authz.static_keys import parse_static_keys
from maas_authz.subscription_file import parse_subscription_file
from maas_authz.subscriptions import (
    InvalidObject,
    parse_auth_policy,
    parse_model_ref,
    parse_subscription,
)
from maas_authz.tiers import parse_tier_document
from maas_common.config import parse_duration
from maas_common.errors import ConfigError
from maas_ratelimit.bucket import BucketSpec, current_level, ms_until_full, remaining_tokens
from maas_ratelimit.descriptors import parse_reservation
from maas_ratelimit.limits import parse_limits

settings.register_profile(
    "ci",
    max_examples=300,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "long", max_examples=20_000, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("MAAS_HYPOTHESIS_PROFILE", "ci"))

# -- strategies ---------------------------------------------------------------------------------

# the keys the config files use, so that generated documents reach past the top level
VOCABULARY = [
    "name", "tier", "tiers", "kind", "limit", "limits", "window", "groups", "level", "keys",
    "key", "sha256", "user", "users", "model", "models", "domain", "prices", "budgets", "period",
    "timezone", "tokens", "cost", "requests", "subscription", "subscriptions", "apiVersion",
    "metadata", "spec", "namespace", "owner", "tokenRateLimits", "modelRefs", "subjects",
    "displayName", "description", "access", "role", "status", "expires_at", "key_id",
    "prompt", "completion", "per_million", "billingRate", "perToken", "phase",
]  # fmt: skip

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=40),
    st.sampled_from(["1m", "2s", "500ms", "-1s", "1e400h", "free", "*", "month", "Europe/Berlin"]),
)
keys = st.one_of(st.sampled_from(VOCABULARY), st.text(max_size=12))
documents = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=5), st.dictionaries(keys, children, max_size=6)
    ),
    max_leaves=30,
)


def yaml_text(value: Any) -> str:
    return yaml.safe_dump(value, allow_unicode=True)


config_texts = st.one_of(documents.map(yaml_text), st.text(max_size=300))

TEXT_PARSERS = {
    "static keys": parse_static_keys,
    "tiers": lambda text, source: parse_tier_document(text, source, "maas-default-gateway"),
    "subscriptions": parse_subscription_file,
    "api keys": parse_api_key_file,
    "admin keys": parse_admin_keys,
    "limits": parse_limits,
}


# -- config files -------------------------------------------------------------------------------


@given(text=config_texts, which=st.sampled_from(sorted(TEXT_PARSERS)))
@example(text="kind: []\n", which="subscriptions")  # found by the long run: was a TypeError
def test_config_files_load_or_fail_naming_the_file(text: str, which: str) -> None:
    source = f"/etc/maas/{which.replace(' ', '-')}.yaml"
    try:
        TEXT_PARSERS[which](text, source)
    except ConfigError as error:
        assert error.source == source
        assert str(error).startswith(source)
        assert error.problem


@given(st.one_of(scalars, documents))
def test_durations_are_finite_non_negative_seconds_or_a_value_error(value: object) -> None:
    try:
        seconds = parse_duration(value)
    except ValueError:
        return
    assert seconds >= 0 and seconds != float("inf") and seconds == seconds


# -- what the API server and the CRDs say -------------------------------------------------------


@given(documents, st.lists(st.text(max_size=10), max_size=3))
def test_token_reviews_give_an_identity_none_or_malformed(body: Any, audiences: list[str]) -> None:
    try:
        identity = parse_token_review(body, audiences)
    except MalformedReview as error:  # the API server's failure mode, not the client's
        assert str(error)
        return
    if identity is not None:
        assert isinstance(body, dict) and body["status"]["authenticated"] is True


@given(documents)
def test_access_reviews_allow_only_when_the_answer_says_so(body: Any) -> None:
    try:
        allowed = parse_subject_access_review(body)
    except MalformedReview as error:
        assert str(error)
        return
    assert isinstance(allowed, bool)
    if allowed:
        assert isinstance(body, dict) and body["status"]["allowed"] is True


@given(documents)
def test_crd_objects_parse_or_are_refused_naming_the_field(obj: Any) -> None:
    """A broken object is an InvalidObject (counted and left out of the catalog by the watch);
    anything else would stop the watch."""
    if not isinstance(obj, dict):
        obj = {"spec": obj}
    for parse in (parse_subscription, parse_auth_policy, parse_model_ref):
        try:
            parse(obj)
        except InvalidObject as error:
            assert str(error)


# -- what a client sends ------------------------------------------------------------------------


@given(st.one_of(st.none(), st.text(max_size=200)), st.integers(min_value=1, max_value=100))
def test_bearer_tokens(header: str | None, max_length: int) -> None:
    token = bearer_token(header, max_length)
    if isinstance(token, BadCredentials):
        assert token.code in {"missing_token", "invalid_authorization_header", "invalid_token"}
        if header:
            _, _, presented = header.strip().partition(" ")
            if len(presented.strip()) >= 4:
                assert presented.strip() not in token.message  # never quoted back
        return
    assert header is not None and token in header and 0 < len(token) <= max_length
    assert set(token) <= set(string.ascii_letters + string.digits + "-._~+/=")


def _jwt(payload: bytes) -> str:
    encoded = base64.urlsafe_b64encode(payload).rstrip(b"=").decode()
    return f"eyJhbGciOiJSUzI1NiJ9.{encoded}.c2ln"


@given(st.one_of(st.text(max_size=100), documents.map(lambda d: _jwt(json.dumps(d).encode()))))
def test_jwt_expiry_is_a_number_or_none(token: str) -> None:
    expiry = jwt_expiry(token)
    assert expiry is None or isinstance(expiry, float)


@given(st.integers(min_value=0, max_value=2**53))
def test_jwt_expiry_reads_exp(exp: int) -> None:
    assert jwt_expiry(_jwt(json.dumps({"exp": exp, "sub": "x"}).encode())) == float(exp)


segment = st.one_of(
    st.sampled_from(["llm", "tiny", "v1", "chat", "completions", ".", "..", "%2e", "%2F", ""]),
    st.text(max_size=12),
)
paths = st.one_of(
    st.lists(segment, max_size=7).map(lambda parts: "/" + "/".join(parts)),
    st.text(max_size=80),
)
ROUTING = PathRouting(
    PathTemplate("/{namespace}/{model}"),
    (OpenPath("/v1/models"),),
    frozenset({"/v1/chat/completions", "/v1/completions"}),
)


@given(paths)
def test_paths_classify_to_a_model_an_open_path_a_body_route_or_a_refusal(path: str) -> None:
    found = ROUTING.classify(path)
    assert isinstance(found, ModelRef | OpenPath | BodyRoute | BadPath)
    if isinstance(found, ModelRef):
        assert is_namespace_name(found.namespace) and is_object_name(found.name)
        assert path.startswith(f"/{found.namespace}/{found.name}")
    if isinstance(found, BadPath):
        assert found.status in (400, 404)
        assert found.message.isascii()  # quoted back through Envoy's headers and body


@given(
    st.one_of(
        st.binary(max_size=200),
        documents.map(lambda d: json.dumps(d, allow_nan=True).encode()),
        st.text(max_size=30).map(lambda m: json.dumps({"model": m, "messages": []}).encode()),
    )
)
def test_body_models_are_valid_names_or_a_precise_refusal(body: bytes) -> None:
    model = model_in_body(body)
    if isinstance(model, BadPath):
        assert model.status == 400 and model.message.isascii()
        assert model.code in {"missing_model", "invalid_request_body", "invalid_model_name"}
        return
    assert is_object_name(model)


@given(st.text(max_size=120))
def test_api_keys_parse_only_in_their_exact_shape(token: str) -> None:
    parts = parse_key(token)
    if parts is None:
        assert hash_key(token) is None
        return
    assert token.startswith("sk-oai-")
    key_hash = hash_key(token)
    assert key_hash is not None and len(key_hash) == 64 and token not in key_hash


# -- what Envoy sends maas-ratelimit, and the bucket arithmetic ---------------------------------

digits = st.one_of(st.none(), st.text(max_size=25), st.integers(0, 10**30).map(str))


@given(digits, digits)
def test_reservations_are_two_small_non_negative_integers_or_none(
    prompt: str | None, completion: str | None
) -> None:
    found = parse_reservation(prompt, completion)
    if found is not None:
        assert all(isinstance(n, int) and 0 <= n < 10**18 for n in found)


specs = st.builds(
    BucketSpec,
    limit=st.integers(min_value=1, max_value=10**6),
    window_ms=st.integers(min_value=1, max_value=86_400_000),
)


@given(
    specs,
    st.integers(min_value=-(10**15), max_value=10**15),
    st.integers(min_value=0, max_value=10**12),
    st.integers(min_value=0, max_value=10**12),
)
def test_buckets_refill_monotonically_up_to_capacity(
    spec: BucketSpec, level: int, updated_ms: int, later_ms: int
) -> None:
    level = max(level, spec.floor)
    state = (min(level, spec.capacity), updated_ms, spec.window_ms)
    now = current_level(state, spec, updated_ms)
    later = current_level(state, spec, updated_ms + later_ms)
    assert now <= later <= spec.capacity  # time only adds, never past full
    assert current_level(state, spec, updated_ms - later_ms) == now  # a clock step back: nothing
    assert 0 <= remaining_tokens(later, spec) <= spec.limit
    full_after = ms_until_full(now, spec)
    assert current_level(state, spec, updated_ms + full_after) == spec.capacity
    if full_after > 0:
        assert current_level(state, spec, updated_ms + full_after - 1) < spec.capacity
