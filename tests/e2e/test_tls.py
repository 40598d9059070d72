"""The real Envoy talking mutual TLS to both servers (server.tls with client_ca_file), as on a
cluster without a mesh: the gateway config's two clusters given an UpstreamTlsContext with the
CA and a client certificate; then the usual answers through it. (Rotation under a running
server: tests/integration/test_tls.py.)"""

from __future__ import annotations

import pathlib
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from maas_demo.stack import CONFIG_DIR, LocalStack, Ports
from tests.e2e.conftest import Gateway, demo_authz_config, http
from tests.support.pki import Pki
from tests.support.refusals import free_requests_refusal_body

pytestmark = pytest.mark.e2e
CHAT = "/llm/tiny/v1/chat/completions"
UPSTREAM_TLS = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"
BODY = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


def upstream_tls(pki: Pki, client: tuple[pathlib.Path, pathlib.Path]) -> dict[str, Any]:
    return {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": UPSTREAM_TLS,
            "sni": "localhost",
            "common_tls_context": {
                "alpn_protocols": ["h2"],
                "validation_context": {
                    "trusted_ca": {"filename": str(pki.ca)},
                    "match_typed_subject_alt_names": [
                        {"san_type": "DNS", "matcher": {"exact": "localhost"}}
                    ],
                },
                "tls_certificates": [
                    {
                        "certificate_chain": {"filename": str(client[0])},
                        "private_key": {"filename": str(client[1])},
                    }
                ],
            },
        },
    }


@pytest.fixture(scope="module")
def tls_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Gateway, Pki]]:
    work = tmp_path_factory.mktemp("tls-stack")
    (work / "pki").mkdir()
    pki = Pki(work / "pki")
    cert, key = pki.issue("servers")
    client = pki.issue("envoy", server=False)
    tls = {"cert_file": str(cert), "key_file": str(key), "client_ca_file": str(pki.ca)}

    authz = demo_authz_config()
    authz["server"]["tls"] = tls
    # its own peeks at maas-ratelimit (/v1/quota) over mutual TLS too
    authz["ratelimit"] = {
        **authz.get("ratelimit", {}),
        "tls": {
            "ca_file": str(pki.ca),
            "cert_file": str(client[0]),
            "key_file": str(client[1]),
            "server_name": "localhost",
        },
    }
    ratelimit = yaml.safe_load((CONFIG_DIR / "ratelimit.yaml").read_text())
    ratelimit["server"]["tls"] = tls
    ratelimit["limits"]["file"] = str(CONFIG_DIR / ratelimit["limits"]["file"])
    ratelimit.pop("ledger", None)
    (work / "authz.yaml").write_text(yaml.safe_dump(authz))
    (work / "ratelimit.yaml").write_text(yaml.safe_dump(ratelimit))

    def with_tls(rendered: str) -> str:
        config = yaml.safe_load(rendered)
        clusters = config["static_resources"]["clusters"]
        for cluster in clusters:
            if cluster["name"] in ("maas_authz", "maas_ratelimit"):
                cluster["transport_socket"] = upstream_tls(pki, client)
        return str(yaml.safe_dump(config))

    stack = LocalStack(
        work / "stack",
        Ports.free(),
        authz_config=work / "authz.yaml",
        ratelimit_config=work / "ratelimit.yaml",
        envoy_config_edit=with_tls,
    )
    stack.start()
    yield Gateway(stack), pki
    stack.stop()


def envoy_stat(gateway: Gateway, name: str) -> int:
    url = f"http://127.0.0.1:{gateway.stack.ports.envoy_admin}/stats?filter=^{name}$"
    line = http(url, method="GET").body.decode().strip()
    return int(line.rpartition(": ")[2]) if line else 0


def test_envoy_authorizes_and_limits_over_mutual_tls(tls_stack: tuple[Gateway, Pki]) -> None:
    gateway, _ = tls_stack
    assert gateway.request(CHAT, None, BODY).status == 401
    assert gateway.request(CHAT, "sk-demo-noaccess", BODY).status == 403
    statuses = [gateway.request(CHAT, "sk-demo-free", BODY).status for _ in range(5)]
    assert statuses == [200] * 5
    sixth = gateway.request(CHAT, "sk-demo-free", BODY)
    assert sixth.status == 429
    assert sixth.json() == free_requests_refusal_body(sixth.headers["retry-after"])
    quota = gateway.request("/v1/quota?model=llm/tiny", "sk-demo-free", method="GET")
    assert quota.status == 200, quota.body  # maas-authz's peek at maas-ratelimit, over TLS
    remaining = {x["name"]: x["remaining"] for x in quota.json()["limits"]}  # type: ignore[index]
    assert remaining["free-requests"] == 0
    # both hops were TLS handshakes Envoy made (and the servers accepted its certificate)
    for cluster in ("maas_authz", "maas_ratelimit"):
        assert envoy_stat(gateway, f"cluster.{cluster}.ssl.handshake") >= 1, cluster
        assert envoy_stat(gateway, f"cluster.{cluster}.ssl.connection_error") == 0, cluster
