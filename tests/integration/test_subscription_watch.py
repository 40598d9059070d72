"""The subscription catalog follows the real kube-apiserver: our CRDs (k8s/crds/) installed, then
MaaSModelRef / MaaSAuthPolicy / MaaSSubscription objects created, changed and deleted while the
informers run; a broken object is reported and skipped while the others keep applying."""

from __future__ import annotations

import asyncio
import pathlib
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import pytest_asyncio
from kubernetes import client
from kubernetes.client.rest import ApiException

from maas_authz.identity import Identity
from maas_authz.kubernetes import KubernetesApi, KubernetesWatchTransport
from maas_authz.model_path import ModelRef
from maas_authz.subscription_watch import SubscriptionWatch
from maas_authz.subscriptions import NO_SUBSCRIPTION, InvalidObject, Selection
from tests.support.kube_cluster import KubeCluster
from tests.support.kube_platform import Kube

pytestmark = pytest.mark.integration

GROUP, VERSION = "maas.opendatahub.io", "v1alpha1"
SUB_NS, MODEL_NS = "models-as-a-service", "watch-llm"
TINY = ModelRef(MODEL_NS, "tiny")
ALICE = Identity("alice", "uid-a", ("watch-team", "system:authenticated"))


def create(api: client.CustomObjectsApi, namespace: str, plural: str, body: dict[str, Any]) -> None:
    api.create_namespaced_custom_object(GROUP, VERSION, namespace, plural, body)


def subscription_body(name: str, limit: int, **model_extra: Any) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "MaaSSubscription",
        "metadata": {"name": name, "namespace": SUB_NS},
        "spec": {
            "owner": {"groups": [{"name": "watch-team"}]},
            "modelRefs": [
                {
                    "name": "tiny",
                    "namespace": MODEL_NS,
                    "tokenRateLimits": [{"limit": limit, "window": "1m"}],
                    **model_extra,
                }
            ],
        },
    }


@pytest_asyncio.fixture
async def watch(
    cluster: KubeCluster, kube: Kube, tmp_path: pathlib.Path
) -> AsyncIterator[SubscriptionWatch]:
    kube.ensure_namespace(MODEL_NS)
    kubeconfig = cluster.write_kubeconfig(tmp_path / "kubeconfig")
    api = await KubernetesApi.connect(
        kubeconfig=kubeconfig, context=None, call_timeout=2.0, max_concurrency=4
    )
    problems: list[InvalidObject] = []
    subscription_watch = SubscriptionWatch(
        KubernetesWatchTransport(api, watch_seconds=5), on_problem=problems.append
    )
    task = asyncio.create_task(subscription_watch.run())
    try:
        await asyncio.wait_for(subscription_watch.wait_synced(), 15)
        yield subscription_watch
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await api.close()


async def eventually(check: Callable[[], bool], what: str, seconds: float = 10.0) -> float:
    started = time.monotonic()
    while not check():
        assert time.monotonic() - started < seconds, f"not within {seconds}s: {what}"
        await asyncio.sleep(0.05)
    return time.monotonic() - started


def limit_of(watch: SubscriptionWatch) -> int | None:
    chosen = watch.catalog.select(ALICE, TINY)
    return chosen.model.token_limits[0].limit if isinstance(chosen, Selection) else None


@pytest.mark.asyncio
async def test_objects_created_changed_and_deleted_apply_within_seconds(
    crds: client.CustomObjectsApi, watch: SubscriptionWatch
) -> None:
    assert watch.catalog.select(ALICE, TINY) == NO_SUBSCRIPTION
    assert not watch.catalog.allowed(ALICE, TINY)

    create(
        crds,
        MODEL_NS,
        "maasmodelrefs",
        {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "MaaSModelRef",
            "metadata": {"name": "tiny", "namespace": MODEL_NS},
            "spec": {"modelRef": {"kind": "LLMInferenceService", "name": "tiny"}},
        },
    )
    create(
        crds,
        SUB_NS,
        "maasauthpolicies",
        {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "MaaSAuthPolicy",
            "metadata": {"name": "watch-team-tiny", "namespace": SUB_NS},
            "spec": {
                "modelRefs": [{"name": "tiny", "namespace": MODEL_NS}],
                "subjects": {"groups": [{"name": "watch-team"}]},
            },
        },
    )
    create(crds, SUB_NS, "maassubscriptions", subscription_body("watch-free", 100))
    took = await eventually(lambda: limit_of(watch) == 100, "the subscription applies")
    assert watch.catalog.allowed(ALICE, TINY)
    assert took < 10

    crds.patch_namespaced_custom_object(
        GROUP,
        VERSION,
        SUB_NS,
        "maassubscriptions",
        "watch-free",
        {
            "spec": {
                "modelRefs": [
                    {
                        "name": "tiny",
                        "namespace": MODEL_NS,
                        "tokenRateLimits": [{"limit": 10, "window": "1m"}],
                    }
                ]
            }
        },
    )
    await eventually(lambda: limit_of(watch) == 10, "the changed limit applies")

    crds.delete_namespaced_custom_object(
        GROUP,
        VERSION,
        SUB_NS,
        "maassubscriptions",
        "watch-free",
    )
    await eventually(
        lambda: watch.catalog.select(ALICE, TINY) == NO_SUBSCRIPTION, "the deletion applies"
    )
    crds.delete_namespaced_custom_object(
        GROUP,
        VERSION,
        SUB_NS,
        "maasauthpolicies",
        "watch-team-tiny",
    )
    await eventually(lambda: not watch.catalog.allowed(ALICE, TINY), "the policy deletion applies")


@pytest.mark.asyncio
async def test_a_broken_object_is_reported_and_skipped_and_the_rest_applies(
    crds: client.CustomObjectsApi, watch: SubscriptionWatch
) -> None:
    # the CRD schema lets a non-numeric price through (perToken is a string); we refuse it
    create(
        crds,
        SUB_NS,
        "maassubscriptions",
        subscription_body("watch-broken", 5, billingRate={"perToken": "cheap"}),
    )
    create(crds, SUB_NS, "maassubscriptions", subscription_body("watch-good", 7))
    try:
        await eventually(
            lambda: any(p.field.endswith("billingRate.perToken") for p in watch.problems),
            "the broken subscription is reported",
        )
        broken = next(p for p in watch.problems if "watch-broken" in str(p))
        assert str(broken.key) == f"MaaSSubscription {SUB_NS}/watch-broken"
        assert [s.name for s in watch.catalog.subscriptions if s.name.startswith("watch-")] == [
            "watch-good"
        ]
        # the watch keeps working after it: a later change still applies
        crds.delete_namespaced_custom_object(
            GROUP,
            VERSION,
            SUB_NS,
            "maassubscriptions",
            "watch-good",
        )
        await eventually(
            lambda: not any(s.name == "watch-good" for s in watch.catalog.subscriptions),
            "a change after the broken object applies",
        )
    finally:
        for name in ("watch-broken", "watch-good"):
            try:
                crds.delete_namespaced_custom_object(
                    GROUP,
                    VERSION,
                    SUB_NS,
                    "maassubscriptions",
                    name,
                )
            except ApiException as exc:
                if exc.status != 404:
                    raise
