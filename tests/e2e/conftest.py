"""The local stack (real Envoy + maas-authz + demo backend) on free ports, for end-to-end tests."""

from __future__ import annotations

import json
import pathlib
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from email.message import Message

import pytest

from maas_demo.stack import LocalStack, Ports


@dataclass
class HttpResult:
    status: int
    headers: Message
    body: bytes

    def json(self) -> object:
        return json.loads(self.body)


def http(
    url: str,
    *,
    method: str = "POST",
    body: object | None = None,
    headers: dict[str, str] | None = None,
) -> HttpResult:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    if data is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return HttpResult(response.status, response.headers, response.read())
    except urllib.error.HTTPError as error:
        return HttpResult(error.code, error.headers, error.read())


class Gateway:
    def __init__(self, stack: LocalStack) -> None:
        self.stack = stack

    def request(
        self,
        path: str,
        key: str | None = None,
        body: object | None = None,
        method: str = "POST",
        **headers: str,
    ) -> HttpResult:
        all_headers = {k.replace("_", "-"): v for k, v in headers.items()}
        if key is not None:
            all_headers["Authorization"] = f"Bearer {key}"
        return http(self.stack.gateway_url + path, method=method, body=body, headers=all_headers)

    def backend_saw(self) -> list[dict[str, object]]:
        url = f"http://127.0.0.1:{self.stack.ports.backend}/_demo/requests"
        seen = http(url, method="GET").json()
        assert isinstance(seen, list)
        return seen

    def clear_backend(self) -> None:
        http(f"http://127.0.0.1:{self.stack.ports.backend}/_demo/requests", method="DELETE")


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    stack = LocalStack(tmp_path_factory.mktemp("stack"), Ports.free())
    stack.start()
    yield Gateway(stack)
    stack.stop()


def start_stack(workdir: pathlib.Path, authz_config: pathlib.Path) -> LocalStack:
    stack = LocalStack(workdir, Ports.free(), authz_config=authz_config)
    stack.start()
    return stack
