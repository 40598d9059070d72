"""CheckPipeline end to end with fakes: route -> authenticate -> tier -> model access."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from maas_authz.check import CheckLimits, CheckPipeline
from maas_authz.decision import Allow, Decision, Deny
from maas_authz.identity import Identity
from maas_authz.model_path import ModelRef, OpenPath, PathRouting, PathTemplate
from maas_authz.tiers import DEFAULT_TIERS, TierMapping, parse_tier_document
from maas_common.errors import BackendUnavailable
from tests.support.fakes import FakeAccessReviewer, FakeTokenReviewer

CHAT = "/llm/tiny/v1/chat/completions"
TINY = ModelRef("llm", "tiny")
ALICE_TOKEN = "alice-token"
NOTIER_TOKEN = "notier-token"
ALICE = Identity(
    "system:serviceaccount:maas-default-gateway-tier-premium:alice",
    "uid-a",
    (
        "system:serviceaccounts",
        "system:serviceaccounts:maas-default-gateway-tier-premium",
        "system:authenticated",
    ),
)
NOTIER = Identity("carol", "uid-c", ("some-group",))
DEFAULT_MAPPING = parse_tier_document(DEFAULT_TIERS, "built-in tiers", "maas-default-gateway")


class Setup:
    def __init__(
        self,
        *,
        open_paths: tuple[OpenPath, ...] = (),
        tiers: Callable[[], TierMapping] = lambda: DEFAULT_MAPPING,
        limits: CheckLimits | None = None,
    ) -> None:
        self.identities = FakeTokenReviewer({ALICE_TOKEN: ALICE, NOTIER_TOKEN: NOTIER})
        self.access = FakeAccessReviewer({(ALICE.username, TINY)})
        self.pipeline = CheckPipeline(
            routing=PathRouting(PathTemplate("/{namespace}/{model}"), open_paths),
            identities=self.identities,
            tiers=tiers,
            access=self.access,
            limits=limits,
        )

    async def decide(self, path: str, authorization: str | None) -> Decision:
        return await self.pipeline.decide(path, authorization)

    @property
    def calls(self) -> tuple[int, int]:
        return self.identities.calls, self.access.calls


def deny(decision: Decision, status: int, code: str) -> Deny:
    assert isinstance(decision, Deny), decision
    assert (decision.status, decision.code) == (status, code), decision
    return decision


@pytest.fixture
def setup() -> Setup:
    return Setup()


@pytest.mark.asyncio
async def test_allowed_request(setup: Setup) -> None:
    decision = await setup.decide(CHAT, f"Bearer {ALICE_TOKEN}")
    assert isinstance(decision, Allow)
    assert decision.identity == ALICE
    assert decision.tier is not None and decision.tier.name == "premium"
    assert decision.model == TINY
    assert setup.calls == (1, 1)


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("path", "status", "code"),
    [
        ("/llm/../other/tiny/v1/chat/completions", 400, "invalid_path"),
        ("/llm/%2e%2e/x/v1", 400, "invalid_path"),
        ("/llm%2Fx/tiny/v1", 400, "invalid_path"),
        ("//llm/tiny/v1", 400, "invalid_path"),
        ("/LLM/tiny/v1/chat/completions", 400, "invalid_model_path"),
        ("/", 404, "model_not_found"),
        ("/llm", 404, "model_not_found"),
    ],
)
async def test_bad_paths_are_denied_without_any_review(
    setup: Setup, path: str, status: int, code: str
) -> None:
    decision = deny(await setup.decide(path, f"Bearer {ALICE_TOKEN}"), status, code)
    assert decision.retry_after is None
    assert setup.calls == (0, 0)


@pytest.mark.asyncio
async def test_bad_path_is_denied_before_the_credentials_are_looked_at(setup: Setup) -> None:
    deny(await setup.decide("/", None), 404, "model_not_found")
    assert setup.calls == (0, 0)


@pytest.mark.asyncio
async def test_missing_authorization(setup: Setup) -> None:
    decision = deny(await setup.decide(CHAT, None), 401, "missing_token")
    assert decision.token_presented is False
    assert setup.calls == (0, 0)


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("header", "code", "bearer_token_presented"),
    [
        ("Basic YWxpY2U6cHc=", "invalid_authorization_header", False),
        ("Bearer ", "missing_token", False),
        ("Bearer a b", "invalid_token", True),
        ("Bearer " + "a" * 8193, "invalid_token", True),
    ],
)
async def test_unusable_authorization_header(
    setup: Setup, header: str, code: str, bearer_token_presented: bool
) -> None:
    decision = deny(await setup.decide(CHAT, header), 401, code)
    # RFC 6750 §3.1: error="invalid_token" only when a bearer token was actually presented
    assert decision.token_presented is bearer_token_presented
    assert setup.calls == (0, 0)


@pytest.mark.asyncio
async def test_max_token_length_comes_from_the_limits() -> None:
    setup = Setup(limits=CheckLimits(max_token_length=len(ALICE_TOKEN) - 1))
    decision = deny(await setup.decide(CHAT, f"Bearer {ALICE_TOKEN}"), 401, "invalid_token")
    assert str(len(ALICE_TOKEN) - 1) in decision.message
    assert setup.calls == (0, 0)


@pytest.mark.asyncio
async def test_token_that_does_not_authenticate(setup: Setup) -> None:
    decision = deny(await setup.decide(CHAT, "Bearer unknown-token"), 401, "invalid_token")
    assert decision.token_presented is True
    assert "unknown-token" not in decision.message
    assert setup.calls == (1, 0)


@pytest.mark.asyncio
async def test_identity_in_no_tier(setup: Setup) -> None:
    decision = deny(await setup.decide(CHAT, f"Bearer {NOTIER_TOKEN}"), 403, "no_tier")
    assert "'carol'" in decision.message
    assert decision.tier == ""
    assert setup.calls == (1, 0)


@pytest.mark.asyncio
async def test_model_access_denied_names_the_model(setup: Setup) -> None:
    decision = deny(
        await setup.decide("/team-a/secret-model/v1/chat/completions", f"Bearer {ALICE_TOKEN}"),
        403,
        "model_access_denied",
    )
    assert "'secret-model'" in decision.message
    assert "'team-a'" in decision.message
    assert "'alice'" in decision.message  # the userid, not the whole ServiceAccount username
    assert decision.tier == "premium"
    assert setup.calls == (1, 1)


@pytest.mark.asyncio
async def test_identity_backend_unavailable_is_503_then_recovers(setup: Setup) -> None:
    setup.identities.error = BackendUnavailable("kubernetes", "timeout", "slow")
    decision = deny(
        await setup.decide(CHAT, f"Bearer {ALICE_TOKEN}"), 503, "auth_backend_unavailable"
    )
    assert decision.retry_after == 5
    assert "authentication" in decision.message
    assert decision.tier == ""
    assert setup.calls == (1, 0)

    setup.identities.error = None
    assert isinstance(await setup.decide(CHAT, f"Bearer {ALICE_TOKEN}"), Allow)
    assert setup.calls == (2, 1)


@pytest.mark.asyncio
async def test_access_backend_unavailable_is_503_then_recovers() -> None:
    setup = Setup(limits=CheckLimits(retry_after_seconds=17))
    setup.access.error = BackendUnavailable("kubernetes", "http_500", "boom")
    decision = deny(
        await setup.decide(CHAT, f"Bearer {ALICE_TOKEN}"), 503, "auth_backend_unavailable"
    )
    assert decision.retry_after == 17
    assert "model access check" in decision.message
    assert decision.tier == "premium"

    setup.access.error = None
    recovered = await setup.decide(CHAT, f"Bearer {ALICE_TOKEN}")
    assert isinstance(recovered, Allow)
    assert recovered.model == TINY
    assert setup.calls == (2, 2)


@pytest.mark.asyncio
async def test_many_unavailable_answers_all_stay_503(setup: Setup) -> None:
    # the warning is throttled, the answer is not
    setup.identities.error = BackendUnavailable("kubernetes", "connect", "refused")
    for _ in range(5):
        deny(await setup.decide(CHAT, f"Bearer {ALICE_TOKEN}"), 503, "auth_backend_unavailable")
    assert setup.calls == (5, 0)


@pytest.mark.asyncio
async def test_open_path_without_authentication() -> None:
    setup = Setup(open_paths=(OpenPath("/healthz", authenticate=False),))
    assert await setup.decide("/healthz", None) == Allow(None, None, None)
    assert await setup.decide("/healthz", "Basic garbage") == Allow(None, None, None)
    assert setup.calls == (0, 0)


@pytest.mark.asyncio
async def test_open_path_with_authentication_skips_the_access_check() -> None:
    setup = Setup(open_paths=(OpenPath("/v1/models"),))
    decision = await setup.decide("/v1/models", f"Bearer {ALICE_TOKEN}")
    assert isinstance(decision, Allow)
    assert decision.identity == ALICE
    assert decision.tier is not None and decision.tier.name == "premium"
    assert decision.model is None
    assert setup.calls == (1, 0)


@pytest.mark.asyncio
async def test_open_path_with_authentication_still_needs_a_token_and_a_tier() -> None:
    setup = Setup(open_paths=(OpenPath("/v1/models"),))
    deny(await setup.decide("/v1/models", None), 401, "missing_token")
    deny(await setup.decide("/v1/models", "Bearer nope"), 401, "invalid_token")
    deny(await setup.decide("/v1/models", f"Bearer {NOTIER_TOKEN}"), 403, "no_tier")
    assert setup.access.calls == 0


@pytest.mark.asyncio
async def test_open_path_cannot_be_used_to_reach_a_model() -> None:
    setup = Setup(open_paths=(OpenPath("/docs", match="prefix", authenticate=False),))
    deny(await setup.decide("/docs/../llm/tiny/v1/chat/completions", None), 400, "invalid_path")
    assert setup.calls == (0, 0)


@pytest.mark.asyncio
async def test_a_reloaded_tier_mapping_applies_to_the_next_call() -> None:
    current = {"mapping": DEFAULT_MAPPING}
    setup = Setup(tiers=lambda: current["mapping"])
    first = await setup.decide(CHAT, f"Bearer {NOTIER_TOKEN}")
    deny(first, 403, "no_tier")

    current["mapping"] = parse_tier_document(
        "- {name: gold, level: 7, groups: [some-group, system:authenticated]}",
        "tiers.yaml",
        "maas-default-gateway",
    )
    setup.access.grants.add((NOTIER.username, TINY))
    decision = await setup.decide(CHAT, f"Bearer {NOTIER_TOKEN}")
    assert isinstance(decision, Allow)
    assert decision.tier is not None and decision.tier.name == "gold"

    alice = await setup.decide(CHAT, f"Bearer {ALICE_TOKEN}")
    assert isinstance(alice, Allow)
    assert alice.tier is not None and alice.tier.name == "gold"  # via system:authenticated


@pytest.mark.asyncio
async def test_highest_tier_is_used_for_the_decision(setup: Setup) -> None:
    setup.identities.identities["both"] = Identity(
        "dave", "uid-d", ("system:authenticated", "tier-enterprise-users")
    )
    setup.access.grants.add(("dave", TINY))
    decision = await setup.decide(CHAT, "Bearer both")
    assert isinstance(decision, Allow)
    assert decision.tier is not None and decision.tier.name == "enterprise"


# --- the routing cache --------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_routing_is_remembered_per_path_without_its_query() -> None:
    setup = Setup()
    bearer = f"Bearer {ALICE_TOKEN}"
    for path in (CHAT, CHAT + "?stream=true", CHAT + "?x=1", "/llm/../x", "/llm/../x?a"):
        first = await setup.decide(path, bearer)
        assert await setup.decide(path, bearer) == first  # the cached answer is the same
    routes = setup.pipeline._routes
    assert set(routes) == {CHAT, "/llm/../x"}
    assert routes[CHAT] == TINY


@pytest.mark.asyncio
async def test_the_routing_cache_is_bounded() -> None:
    setup = Setup()
    monkey = pytest.MonkeyPatch()
    monkey.setattr("maas_authz.check._MAX_CACHED_ROUTES", 3)
    try:
        for i in range(10):
            decision = await setup.decide(f"/llm/m{i}/v1/chat", f"Bearer {ALICE_TOKEN}")
            assert isinstance(decision, Deny) and decision.code == "model_access_denied"
        assert list(setup.pipeline._routes) == [
            "/llm/m7/v1/chat",
            "/llm/m8/v1/chat",
            "/llm/m9/v1/chat",
        ]
        # a long path is classified as ever, but never kept
        long_path = "/llm/tiny/" + "x" * 600
        assert isinstance(await setup.decide(long_path, f"Bearer {ALICE_TOKEN}"), Allow)
        assert long_path not in setup.pipeline._routes
    finally:
        monkey.undo()
