"""podman for the deployment tier: the commands, the images, and the played pods' containers."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import tomllib
from typing import Any

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
CONTAINERS_CONF = REPO_ROOT / "scripts" / "podman" / "containers.conf"
BASE_IMAGE = "localhost/maas-base/python:3.11-bookworm"
REDIS_IMAGE = "localhost/maas-test/redis:bookworm"
REDIS_CONTAINERFILE = pathlib.Path(__file__).resolve().parent / "redis.Containerfile"


def version() -> str:
    with (REPO_ROOT / "pyproject.toml").open("rb") as file:
        return str(tomllib.load(file)["project"]["version"])


GATEWAY_IMAGE = f"localhost/maas-gateway:{version()}"


def podman(
    *args: str, check: bool = True, timeout: float = 120, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("podman")
    if binary is None:
        pytest.fail("no podman: `make image` installs it (scripts/install-podman.sh)", False)
    env = dict(os.environ, CONTAINERS_CONF=str(CONTAINERS_CONF))
    proc = subprocess.run(
        [binary, *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        check=False,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"podman {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
        )
    return proc


def image_exists(name: str) -> bool:
    return podman("image", "exists", name, check=False).returncode == 0


def require_images() -> None:
    """The gateway image is `make image`'s (built before the tests, as a user builds it); the
    Redis stand-in is the tests' own, built here on the same base when missing."""
    if not image_exists(GATEWAY_IMAGE):
        pytest.fail(f"no image {GATEWAY_IMAGE}: run `make image` (`make test` does)", False)
    if not image_exists(REDIS_IMAGE):
        base = BASE_IMAGE if image_exists(BASE_IMAGE) else None
        if base is None:
            pytest.fail(f"no base image {BASE_IMAGE}: run `make image`", False)
        podman(
            "build",
            "--network",
            "host",
            "--build-arg",
            f"BASE={base}",
            "--tag",
            REDIS_IMAGE,
            "--file",
            str(REDIS_CONTAINERFILE),
            str(REDIS_CONTAINERFILE.parent),
            timeout=300,
        )


def container_name(deployment: str, container: str) -> str:
    """What `podman kube play` names a Deployment's container (one replica)."""
    return f"{deployment}-pod-0-{container}"


def inspect(name: str) -> dict[str, Any]:
    answer = json.loads(podman("inspect", "--type", "container", name).stdout)
    assert isinstance(answer, list) and len(answer) == 1
    found: dict[str, Any] = answer[0]
    return found


def image_size(name: str) -> int:
    return int(podman("image", "inspect", "--format", "{{.Size}}", name).stdout.strip())
