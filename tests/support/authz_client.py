"""Calling Authorization/Check the way Envoy does, and reading the answer, for tests."""

from __future__ import annotations

import json
from dataclasses import dataclass

import grpc
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from google.protobuf.json_format import MessageToDict


def check_request(
    path: str, headers: dict[str, str], body: bytes = b""
) -> external_auth_pb2.CheckRequest:
    request = external_auth_pb2.CheckRequest()
    http = request.attributes.request.http
    http.method = "POST"
    http.path = path
    http.headers.update({k.lower(): v for k, v in headers.items()})
    if body:
        http.raw_body = body  # as Envoy sends it with with_request_body.pack_as_bytes
    return request


@dataclass
class CheckResult:
    http_status: int  # 200 for OK
    headers: dict[str, str]  # headers set upstream (OK) or sent to the client (denied)
    removed: list[str]
    body: dict[str, object]  # a JSON body, parsed ({} for none or a text/plain one)
    metadata: dict[str, object]
    text: str = ""  # the body as sent

    @property
    def reason(self) -> str | None:
        """x-ext-auth-reason: the code of upstream MaaS's plain-text denials."""
        return self.headers.get("x-ext-auth-reason")

    @property
    def error_code(self) -> str | None:
        error = self.body.get("error")
        return error.get("code") if isinstance(error, dict) else None  # type: ignore[return-value]


def result_of(response: external_auth_pb2.CheckResponse) -> CheckResult:
    metadata = MessageToDict(response.dynamic_metadata)
    if response.HasField("ok_response"):
        ok = response.ok_response
        return CheckResult(
            200,
            {h.header.key: h.header.value for h in ok.headers},
            list(ok.headers_to_remove),
            {},
            metadata,
        )
    denied = response.denied_response
    headers = {h.header.key: h.header.value for h in denied.headers}
    is_json = headers.get("content-type", "").startswith("application/json")
    return CheckResult(
        int(denied.status.code),
        headers,
        [],
        json.loads(denied.body) if denied.body and is_json else {},
        metadata,
        denied.body,
    )


class AuthzClient:
    def __init__(self, target: str) -> None:
        self._channel = grpc.aio.insecure_channel(target)
        self._stub = external_auth_pb2_grpc.AuthorizationStub(self._channel)

    async def check(
        self, path: str, token: str | None = None, *, body: bytes = b"", **headers: str
    ) -> CheckResult:
        all_headers = {k.replace("_", "-"): v for k, v in headers.items()}
        if token is not None:
            all_headers["authorization"] = f"Bearer {token}"
        response = await self._stub.Check(check_request(path, all_headers, body), timeout=10)
        return result_of(response)

    async def close(self) -> None:
        await self._channel.close()
