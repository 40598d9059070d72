"""The scanner behind the end-to-end tier's session check (tests/support/leaks.py) finds what it
looks for: a check that cannot fail would prove nothing."""

from __future__ import annotations

import hashlib
import pathlib
import tempfile
from collections.abc import Iterator

import pytest

from tests.support import leaks

KEY = b"sk-oai-demosmall_DemoSmallSecret1"
JWT = b"eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJzeXN0ZW06c2EifQ.c2lnbmF0dXJl"


@pytest.fixture
def tmp_path() -> Iterator[pathlib.Path]:
    """Outside the session's temporary directory: the session-end scan must not find the
    credentials these tests plant."""
    with tempfile.TemporaryDirectory(prefix="maas-leak-scanner-") as directory:
        yield pathlib.Path(directory)


def write(tmp_path: pathlib.Path, name: str, data: bytes) -> pathlib.Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def test_the_tests_keys_are_known() -> None:
    keys = leaks.known_keys()
    assert KEY in keys and b"sk-demo-free" in keys
    assert b"sk-demo-" not in keys  # a prefix is not a key


def test_each_kind_of_credential_is_found_and_never_quoted_whole(tmp_path: pathlib.Path) -> None:
    secret_digest = hashlib.sha256(b"DemoSmallSecret1").hexdigest().encode()
    paths = [
        write(tmp_path, "authz.log", b'{"msg": "denied", "key": "' + KEY + b'"}\n'),
        write(tmp_path, "ratelimit.log", b"hash " + secret_digest + b"\n"),
        write(tmp_path, "envoy.log", b"token " + JWT + b"\n"),
        write(tmp_path, "backend.log", b"authorization: Bearer abcdefgh12345678\n"),
        write(tmp_path, "clean.log", b'{"msg": "allowed", "user": "demo-free"}\n'),
    ]
    found = leaks.scan(paths, {KEY})
    assert {leak.path.name for leak in found} == {
        "authz.log",
        "ratelimit.log",
        "envoy.log",
        "backend.log",
    }
    for leak in found:
        assert KEY.decode() not in str(leak) and JWT.decode() not in str(leak)


def test_third_party_logs_are_not_ours(tmp_path: pathlib.Path) -> None:
    for name in ("redis-server.log", "kube-apiserver.log", "postgres.log", "authz.log"):
        write(tmp_path, name, b"")
    assert [p.name for p in leaks.files(tmp_path)] == ["authz.log"]


def test_metric_labels_naming_a_user_or_unbounded_are_reported(tmp_path: pathlib.Path) -> None:
    good = "\n".join(f'requests_total{{tier="t{i % 3}"}} 1' for i in range(3))
    many = "\n".join(f'checks_total{{model="m{i}"}} 1' for i in range(leaks.MAX_LABEL_VALUES + 1))
    paths = [
        write(tmp_path, "ok.metrics", (good + "\n").encode()),
        write(tmp_path, "user.metrics", b'denied_total{user="alice"} 1\n'),
        write(tmp_path, "many.metrics", (many + "\n").encode()),
    ]
    problems = leaks.metric_label_problems(paths)
    assert len(problems) == 2
    assert "label 'user'" in problems[0] or "label 'user'" in problems[1]
    assert any(f"{leaks.MAX_LABEL_VALUES + 1} values" in p for p in problems)
