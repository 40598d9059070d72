"""The image and the manifests as users deploy them: pods played by podman from the image
`make image` built, their ConfigMaps mounted, a real kube-apiserver behind maas-authz, a real
Envoy in front (tests/deploy/conftest.py)."""

from __future__ import annotations

import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest

from tests.deploy import podman as pm
from tests.deploy.conftest import OPENSHIFT_UID, PlayedStack, probe_passes
from tests.e2e.conftest import HttpResult, http
from tests.support.kube_platform import FREE_NS, MODEL, MODEL_NS, PREMIUM_NS, Kube, grant_model
from tests.support.refusals import free_requests_refusal_body, free_requests_refusal_headers

pytestmark = pytest.mark.deploy
CHAT = f"/{MODEL_NS}/{MODEL}/v1/chat/completions"
BODY = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
SERVERS = ("maas-authz", "maas-ratelimit")


def user(kube: Kube, namespace: str) -> str:
    """A new ServiceAccount's token, minted as maas-api mints one."""
    name = f"u-{uuid.uuid4().hex[:10]}"
    kube.service_account(namespace, name)
    return kube.mint_token(namespace, name)


def chat(stack: PlayedStack, token: str | None, body: object = BODY) -> HttpResult:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return http(stack.gateway_url + CHAT, body=body, headers=headers)


def quota(stack: PlayedStack, token: str) -> dict[str, Any]:
    """/v1/quota through the gateway, for the model."""
    answer = http(
        f"{stack.gateway_url}/v1/quota?model={MODEL_NS}/{MODEL}",
        method="GET",
        headers={"Authorization": f"Bearer {token}"},
    )
    assert answer.status == 200, answer.body
    body = answer.json()
    assert isinstance(body, dict)
    return body


def remaining(stack: PlayedStack, token: str) -> dict[str, int]:
    return {x["name"]: int(x["remaining"]) for x in quota(stack, token)["limits"]}


@pytest.fixture(scope="module")
def free_grant(kube: Kube) -> Iterator[None]:
    """The free tier may use the model too (the platform grants per tier), so that the free
    tier's small limits can be reached."""
    name = grant_model(kube, FREE_NS)
    yield
    kube.rbac.delete_namespaced_role_binding(name, MODEL_NS)


def test_pods_run_the_image_unprivileged_read_only_and_pass_their_probes(
    played: PlayedStack,
) -> None:
    for deployment, container in played.containers():
        state = played.inspect(deployment, container)
        assert state["State"]["Running"], (deployment, state["State"])
        host = state["HostConfig"]
        assert host["ReadonlyRootfs"] is True, deployment
        assert host["RestartPolicy"]["Name"] == "always", deployment
        assert "no-new-privileges" in host["SecurityOpt"], deployment
        # capabilities drop [ALL]: none left in the bounding set
        assert state["EffectiveCaps"] in (None, []), (deployment, state["EffectiveCaps"])
        uid, gid = (
            ("65532", "65532") if played.overlay == "kubernetes" else (str(OPENSHIFT_UID), "0")
        )
        assert state["Config"]["User"] == f"{uid}:{gid}", deployment
        if deployment in SERVERS:
            assert state["ImageName"] == pm.GATEWAY_IMAGE
            process = pm.podman("exec", state["Name"], "/bin/sh", "-c", "id -u; id -g").stdout
            assert process.split() == [uid, gid]
            # the root filesystem refuses writes; /tmp is the pod's emptyDir or the image's
            wrote = pm.podman(
                "exec", state["Name"], "/bin/sh", "-c", "echo x > /opt/x", check=False
            )
            assert wrote.returncode != 0 and "Read-only file system" in wrote.stderr
    for probe in played.adapted.probes:
        assert probe_passes(probe), probe
    size = pm.image_size(pm.GATEWAY_IMAGE)
    print(f"\n{pm.GATEWAY_IMAGE}: {size / 1e6:.0f} MB")


def test_pods_read_their_configmaps_and_authenticate_with_the_cluster(
    played: PlayedStack, kube: Kube
) -> None:
    body = quota(played, user(kube, PREMIUM_NS))
    # the tier from the tier-to-group-mapping ConfigMap (TokenReview gave the groups); the
    # limits from maas-ratelimit-limits, read by maas-ratelimit through the Service's name
    assert (body["tier"], body["model"]) == ("premium", f"{MODEL_NS}/{MODEL}")
    assert {x["name"]: x["limit"] for x in body["limits"]} == {
        "premium-requests": 20,
        "premium-tokens": 50000,
    }


def test_smoke_401_200_403_and_429_on_requests_and_on_tokens(
    played: PlayedStack, kube: Kube, free_grant: None
) -> None:
    unauthenticated = chat(played, None)
    assert unauthenticated.status == 401
    assert chat(played, "not-a-token").status == 401

    premium = user(kube, PREMIUM_NS)
    allowed = chat(played, premium)
    assert allowed.status == 200, allowed.body
    assert allowed.headers["x-ratelimit-limit-requests"] == "20"

    # authenticated, tier free (system:authenticated), no grant on the model
    outsider = user(kube, "other-team")
    denied = chat(played, outsider)
    assert denied.status == 403, denied.body

    free = user(kube, FREE_NS)
    assert [chat(played, free).status for _ in range(5)] == [200] * 5
    sixth = chat(played, free)
    assert sixth.status == 429
    retry_after = sixth.headers["retry-after"]
    for name, value in free_requests_refusal_headers(retry_after):
        assert sixth.headers[name] == value
    assert sixth.json() == free_requests_refusal_body(retry_after)

    # 100 tokens a minute: one answer of 150 tokens is charged after it ends, then refused
    spender = user(kube, FREE_NS)
    big = chat(played, spender, {**BODY, "max_tokens": 150})
    assert big.status == 200, big.body
    usage = big.json()["usage"]  # type: ignore[index]
    assert usage["total_tokens"] > 100
    time.sleep(0.5)  # the charge is made when the stream ends, beside the answer
    refused = chat(played, spender)
    assert refused.status == 429, refused.body
    assert refused.headers["x-maas-ratelimit-limit"] == "free-tokens"
    error = refused.json()["error"]  # type: ignore[index]
    assert (error["type"], error["code"]) == ("tokens", "rate_limit_exceeded")


def _envoy_counter(played: PlayedStack, name: str) -> int:
    stats = http(f"http://127.0.0.1:{played.ports.envoy_admin}/stats?filter={name}", method="GET")
    total = 0
    for line in stats.body.decode().splitlines():
        key, _, value = line.partition(": ")
        if key.endswith(name):
            total += int(value)
    return total


def test_killed_ratelimit_pod_is_restarted_and_its_charges_survive_on_redis(
    played: PlayedStack, kube: Kube
) -> None:
    """SIGKILL of maas-ratelimit under load: podman restarts it, requests meanwhile end as the
    failure mode says (fail open: allowed, counted by Envoy), and what Redis was charged before
    the kill still counts after it."""
    idle = user(kube, PREMIUM_NS)
    loaded = [user(kube, PREMIUM_NS) for _ in range(4)]
    for token in (idle, *loaded):
        assert [chat(played, token).status for _ in range(12)] == [200] * 12
    before = remaining(played, idle)["premium-requests"]
    assert before <= 8
    failed_open_before = _envoy_counter(played, "ratelimit.failure_mode_allowed")
    restarts_before = played.inspect("maas-ratelimit")["RestartCount"]

    outcomes: Counter[str] = Counter()
    lock = threading.Lock()
    stop = threading.Event()

    def client_loop(token: str) -> None:
        while not stop.is_set():
            try:
                status = str(chat(played, token).status)
            except OSError as error:  # a connection Envoy did not answer
                status = type(error).__name__
            with lock:
                outcomes[status] += 1
            time.sleep(0.02)

    threads = [threading.Thread(target=client_loop, args=(t,), daemon=True) for t in loaded]
    for thread in threads:
        thread.start()
    time.sleep(1.0)
    killed_at = time.monotonic()
    old_pid = played.kill("maas-ratelimit")
    deadline = killed_at + 60
    while True:
        state = played.inspect("maas-ratelimit")["State"]
        restarted = state["Running"] and state["Pid"] not in (0, old_pid)
        if restarted and all(
            probe_passes(p) for p in played.probes("maas-ratelimit", "readinessProbe")
        ):
            break
        assert time.monotonic() < deadline, f"maas-ratelimit not back:\n{played.logs()}"
        time.sleep(0.1)
    back_after = time.monotonic() - killed_at
    time.sleep(2.0)  # load goes on against the restarted pod
    stop.set()
    for thread in threads:
        thread.join(timeout=15)
    elapsed = time.monotonic() - killed_at

    failed_open = _envoy_counter(played, "ratelimit.failure_mode_allowed") - failed_open_before
    print(
        f"\nrequests under load: {sum(outcomes.values())} {dict(outcomes)}; maas-ratelimit back "
        f"after {back_after:.1f}s; Envoy failed open {failed_open} times"
    )
    assert played.inspect("maas-ratelimit")["RestartCount"] == restarts_before + 1
    # every answer is the model's or a limit's: the outage was allowed through (fail open)
    assert set(outcomes) <= {"200", "429"}, outcomes
    assert failed_open > 0, "the kill did not happen under load"
    assert outcomes["429"] > 0
    # Redis kept the charges: the idle user's 12 requests still count (a fresh store would
    # say 20), less what the bucket refilled meanwhile (20 per 2 minutes)
    after = remaining(played, idle)["premium-requests"]
    refill = int(elapsed * 20 / 120) + 1
    assert before <= after <= before + refill, (before, after, refill)
    for token in loaded:  # limited after the restart: their earlier charges count
        assert chat(played, token).status == 429
    for probe in played.adapted.probes:
        assert probe_passes(probe), probe
