"""TLS on the gRPC and operator API listeners (server.tls), on real server processes: a CA and
certificates made by openssl, real TLS clients, certificates rotated on disk under a running
server and picked up without a restart; mutual TLS."""

from __future__ import annotations

import asyncio
import os
import pathlib
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from maas_authz.quota import RateLimitPeeker
from maas_common.errors import BackendUnavailable, ConfigError
from maas_common.tls import ClientTlsSection, ReloadingClientChannel
from maas_demo.processes import free_port
from tests.e2e.conftest import demo_authz_config
from tests.support.pki import Pki
from tests.support.server_process import ServerProcess

pytestmark = pytest.mark.integration


def install(pair: tuple[pathlib.Path, pathlib.Path], cert: pathlib.Path, key: pathlib.Path) -> None:
    """Replace the served files atomically, as a Secret update does."""
    for source, target in zip(pair, (cert, key), strict=True):
        staged = target.with_suffix(".new")
        staged.write_bytes(source.read_bytes())
        os.replace(staged, target)


def served_certificate(port: int) -> str:
    """The certificate a new TLS connection is given (PEM)."""
    return ssl.get_server_certificate(("127.0.0.1", port), timeout=5)


def same_certificate(pem: str, path: pathlib.Path) -> bool:
    return ssl.PEM_cert_to_DER_cert(pem) == ssl.PEM_cert_to_DER_cert(path.read_text())


def wait_for_certificate(port: int, path: pathlib.Path, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not same_certificate(served_certificate(port), path):
        assert time.monotonic() < deadline, f"still the old certificate on {port}"
        time.sleep(0.1)


def health(target: str, credentials: grpc.ChannelCredentials | None) -> int:
    channel = (
        grpc.insecure_channel(target)
        if credentials is None
        else grpc.secure_channel(target, credentials)
    )
    with channel:
        stub = health_pb2_grpc.HealthStub(channel)
        return int(stub.Check(health_pb2.HealthCheckRequest(), timeout=5).status)


@pytest.fixture
def pki(tmp_path: pathlib.Path) -> Pki:
    directory = tmp_path / "pki"
    directory.mkdir()
    return Pki(directory)


@pytest.fixture
def served(pki: Pki, tmp_path: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
    """The files the server is configured with (a mounted Secret), holding "first"."""
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    install(pki.issue("first"), cert, key)
    return cert, key


def ratelimit_with_tls(
    tmp_path: pathlib.Path, tls: dict[str, object], name: str = "maas-ratelimit (TLS)"
) -> ServerProcess:
    config = tmp_path / f"{name}.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "server": {"grpc_addr": "127.0.0.1:0", "http_addr": "127.0.0.1:0", "tls": tls},
                "store": {"type": "memory"},
            }
        )
    )
    return ServerProcess.start(name, ["maas_ratelimit", "--config", str(config)], tmp_path)


@pytest.fixture
def ratelimit(
    pki: Pki, served: tuple[pathlib.Path, pathlib.Path], tmp_path: pathlib.Path
) -> Iterator[ServerProcess]:
    cert, key = served
    server = ratelimit_with_tls(tmp_path, {"cert_file": str(cert), "key_file": str(key)})
    yield server
    server.child.stop()


@pytest.fixture
def mutual_tls_ratelimit(
    pki: Pki, served: tuple[pathlib.Path, pathlib.Path], tmp_path: pathlib.Path
) -> Iterator[ServerProcess]:
    """maas-ratelimit serving TLS and asking clients for a certificate of the test CA."""
    cert, key = served
    server = ratelimit_with_tls(
        tmp_path,
        {"cert_file": str(cert), "key_file": str(key), "client_ca_file": str(pki.ca)},
        name="maas-ratelimit (mTLS)",
    )
    yield server
    server.child.stop()


def test_grpc_listener_serves_tls_only_and_picks_up_a_rotated_certificate(
    pki: Pki, served: tuple[pathlib.Path, pathlib.Path], ratelimit: ServerProcess
) -> None:
    cert, key = served
    trusted = grpc.ssl_channel_credentials(root_certificates=pki.ca.read_bytes())
    assert health(ratelimit.target, trusted) == health_pb2.HealthCheckResponse.SERVING
    assert same_certificate(served_certificate(ratelimit.grpc_port), cert)
    with pytest.raises(grpc.RpcError) as plain:
        health(ratelimit.target, None)
    assert plain.value.code() == grpc.StatusCode.UNAVAILABLE

    kept_open = grpc.secure_channel(ratelimit.target, trusted)
    stub = health_pb2_grpc.HealthStub(kept_open)
    stub.Check(health_pb2.HealthCheckRequest(), timeout=5)

    second = pki.issue("second")
    install(second, cert, key)
    wait_for_certificate(ratelimit.grpc_port, second[0])
    assert health(ratelimit.target, trusted) == health_pb2.HealthCheckResponse.SERVING
    stub.Check(health_pb2.HealthCheckRequest(), timeout=5)  # an open connection carries on
    kept_open.close()

    # a Secret caught mid-update: the previous certificate stays, and the server says so
    cert.write_text("-----BEGIN CERTIFICATE-----\nnot a certificate\n")
    assert same_certificate(served_certificate(ratelimit.grpc_port), second[0])
    assert health(ratelimit.target, trusted) == health_pb2.HealthCheckResponse.SERVING
    install(pki.issue("third"), cert, key)
    wait_for_certificate(ratelimit.grpc_port, pki.dir / "third.crt")
    log = ratelimit.child.log_path.read_text()
    assert "could not be loaded (keeping the previous)" in log
    assert "Traceback" not in log


def test_mutual_tls_refuses_a_client_without_a_certificate_of_the_ca(
    pki: Pki, mutual_tls_ratelimit: ServerProcess
) -> None:
    server = mutual_tls_ratelimit
    client_cert, client_key = pki.issue("envoy", server=False)
    with_cert = grpc.ssl_channel_credentials(
        root_certificates=pki.ca.read_bytes(),
        private_key=client_key.read_bytes(),
        certificate_chain=client_cert.read_bytes(),
    )
    assert health(server.target, with_cert) == health_pb2.HealthCheckResponse.SERVING
    without = grpc.ssl_channel_credentials(root_certificates=pki.ca.read_bytes())
    with pytest.raises(grpc.RpcError) as refused:
        health(server.target, without)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


def test_a_missing_certificate_fails_start_up_naming_the_key(tmp_path: pathlib.Path) -> None:
    config = tmp_path / "ratelimit.yaml"
    missing = tmp_path / "nope.crt"
    config.write_text(
        yaml.safe_dump(
            {
                "server": {
                    "grpc_addr": "127.0.0.1:0",
                    "http_addr": "127.0.0.1:0",
                    "tls": {"cert_file": str(missing), "key_file": str(missing)},
                },
                "store": {"type": "memory"},
            }
        )
    )
    proc = subprocess.run(
        [sys.executable, "-m", "maas_ratelimit", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2, proc.stderr
    assert f"server.tls: cert_file: {missing}: no such file" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_operator_api_serves_https_and_reloads_its_certificate(
    pki: Pki, served: tuple[pathlib.Path, pathlib.Path], tmp_path: pathlib.Path
) -> None:
    cert, key = served
    config = demo_authz_config()
    admin_port = free_port()
    config["server"].update(
        admin_api_addr=f"127.0.0.1:{admin_port}",
        tls={"cert_file": str(cert), "key_file": str(key), "reload_interval": "200ms"},
    )
    config["server"].pop("admin_addr", None)
    path = tmp_path / "authz.yaml"
    path.write_text(yaml.safe_dump(config))
    server = ServerProcess.start(
        "maas-authz (TLS)", ["maas_authz", "--config", str(path)], tmp_path
    )
    try:
        context = ssl.create_default_context(cafile=str(pki.ca))
        url = f"https://127.0.0.1:{admin_port}/admin/v1/decisions"
        with pytest.raises(urllib.error.HTTPError) as unauthenticated:
            urllib.request.urlopen(url, context=context, timeout=5)
        assert unauthenticated.value.code == 401  # HTTP over TLS, then the API's own auth
        unauthenticated.value.close()
        request = urllib.request.Request(url, headers={"Authorization": "Bearer sk-demo-admin"})
        with urllib.request.urlopen(request, context=context, timeout=5) as answer:
            assert answer.status == 200
        with pytest.raises(OSError):  # plain HTTP: the TLS listener hangs up
            urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/admin/v1/decisions", timeout=5)
        # the gRPC listener is TLS too (one server.tls for both)
        trusted = grpc.ssl_channel_credentials(root_certificates=pki.ca.read_bytes())
        assert health(server.target, trusted) == health_pb2.HealthCheckResponse.SERVING

        second = pki.issue("second")
        install(second, cert, key)
        wait_for_certificate(admin_port, second[0])
        with urllib.request.urlopen(request, context=context, timeout=5) as answer:
            assert answer.status == 200
    finally:
        server.child.stop()


@pytest.mark.asyncio
async def test_maas_authz_peeks_follow_a_renewed_client_certificate_without_a_restart(
    pki: Pki, mutual_tls_ratelimit: ServerProcess, tmp_path: pathlib.Path
) -> None:
    server = mutual_tls_ratelimit
    (tmp_path / "other").mkdir()
    stranger = Pki(tmp_path / "other").issue("maas-authz", server=False)  # another CA's
    client_cert, client_key = tmp_path / "client.crt", tmp_path / "client.key"
    install(stranger, client_cert, client_key)
    section = ClientTlsSection(
        ca_file=pki.ca, cert_file=client_cert, key_file=client_key, reload_interval=0.1
    )
    tls = ReloadingClientChannel(section, server.target, "ratelimit")
    peeker = RateLimitPeeker(server.target, "maas", timeout=2, max_concurrency=4, tls=tls)
    descriptor = [{"tier": "free", "user": "u"}]
    try:
        # a client certificate the server does not trust: refused, as it should be
        with pytest.raises(BackendUnavailable):
            await peeker.peek(descriptor)

        # the Secret renewed with a certificate of the right CA: the next peeks use it
        install(pki.issue("maas-authz", server=False), client_cert, client_key)
        await asyncio.sleep(0.2)
        assert "free-requests" in [
            limit["name"] for limit in (await peeker.peek(descriptor)).limits
        ]
        assert tls.reloads == 1

        # caught mid-update: the channel in use stays, a warning says why
        client_cert.write_text("-----BEGIN CERTIFICATE-----\nnot a certificate\n")
        await asyncio.sleep(0.2)
        assert "free-requests" in [
            limit["name"] for limit in (await peeker.peek(descriptor)).limits
        ]
        assert tls.reloads == 1
    finally:
        await peeker.close()


def test_an_unusable_client_certificate_fails_start_up_naming_the_setting(
    pki: Pki, tmp_path: pathlib.Path
) -> None:
    broken = tmp_path / "client.crt"
    broken.write_text("-----BEGIN CERTIFICATE-----\nnot a certificate\n")
    _, key = pki.issue("maas-authz", server=False)
    section = ClientTlsSection(ca_file=pki.ca, cert_file=broken, key_file=key)
    with pytest.raises(ConfigError) as refused:
        ReloadingClientChannel(section, "127.0.0.1:1", "ratelimit")
    assert "ratelimit" in str(refused.value) and "tls" in str(refused.value)
