"""Credentials where they must never be: our servers' logs and metrics.

`scan` reads every log (`*.log`) and kept /metrics (`*.metrics`, LocalStack.keep_metrics) under a
directory (the test session's temporary directory, where every stack writes them) and reports
any credential found: the keys the tests use (taken from the demo config, README and the test
sources: every `sk-demo-`/`sk-oai-` key), their SHA-256 digests (of the whole key and of its
secret part, and maas-api's salted key_hash), anything shaped like a JWT (every
Kubernetes token), and any `Bearer` value. The logs of third-party servers the tests start
(Redis, etcd, the kube-apiserver, PostgreSQL, Prometheus, vLLM, Chromium) are not ours and are
skipped. `metric_label_problems` checks the kept metrics' labels: no label that names a user,
key or token, and no label with more distinct values than the servers' bounds allow.
"""

from __future__ import annotations

import hashlib
import pathlib
import re
from collections import defaultdict
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

from maas_authz.api_keys import hash_key

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
KEY = re.compile(rb"sk-(?:demo|oai)-[A-Za-z0-9_]+")
JWT = re.compile(rb"eyJ[A-Za-z0-9_-]{10,}\.eyJ[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]+")
BEARER = re.compile(rb"[Bb]earer [A-Za-z0-9._~+/-]{8,}")
THIRD_PARTY = re.compile(
    r"redis|etcd|kube-apiserver|postgres|prometheus|vllm|chrom|^\d+\.log$|upstream"
)
# label names that would carry an identity or a credential
FORBIDDEN_LABELS = {"user", "username", "key", "key_id", "token", "authorization", "api_key"}
# maas_common.metrics.BoundedLabel's caps (256 subscriptions, 512 models) with room for the
# configured names
MAX_LABEL_VALUES = 800


@dataclass(frozen=True)
class Leak:
    path: pathlib.Path
    what: str  # never the credential itself: its kind and first characters

    def __str__(self) -> str:
        return f"{self.path}: {self.what}"


def known_keys() -> set[bytes]:
    """Every sk-demo-/sk-oai- key the demo config, README and tests use."""
    sources = [REPO_ROOT / "README.md", *(REPO_ROOT / "src" / "maas_demo" / "config").iterdir()]
    sources += list((REPO_ROOT / "tests").rglob("*.py"))
    keys: set[bytes] = set()
    for source in sources:
        if source.is_file():
            keys.update(KEY.findall(source.read_bytes()))
    return {k for k in keys if not k.endswith(b"-")}


def digests(keys: set[bytes]) -> set[bytes]:
    """SHA-256 hex of each key and of its secret part, and the api_keys table's key_hash."""
    found = set()
    for key in keys:
        secret = key.split(b"_", 1)[1] if key.startswith(b"sk-oai-") and b"_" in key else key
        for part in {key, secret}:
            found.add(hashlib.sha256(part).hexdigest().encode())
        key_hash = hash_key(key.decode())
        if key_hash is not None:
            found.add(key_hash.encode())
    return found


def files(root: pathlib.Path) -> list[pathlib.Path]:
    return sorted(
        path
        for pattern in ("*.log", "*.metrics")
        for path in root.rglob(pattern)
        if path.is_file() and not THIRD_PARTY.search(path.name)
    )


def scan(paths: list[pathlib.Path], keys: set[bytes]) -> list[Leak]:
    hashes = digests(keys)
    leaks = []
    for path in paths:
        data = path.read_bytes()
        for key in keys:
            if key in data:
                leaks.append(Leak(path, f"key {key[:7].decode()}… ({len(key)} characters)"))
        for digest in hashes:
            if digest in data:
                leaks.append(Leak(path, f"SHA-256 of a key ({digest[:8].decode()}…)"))
        for pattern, kind in ((JWT, "a JWT"), (BEARER, "a Bearer credential")):
            match = pattern.search(data)
            if match:
                leaks.append(Leak(path, f"{kind} ({match.group()[:12].decode()}…)"))
    return leaks


def metric_label_problems(paths: list[pathlib.Path]) -> list[str]:
    problems = []
    for path in paths:
        if path.suffix != ".metrics":
            continue
        values: dict[tuple[str, str], set[str]] = defaultdict(set)
        for family in text_string_to_metric_families(path.read_text()):
            for sample in family.samples:
                for label, value in sample.labels.items():
                    values[(family.name, label)].add(value)
        for (family_name, label), seen in sorted(values.items()):
            if label in FORBIDDEN_LABELS:
                problems.append(f"{path}: {family_name} has a label {label!r}")
            if len(seen) > MAX_LABEL_VALUES:
                problems.append(f"{path}: {family_name}{{{label}}} has {len(seen)} values")
    return problems
