"""One of our servers (`python -m maas_authz` / `maas_ratelimit`) as a real process on free
loopback ports, started and ready, for the tests that need the process itself."""

from __future__ import annotations

import pathlib
import sys
from typing import TypeVar

from maas_demo.stack import Child, free_port, wait_until_ready
from tests.e2e.conftest import http

S = TypeVar("S", bound="ServerProcess")


class ServerProcess:
    def __init__(self, child: Child, grpc_port: int, http_port: int) -> None:
        self.child, self.grpc_port, self.http_port = child, grpc_port, http_port

    @classmethod
    def start(cls: type[S], name: str, argv: list[str], workdir: pathlib.Path) -> S:
        """`python -m <argv>` with --grpc-addr and --http-addr added; ready when /readyz is.
        Its output goes to `workdir/<name>.log`."""
        grpc_port, http_port = free_port(), free_port()
        child = Child(
            name,
            [sys.executable, "-m", *argv, "--grpc-addr", f"127.0.0.1:{grpc_port}",
             "--http-addr", f"127.0.0.1:{http_port}"],
            workdir / f"{name}.log",
            echo=False,
        )  # fmt: skip
        child.start()
        wait_until_ready(child, f"http://127.0.0.1:{http_port}/readyz", 30)
        return cls(child, grpc_port, http_port)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def metrics(self) -> str:
        return http(f"http://127.0.0.1:{self.http_port}/metrics", method="GET").body.decode()
