"""A throwaway single-node Kubernetes control plane (etcd + kube-apiserver) for tests.

Only the API server runs: no controller-manager, scheduler or kubelet. That is enough for
namespaces, ServiceAccounts, TokenRequest, TokenReview, Role/RoleBinding and
SubjectAccessReview, which is what the gateway talks to.

The kube-apiserver binary (v1.20.2) is built once by ``scripts/provision-kube-apiserver.sh``
and cached outside the repo; :func:`find_apiserver_binary` returns it (or ``None`` so tests can
skip). etcd comes from Debian's ``etcd-server`` package. Keys and certificates are made with the
``openssl`` CLI.

TLS: the API server serves a certificate signed by a per-cluster CA (SAN ``IP:127.0.0.1`` and
``DNS:localhost``); :attr:`KubeCluster.ca_file` is that CA, so clients can verify TLS.

All processes run in their own process group and are killed by :meth:`KubeCluster.stop`, which
is also registered with :mod:`atexit`.
"""

from __future__ import annotations

import json
import os
import pathlib
import secrets
import shutil
import ssl
import subprocess
import urllib.error
import urllib.request

from maas_demo.processes import (
    LiveSet,
    free_port,
    spawn_logged,
    stop_process_group,
    wait_until_ready,
)

__all__ = ["KUBE_VERSION", "SA_AUDIENCE", "KubeCluster", "find_apiserver_binary"]

KUBE_VERSION = "v1.20.2"
SA_AUDIENCE = "maas-default-gateway-sa"
SA_ISSUER = "https://kubernetes.default.svc.cluster.local"

_STOP_GRACE = 15.0  # seconds a process group gets to exit after SIGTERM, before SIGKILL


def _cache_dir() -> pathlib.Path:
    env = os.environ.get("MAAS_CACHE_DIR")
    if env:
        return pathlib.Path(env)
    return pathlib.Path.home() / ".cache" / "maas-gateway"


def find_apiserver_binary() -> pathlib.Path | None:
    """Path of the kube-apiserver cached by scripts/provision-kube-apiserver.sh, or None."""
    # -r2: built with reflect2 1.0.2 (scripts/provision-kube-apiserver.sh)
    path = _cache_dir() / f"kube-apiserver-{KUBE_VERSION}-r2" / "kube-apiserver"
    if path.is_file() and os.access(path, os.X_OK):
        return path
    return None


def _has_default_route() -> bool:
    try:
        with open("/proc/net/route") as fh:
            next(fh, None)
            return any(line.split()[1:2] == ["00000000"] for line in fh)
    except OSError:
        return True  # unknown: let kube-apiserver decide


def _openssl(*args: str, cwd: pathlib.Path) -> None:
    proc = subprocess.run(
        ["openssl", *args],
        check=False,
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"openssl {' '.join(args)} failed:\n{proc.stdout}")


_LIVE: LiveSet[KubeCluster] = LiveSet("stop")  # clusters still running are stopped at exit


class KubeCluster:
    """etcd + kube-apiserver on free loopback ports, state under ``workdir``."""

    def __init__(
        self,
        workdir: pathlib.Path,
        apiserver_bin: pathlib.Path,
        etcd_bin: str = "etcd",
        *,
        ready_timeout: float = 60.0,
    ) -> None:
        self.workdir = pathlib.Path(workdir).resolve()
        self.apiserver_bin = pathlib.Path(apiserver_bin)
        self.etcd_bin = etcd_bin
        self.ready_timeout = ready_timeout

        self.pki_dir = self.workdir / "pki"
        self.etcd_data_dir = self.workdir / "etcd-data"
        self.log_dir = self.workdir / "logs"
        self.etcd_log = self.log_dir / "etcd.log"
        self.apiserver_log = self.log_dir / "kube-apiserver.log"

        self.ca_file = self.pki_dir / "ca.crt"
        self.admin_token = secrets.token_hex(24)
        self.admin_user = "admin"

        self.port: int = 0
        self.url: str = ""
        self.etcd_client_port: int = 0
        self.etcd_peer_port: int = 0
        self.etcd_url: str = ""

        self._etcd: subprocess.Popen[bytes] | None = None
        self._apiserver: subprocess.Popen[bytes] | None = None
        self._apiserver_args: list[str] | None = None
        self._prepared = False

    # -- context manager -------------------------------------------------------------------
    def __enter__(self) -> KubeCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- public API ------------------------------------------------------------------------
    def start(self) -> None:
        """Start etcd and kube-apiserver; block until /readyz is ok (or raise)."""
        if self._apiserver is not None and self._apiserver.poll() is None:
            return
        _LIVE.add(self)
        try:
            if not self._prepared:
                self._prepare()
            if self._etcd is None or self._etcd.poll() is not None:
                self._start_etcd()
            self.start_apiserver()
        except BaseException:
            self.stop()
            raise

    def stop_apiserver(self) -> None:
        """SIGTERM kube-apiserver and wait for it to exit; etcd keeps running."""
        proc, self._apiserver = self._apiserver, None
        if proc is not None:
            stop_process_group(proc, grace=_STOP_GRACE)

    def start_apiserver(self) -> None:
        """(Re)start kube-apiserver with the same port and args; block until /readyz is ok."""
        if self._apiserver_args is None:
            raise RuntimeError("call start() first")
        if self._apiserver is not None and self._apiserver.poll() is None:
            return
        self._apiserver = self._spawn(self._apiserver_args, self.apiserver_log)
        try:
            self._wait_ready()
        except BaseException:
            self.stop_apiserver()
            raise

    def stop(self) -> None:
        """Stop everything. Idempotent."""
        self.stop_apiserver()
        proc, self._etcd = self._etcd, None
        if proc is not None:
            stop_process_group(proc, grace=_STOP_GRACE)
        _LIVE.discard(self)

    @property
    def apiserver_running(self) -> bool:
        return self._apiserver is not None and self._apiserver.poll() is None

    def write_kubeconfig(self, path: pathlib.Path, token: str | None = None) -> pathlib.Path:
        """Write a kubeconfig for this cluster using ``token`` (default: the admin token)."""
        if not self.url:
            raise RuntimeError("call start() first")
        path = pathlib.Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tok = self.admin_token if token is None else token
        # JSON is valid YAML; json.dumps also quotes/escapes every value safely.
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "maas-test",
                    "cluster": {"server": self.url, "certificate-authority": str(self.ca_file)},
                }
            ],
            "users": [{"name": "maas-test-user", "user": {"token": tok}}],
            "contexts": [
                {
                    "name": "maas-test",
                    "context": {"cluster": "maas-test", "user": "maas-test-user"},
                }
            ],
            "current-context": "maas-test",
            "preferences": {},
        }
        path.write_text(json.dumps(config, indent=2) + "\n")
        path.chmod(0o600)
        return path

    # -- internals -------------------------------------------------------------------------
    def _prepare(self) -> None:
        if shutil.which(self.etcd_bin) is None and not os.access(self.etcd_bin, os.X_OK):
            raise RuntimeError(
                f"etcd binary {self.etcd_bin!r} not found (apt-get install etcd-server)"
            )
        if not os.access(self.apiserver_bin, os.X_OK):
            raise RuntimeError(
                f"kube-apiserver {self.apiserver_bin} not found; "
                "run scripts/provision-kube-apiserver.sh"
            )
        for d in (self.pki_dir, self.etcd_data_dir, self.log_dir):
            d.mkdir(parents=True, exist_ok=True)
        self.etcd_data_dir.chmod(0o700)
        self._make_pki()

        self.etcd_client_port = free_port()
        self.etcd_peer_port = free_port()
        while self.etcd_peer_port == self.etcd_client_port:
            self.etcd_peer_port = free_port()
        self.etcd_url = f"http://127.0.0.1:{self.etcd_client_port}"
        self.port = free_port()
        self.url = f"https://127.0.0.1:{self.port}"

        tokens = self.pki_dir / "tokens.csv"
        tokens.write_text(f'{self.admin_token},{self.admin_user},admin-uid,"system:masters"\n')
        tokens.chmod(0o600)

        p = self.pki_dir
        self._apiserver_args = [
            str(self.apiserver_bin),
            f"--etcd-servers={self.etcd_url}",
            "--bind-address=127.0.0.1",
            f"--secure-port={self.port}",
            f"--cert-dir={p}",
            f"--tls-cert-file={p / 'apiserver.crt'}",
            f"--tls-private-key-file={p / 'apiserver.key'}",
            f"--client-ca-file={p / 'ca.crt'}",
            f"--service-account-issuer={SA_ISSUER}",
            f"--service-account-key-file={p / 'sa.pub'}",
            f"--service-account-signing-key-file={p / 'sa.key'}",
            f"--api-audiences={SA_AUDIENCE}",
            f"--token-auth-file={tokens}",
            "--authorization-mode=RBAC",
            "--service-cluster-ip-range=10.96.0.0/24",
            "--profiling=false",
            "--logtostderr=true",
            "--v=1",
        ]
        if not _has_default_route():
            # kube-apiserver picks its advertise address from the default route and refuses to
            # start without one; 127.0.0.1 is rejected for the "kubernetes" Endpoints. The
            # address is only written into that (unused) Endpoints object: use TEST-NET-1.
            self._apiserver_args.append("--advertise-address=192.0.2.1")
        self._prepared = True

    def _make_pki(self) -> None:
        p = self.pki_dir
        if not (p / "sa.key").exists():
            _openssl("genrsa", "-out", "sa.key", "2048", cwd=p)
            _openssl("rsa", "-in", "sa.key", "-pubout", "-out", "sa.pub", cwd=p)
        if not (p / "ca.crt").exists():
            _openssl(
                "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-sha256", "-days", "3650",
                "-keyout", "ca.key", "-out", "ca.crt", "-subj", "/CN=maas-test-ca",
                "-addext", "basicConstraints=critical,CA:TRUE",
                "-addext", "keyUsage=critical,keyCertSign,cRLSign",
                cwd=p,
            )  # fmt: skip
        if not (p / "apiserver.crt").exists():
            (p / "apiserver.ext").write_text(
                "basicConstraints=critical,CA:FALSE\n"
                "keyUsage=critical,digitalSignature,keyEncipherment\n"
                "extendedKeyUsage=serverAuth\n"
                "subjectKeyIdentifier=hash\n"
                "authorityKeyIdentifier=keyid,issuer\n"
                "subjectAltName=IP:127.0.0.1,DNS:localhost,DNS:kubernetes,"
                "DNS:kubernetes.default,DNS:kubernetes.default.svc,IP:10.96.0.1\n"
            )
            _openssl(
                "req", "-new", "-newkey", "rsa:2048", "-nodes", "-sha256",
                "-keyout", "apiserver.key", "-out", "apiserver.csr", "-subj", "/CN=kube-apiserver",
                cwd=p,
            )  # fmt: skip
            _openssl(
                "x509", "-req", "-in", "apiserver.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
                "-CAcreateserial", "-sha256", "-days", "3650",
                "-extfile", "apiserver.ext", "-out", "apiserver.crt",
                cwd=p,
            )  # fmt: skip
        for key in ("sa.key", "ca.key", "apiserver.key"):
            (p / key).chmod(0o600)

    def _spawn(self, args: list[str], log: pathlib.Path) -> subprocess.Popen[bytes]:
        return spawn_logged(args, log, cwd=self.workdir, banner=" ".join(args))

    def _start_etcd(self) -> None:
        peer = f"http://127.0.0.1:{self.etcd_peer_port}"
        args = [
            self.etcd_bin,
            "--name=maas-test",
            f"--data-dir={self.etcd_data_dir}",
            f"--listen-client-urls={self.etcd_url}",
            f"--advertise-client-urls={self.etcd_url}",
            f"--listen-peer-urls={peer}",
            f"--initial-advertise-peer-urls={peer}",
            f"--initial-cluster=maas-test={peer}",
            "--initial-cluster-state=new",
            "--log-level=warn",
        ]
        self._etcd = self._spawn(args, self.etcd_log)
        last = ""

        def healthy() -> bool:
            nonlocal last
            try:
                with urllib.request.urlopen(f"{self.etcd_url}/health", timeout=2) as resp:
                    body = resp.read().decode()
                if '"true"' in body:
                    return True
                last = body
            except (urllib.error.URLError, OSError) as exc:
                last = str(exc)
            return False

        wait_until_ready(
            self._etcd,
            healthy,
            name="etcd",
            log_file=self.etcd_log,
            timeout=self.ready_timeout,
            interval=0.1,
            not_ready=lambda: f"not healthy after {self.ready_timeout:.0f}s (last: {last})",
        )

    def _wait_ready(self) -> None:
        assert self._apiserver is not None
        ctx = ssl.create_default_context(cafile=str(self.ca_file))
        req = urllib.request.Request(
            f"{self.url}/readyz", headers={"Authorization": f"Bearer {self.admin_token}"}
        )
        last = ""

        def ready() -> bool:
            nonlocal last
            try:
                with urllib.request.urlopen(req, timeout=2, context=ctx) as resp:
                    body = resp.read().decode(errors="replace")
                    if resp.status == 200 and body.strip() == "ok":
                        return True
                    last = f"HTTP {resp.status}: {body[:200]}"
            except urllib.error.HTTPError as exc:
                last = f"HTTP {exc.code}: {exc.read()[:300].decode(errors='replace')}"
            except (urllib.error.URLError, OSError) as exc:
                last = str(exc)
            return False

        wait_until_ready(
            self._apiserver,
            ready,
            name="kube-apiserver",
            log_file=self.apiserver_log,
            timeout=self.ready_timeout,
            interval=0.2,
            not_ready=lambda: f"not ready after {self.ready_timeout:.0f}s (last: {last})",
        )
