"""The local stack (real Envoy + maas-authz + demo backend) on free ports, for end-to-end tests."""

from __future__ import annotations

import hashlib
import json
import pathlib
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from email.message import Message
from typing import Any

import pytest
import yaml

from maas_demo.stack import CONFIG_DIR, TOPOLOGIES, LocalStack, Ports, Topology
from tests.support import leaks


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


@pytest.fixture(scope="session", autouse=True)
def no_credential_in_logs_or_metrics(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """After the whole session (this tier and every tier after it): no key, key digest, JWT or
    Bearer value in any log or kept /metrics of our servers, and no metric label that names a
    user or a credential or grows without bound (tests/support/leaks.py). Fails the session's
    last teardown, naming the file and the kind of credential (never the credential)."""
    yield
    root = tmp_path_factory.getbasetemp()
    paths = leaks.files(root)
    names = {path.name for path in paths}
    # not vacuous: the stacks of this tier wrote logs and kept metrics of both servers
    for expected in ("authz.log", "ratelimit.log", "authz.metrics", "ratelimit.metrics"):
        assert expected in names, f"no {expected} under {root}: nothing to scan"
    found = [str(leak) for leak in leaks.scan(paths, leaks.known_keys())]
    found += leaks.metric_label_problems(paths)
    assert not found, f"credentials or unbounded labels in {len(paths)} files:\n" + "\n".join(
        found[:50]
    )


@pytest.fixture(scope="module", params=TOPOLOGIES)
def topology(request: pytest.FixtureRequest) -> Topology:
    """Each module whose stack takes this runs in both topologies: maas-authz and
    maas-ratelimit behind Envoy's two filters, and maas-authz alone (one hop, limits inline)."""
    value: Topology = request.param
    return value


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory, topology: Topology) -> Iterator[Gateway]:
    stack = LocalStack(
        tmp_path_factory.mktemp(f"stack-{topology}"), Ports.free(), topology=topology
    )
    stack.start()
    yield Gateway(stack)
    stack.stop()


def start_stack(workdir: pathlib.Path, authz_config: pathlib.Path) -> LocalStack:
    stack = LocalStack(workdir, Ports.free(), authz_config=authz_config)
    stack.start()
    return stack


def demo_authz_config() -> dict[str, Any]:
    """The demo's authz.yaml with every file it names made absolute, to be written elsewhere."""
    authz: dict[str, Any] = yaml.safe_load((CONFIG_DIR / "authz.yaml").read_text())
    static = authz["identity"]["static"]
    static["keys_file"] = str(CONFIG_DIR / static["keys_file"])
    for section in ("tiers", "subscriptions", "api_keys"):
        authz[section]["file"] = str(CONFIG_DIR / authz[section]["file"])
    admin_auth = authz["admin"]["auth"]
    admin_auth["keys_file"] = str(CONFIG_DIR / admin_auth["keys_file"])
    # the demo's ledger is a file next to its own copy of the config: a test that wants one
    # names its own
    authz.pop("usage", None)
    return authz


def stack_configs(
    work: pathlib.Path,
    users: dict[str, tuple[str, str]],
    limits: dict[str, object] | None = None,
) -> dict[str, pathlib.Path]:
    """The demo configs with these API keys (key -> (username, group)) and, if given, these
    limits; returns the LocalStack keyword arguments that use them."""
    keys = [
        {"sha256": hashlib.sha256(key.encode()).hexdigest(), "username": name, "groups": [group]}
        for key, (name, group) in users.items()
    ]
    (work / "keys.yaml").write_text(yaml.safe_dump({"keys": keys}))
    authz = demo_authz_config()
    authz["identity"]["static"]["keys_file"] = str(work / "keys.yaml")
    (work / "authz.yaml").write_text(yaml.safe_dump(authz))
    configs = {"authz_config": work / "authz.yaml"}
    if limits is not None:
        (work / "limits.yaml").write_text(yaml.safe_dump(limits))
        (work / "ratelimit.yaml").write_text(yaml.safe_dump({"limits": {"file": "limits.yaml"}}))
        configs["ratelimit_config"] = work / "ratelimit.yaml"
    return configs


def wait_for(predicate: Callable[[], object], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


def seconds_until(predicate: Callable[[], object], timeout: float = 5.0) -> float:
    """How long until `predicate` holds (polled); fails the test after `timeout`."""
    started = time.monotonic()
    assert wait_for(predicate, timeout), f"not within {timeout}s"
    return time.monotonic() - started


@dataclass
class Metrics:
    """A server's /metrics at one moment."""

    text: str

    def value(self, name: str, **labels: str) -> float:
        wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
        series = f"{name}{{{wanted}}} " if labels else f"{name} "  # unlabelled: no braces
        for line in self.text.splitlines():
            if line.startswith(series):
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    def total(self, name: str) -> float:
        """The sum over every label set of `name`."""
        return sum(
            float(line.rsplit(" ", 1)[1])
            for line in self.text.splitlines()
            if line.startswith(f"{name}{{")
        )


def metrics(gateway: Gateway) -> Metrics:
    """The rate limiter's /metrics: maas-ratelimit's, or in the one-hop topology maas-authz's
    (the same maas_ratelimit_* series)."""
    url = f"http://127.0.0.1:{gateway.stack.limiter_http_port}/metrics"
    return Metrics(http(url, method="GET").body.decode())


def charged(gateway: Gateway, tier: str = "free", model: str = "llm/tiny") -> float:
    """Prompt plus completion tokens maas-ratelimit has charged so far for `tier`."""
    m = metrics(gateway)
    return sum(
        m.value("maas_ratelimit_tokens_charged_total", kind=kind, model=model, tier=tier)
        for kind in ("prompt_tokens", "completion_tokens")
    )


def reported(gateway: Gateway) -> float:
    """How many responses the usage reader has reported on so far (one per proxied request)."""
    return metrics(gateway).total("maas_ratelimit_usage_responses_total")


def settled(gateway: Gateway, path: str, key: str, body: object, **headers: str) -> HttpResult:
    """A request, after whose return its after-response report has reached maas-ratelimit."""
    before = reported(gateway)
    result = gateway.request(path, key, body, **headers)
    assert wait_for(lambda: reported(gateway) >= before + 1), "no after-response report"
    return result
