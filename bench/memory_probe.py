"""Child process of scenario 5 (bench/memory.py): maas-authz's caches holding N identities.

    .venv/bin/python -m bench.memory_probe COUNT

Builds maas-authz with `maas_authz.app.build_app` and the default configuration (Kubernetes
identities and access, default cache sizes and TTLs), starts its gRPC and HTTP listeners on
loopback, and replaces only the transport to the Kubernetes API (`KubernetesApi.connect`) with an
in-process fake. Everything above the transport is the server's own code: the TokenReview and
SubjectAccessReview bodies and parsers, CachedTokenReviewer and CachedAccessReviewer, the metrics
observers, and CheckPipeline. The fake answers as kube-apiserver does (JSON bytes, decoded like the
real client decodes them), so the cached Identity objects are built exactly as in production.

It runs COUNT Checks with distinct JWT-shaped tokens of a realistic size through
`pipeline.decide`, reads its own VmRSS before (idle, after a warm-up that is then purged) and after,
checks that each cache holds COUNT entries, and prints one JSON object on stdout.
"""

from __future__ import annotations

import asyncio
import base64
import gc
import json
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any
from unittest import mock

# What the real server has imported once it serves (gRPC, protobufs, Prometheus, aiohttp, the
# Kubernetes client) is imported here too, so the idle figure is comparable to a real server's.
import grpc  # noqa: F401
import prometheus_client  # noqa: F401

import maas_authz.main  # noqa: F401
from maas_authz.app import AuthzApp, build_app
from maas_authz.config import AuthzConfig
from maas_authz.decision import Allow
from maas_authz.kubernetes import KubernetesApi

MODEL_PATH = "/llm/tiny/v1/chat/completions"
NAMESPACE = "maas-default-gateway-tier-premium"
AUDIENCE = "maas-default-gateway-sa"
ISSUER = "https://kubernetes.default.svc.cluster.local"
TOKEN_LIFETIME = 500.0  # seconds: within the identity TTL (600 s), so the `exp` cap applies
WARMUP = 200


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


_HEADER = _b64(json.dumps({"alg": "RS256", "kid": _b64(os.urandom(32))}).encode())


def token(n: int, now: float) -> str:
    """A projected ServiceAccount token's shape and size: RS256 header, claims, signature."""
    uid = str(uuid.uuid5(uuid.NAMESPACE_URL, f"user-{n}"))
    claims = {
        "aud": [AUDIENCE],
        "exp": int(now + TOKEN_LIFETIME),
        "iat": int(now),
        "iss": ISSUER,
        "jti": str(uuid.uuid4()),
        "kubernetes.io": {
            "namespace": NAMESPACE,
            "serviceaccount": {"name": f"user-{n}", "uid": uid},
        },
        "nbf": int(now),
        "sub": f"system:serviceaccount:{NAMESPACE}:user-{n}",
    }
    payload = _b64(json.dumps(claims, separators=(",", ":")).encode())
    return f"{_HEADER}.{payload}.{_b64(os.urandom(256))}"


def _claims(token_text: str) -> dict[str, Any]:
    payload = token_text.split(".")[1]
    claims: dict[str, Any] = json.loads(
        base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))
    )
    return claims


class FakeKubernetesApi:
    """Answers TokenReview and SubjectAccessReview as kube-apiserver does, without the network."""

    def __init__(self) -> None:
        self.calls: dict[str, int] = {}

    async def create(self, call: str, path: str, body: dict[str, Any]) -> Any:
        self.calls[call] = self.calls.get(call, 0) + 1
        if call == "tokenreview":
            answer = self._token_review(body)
        else:
            answer = {
                "kind": "SubjectAccessReview",
                "apiVersion": "authorization.k8s.io/v1",
                "metadata": {"creationTimestamp": None},
                "spec": body["spec"],
                "status": {
                    "allowed": True,
                    "reason": 'RBAC: allowed by RoleBinding "tier-premium-models/llm" of Role '
                    '"model-users" to Group "system:serviceaccounts:' + NAMESPACE + '"',
                },
            }
        # decoded from bytes, as KubernetesApi.create does: fresh strings for every answer
        return json.loads(json.dumps(answer).encode())

    @staticmethod
    def _token_review(body: dict[str, Any]) -> dict[str, Any]:
        claims = _claims(body["spec"]["token"])
        account = claims["kubernetes.io"]
        return {
            "kind": "TokenReview",
            "apiVersion": "authentication.k8s.io/v1",
            "metadata": {"creationTimestamp": None},
            "spec": body["spec"],
            "status": {
                "authenticated": True,
                "user": {
                    "username": claims["sub"],
                    "uid": account["serviceaccount"]["uid"],
                    "groups": [
                        "system:serviceaccounts",
                        f"system:serviceaccounts:{account['namespace']}",
                        "system:authenticated",
                    ],
                    "extra": {
                        "authentication.kubernetes.io/credential-id": [f"JTI={claims['jti']}"]
                    },
                },
                "audiences": claims["aud"],
            },
        }

    async def close(self) -> None:
        pass


def vm_rss() -> int:
    """This process's resident set size in bytes (VmRSS of /proc/self/status)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


async def _checks(app: AuthzApp, users: range) -> None:
    now = time.time()
    for n in users:
        decision = await app.pipeline.decide(MODEL_PATH, f"Bearer {token(n, now)}")
        if not isinstance(decision, Allow):
            raise RuntimeError(f"check for user-{n} was not allowed: {decision}")


async def probe(count: int) -> dict[str, Any]:
    fake = FakeKubernetesApi()

    async def connect(**_settings: Any) -> FakeKubernetesApi:
        return fake

    config = AuthzConfig.model_validate(
        {"server": {"grpc_addr": "127.0.0.1:0", "http_addr": "127.0.0.1:0"}}
    )
    with mock.patch.object(KubernetesApi, "connect", connect):
        app = await build_app(config, Path.cwd())
    identities, access = app.identity_cache, app.access_cache
    assert identities is not None and access is not None
    await app.runtime.start()
    try:
        await _checks(app, range(count, count + WARMUP))  # users outside the measured range
        identities.cache.clear()
        access.cache.clear()
        gc.collect()
        idle = vm_rss()
        started = time.monotonic()
        await _checks(app, range(count))
        seconds = time.monotonic() - started
        gc.collect()
        loaded = vm_rss()
        return {
            "count": count,
            "warmup": WARMUP,
            "idle_rss": idle,
            "loaded_rss": loaded,
            "seconds": seconds,
            "identities": len(identities.cache),
            "access_decisions": len(access.cache),
            "max_entries": {
                "identity": config.identity.cache.max_entries,
                "access": config.access.cache.max_entries,
            },
            "kubernetes_calls": fake.calls,
            "token_length": len(token(0, time.time())),
        }
    finally:
        await app.runtime.stop()


def main(argv: list[str]) -> int:
    print(json.dumps(asyncio.run(probe(int(argv[0])))))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
