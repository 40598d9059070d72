"""Calling RateLimitService/ShouldRateLimit the way Envoy does, for tests."""

from __future__ import annotations

import grpc
from envoy.extensions.common.ratelimit.v3 import ratelimit_pb2
from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc


def descriptor(hits: int | None = None, **entries: str) -> ratelimit_pb2.RateLimitDescriptor:
    out = ratelimit_pb2.RateLimitDescriptor()
    for key, value in entries.items():
        out.entries.add(key=key, value=value)
    if hits is not None:
        out.hits_addend.value = hits  # a wrapper: set even when 0 (0 = check only)
    return out


def request(
    *descriptors: ratelimit_pb2.RateLimitDescriptor, domain: str = "maas", hits: int = 0
) -> rls_pb2.RateLimitRequest:
    return rls_pb2.RateLimitRequest(domain=domain, descriptors=descriptors, hits_addend=hits)


class RateLimitClient:
    def __init__(self, target: str) -> None:
        self._channel = grpc.aio.insecure_channel(target)
        self._stub = rls_pb2_grpc.RateLimitServiceStub(self._channel)

    async def should_rate_limit(
        self, *descriptors: ratelimit_pb2.RateLimitDescriptor, hits: int = 0
    ) -> rls_pb2.RateLimitResponse:
        return await self._stub.ShouldRateLimit(request(*descriptors, hits=hits), timeout=10)

    async def admitted(self, tier: str, user: str) -> bool:
        answer = await self.should_rate_limit(descriptor(tier=tier, user=user))
        return bool(answer.overall_code == rls_pb2.RateLimitResponse.OK)

    async def close(self) -> None:
        await self._channel.close()
