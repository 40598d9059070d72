"""A throwaway CA and certificates made by openssl, for the TLS tests."""

from __future__ import annotations

import pathlib
import subprocess


def openssl(*args: str, cwd: pathlib.Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


class Pki:
    def __init__(self, directory: pathlib.Path) -> None:
        self.dir = directory
        openssl(
            "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
            "-keyout", "ca.key", "-out", "ca.crt", "-days", "2", "-subj", "/CN=maas-test-ca",
            cwd=directory,
        )  # fmt: skip

    @property
    def ca(self) -> pathlib.Path:
        return self.dir / "ca.crt"

    def issue(self, name: str, *, server: bool = True) -> tuple[pathlib.Path, pathlib.Path]:
        ext = self.dir / f"{name}.ext"
        usage = "serverAuth" if server else "clientAuth"
        ext.write_text(f"subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage={usage}\n")
        openssl(
            "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
            "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}",
            cwd=self.dir,
        )  # fmt: skip
        openssl(
            "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
            "-CAcreateserial", "-out", f"{name}.crt", "-days", "1", "-extfile", ext.name,
            cwd=self.dir,
        )  # fmt: skip
        return self.dir / f"{name}.crt", self.dir / f"{name}.key"
