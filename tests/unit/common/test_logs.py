"""Unit tests for maas_common.logs: token fingerprints, secret scrubbing and the log formats."""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Iterator
from typing import Any

import pytest

from maas_common.clock import ManualClock
from maas_common.logs import LogThrottle, scrub, setup_logging, token_fingerprint

JWT = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9.c2lnbmF0dXJlLXBhcnQ"
BEARER = "Bearer s3cr3t-opaque-token"
API_KEY = "sk-live_0123456789abcdef"


@pytest.fixture
def restore_root_logger(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """setup_logging() replaces the root logger's handlers; put pytest's back afterwards."""
    root = logging.getLogger()
    access = logging.getLogger("aiohttp.access")
    saved_handlers, saved_level, saved_access_level = list(root.handlers), root.level, access.level
    # pytest adds and removes handlers of this type around every test phase; those present now
    # belong to the set-up phase and are gone by the teardown, so only the others are restored.
    per_phase = type(caplog.handler)
    yield
    root.handlers[:] = [h for h in saved_handlers if not isinstance(h, per_phase)] + [
        h for h in root.handlers if isinstance(h, per_phase)
    ]
    root.setLevel(saved_level)
    access.setLevel(saved_access_level)


def json_lines(stderr: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stderr.splitlines()]


# --- token_fingerprint ----------------------------------------------------------------------


def test_token_fingerprint_is_stable_short_and_hides_the_token() -> None:
    fingerprint = token_fingerprint(JWT)
    assert fingerprint == token_fingerprint(JWT)
    assert re.fullmatch(r"sha256:[0-9a-f]{12}", fingerprint)
    assert fingerprint == "sha256:" + hashlib.sha256(JWT.encode()).hexdigest()[:12]
    assert JWT not in fingerprint
    assert JWT[:8] not in fingerprint


def test_token_fingerprints_of_different_tokens_differ() -> None:
    assert token_fingerprint("token-a") != token_fingerprint("token-b")


def test_token_fingerprint_accepts_text_that_is_not_valid_unicode() -> None:
    # Header values can carry lone surrogates after lenient decoding; fingerprinting must not fail.
    assert re.fullmatch(r"sha256:[0-9a-f]{12}", token_fingerprint("abc\udcff"))


# --- scrub ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Authorization: Bearer xyz", "Authorization: Bearer [REDACTED]"),
        ("authorization: bearer xyz", "authorization: bearer [REDACTED]"),
        ("BEARER\txyz", "BEARER\t[REDACTED]"),
        ('{"h": "Bearer abc.def-ghi", "n": 1}', '{"h": "Bearer [REDACTED]", "n": 1}'),
        ("Bearer a, Bearer b; done", "Bearer [REDACTED], Bearer [REDACTED]; done"),
        (f"token={JWT} rest", "token=[REDACTED] rest"),
        (f"key {API_KEY} used", "key [REDACTED] used"),
        (f"Bearer {JWT}", "Bearer [REDACTED]"),
    ],
)
def test_scrub_redacts_credentials(text: str, expected: str) -> None:
    assert scrub(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "nothing secret here",
        "task-sk-1 is not a key",  # no word boundary before "sk-"
        "sk-abc",  # too short to be a key
        "eyJ.not.jwt",  # segments too short
        "user alice from 10.0.0.1",
    ],
)
def test_scrub_leaves_ordinary_text_alone(text: str) -> None:
    assert scrub(text) == text


def test_scrub_removes_every_secret_from_a_mixed_line() -> None:
    cleaned = scrub(f"h={BEARER} jwt={JWT} key={API_KEY}")
    for secret in ("s3cr3t-opaque-token", JWT, API_KEY):
        assert secret not in cleaned
    assert cleaned.count("[REDACTED]") == 3


# --- setup_logging --------------------------------------------------------------------------


@pytest.mark.usefixtures("restore_root_logger")
def test_json_logging_writes_one_object_per_line_without_secrets(
    capsys: pytest.CaptureFixture[str],
) -> None:
    setup_logging("info", "json")
    log = logging.getLogger("maas.test")
    log.info("request with header %s and token %s", BEARER, JWT)
    log.warning("api key %s refused", API_KEY)

    err = capsys.readouterr().err
    for secret in ("s3cr3t-opaque-token", JWT, API_KEY, "eyJhbGciOi"):
        assert secret not in err
    first, second = json_lines(err)
    assert first["msg"] == "request with header Bearer [REDACTED] and token [REDACTED]"
    assert first["level"] == "info"
    assert first["logger"] == "maas.test"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", first["ts"])
    assert second == {**second, "level": "warning", "msg": "api key [REDACTED] refused"}


@pytest.mark.usefixtures("restore_root_logger")
def test_json_logging_includes_extras_and_scrubs_string_extras(
    capsys: pytest.CaptureFixture[str],
) -> None:
    setup_logging("info", "json")
    logging.getLogger("maas.test").info(
        "checked", extra={"path": "/v1/models", "status": 403, "header": BEARER}
    )
    (entry,) = json_lines(capsys.readouterr().err)
    assert entry["path"] == "/v1/models"
    assert entry["status"] == 403
    assert entry["header"] == "Bearer [REDACTED]"


@pytest.mark.usefixtures("restore_root_logger")
def test_json_logging_scrubs_exception_tracebacks(capsys: pytest.CaptureFixture[str]) -> None:
    setup_logging("info", "json")
    try:
        raise ValueError(f"rejected {JWT}")
    except ValueError:
        logging.getLogger("maas.test").exception("lookup failed")
    err = capsys.readouterr().err
    assert JWT not in err
    (entry,) = json_lines(err)
    assert entry["level"] == "error"
    assert "ValueError: rejected [REDACTED]" in entry["exc"]


@pytest.mark.usefixtures("restore_root_logger")
def test_the_level_filters_out_less_severe_records(capsys: pytest.CaptureFixture[str]) -> None:
    setup_logging("warning", "json")
    log = logging.getLogger("maas.test")
    log.info("quiet")
    log.error("loud")
    assert [entry["msg"] for entry in json_lines(capsys.readouterr().err)] == ["loud"]


@pytest.mark.usefixtures("restore_root_logger")
def test_setup_logging_replaces_handlers_and_quietens_the_access_log(
    capsys: pytest.CaptureFixture[str],
) -> None:
    setup_logging("debug", "json")
    setup_logging("debug", "json")  # calling twice must not double every line
    root = logging.getLogger()
    assert len(root.handlers) == 1
    assert root.level == logging.DEBUG
    assert logging.getLogger("aiohttp.access").level == logging.WARNING
    logging.getLogger("maas.test").debug("once")
    assert len(json_lines(capsys.readouterr().err)) == 1


@pytest.mark.usefixtures("restore_root_logger")
def test_text_logging_is_scrubbed_including_extras(capsys: pytest.CaptureFixture[str]) -> None:
    setup_logging("info", "text")
    logging.getLogger("maas.test").info("token %s", JWT, extra={"header": BEARER, "n": 7})
    err = capsys.readouterr().err
    assert JWT not in err
    assert "s3cr3t-opaque-token" not in err
    line = err.rstrip("\n")
    assert "\n" not in line
    assert line.endswith(" INFO maas.test: token [REDACTED] header=Bearer [REDACTED] n=7")


@pytest.mark.usefixtures("restore_root_logger")
def test_a_malformed_log_call_does_not_raise_into_the_caller(
    capsys: pytest.CaptureFixture[str],
) -> None:
    setup_logging("info", "json")
    log = logging.getLogger("maas.test")
    log.info("two placeholders %s %s", "one argument")  # noqa: PLE1206 - on purpose
    log.info("still logging")
    err = capsys.readouterr().err
    assert "--- Logging error ---" in err  # reported the standard way by Handler.handleError
    assert '"msg": "still logging"' in err


def test_log_throttle_lets_one_event_through_per_interval_and_counts_the_rest() -> None:
    clock = ManualClock()
    throttle = LogThrottle(clock, seconds=5.0)
    assert throttle.allow() == 0
    assert [throttle.allow() for _ in range(3)] == [None, None, None]
    clock.advance(4.999)
    assert throttle.allow() is None
    clock.advance(0.001)
    assert throttle.allow() == 4  # the four held back since the last line
    assert throttle.allow() is None


def test_log_throttle_logs_a_line_per_interval_saying_how_many_it_held_back(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = ManualClock()
    throttle = LogThrottle(clock, seconds=5.0)
    logger = logging.getLogger("maas.test.throttle")
    with caplog.at_level(logging.WARNING, logger="maas.test.throttle"):
        for n in range(4):
            throttle.log(logger, logging.WARNING, "store down: %s", n, extra={"kind": "timeout"})
        clock.advance(5.0)
        throttle.log(logger, logging.ERROR, "still down")
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [
        (logging.WARNING, "store down: 0"),
        (logging.ERROR, "still down"),
    ]
    assert caplog.records[0].suppressed == 0 and caplog.records[0].kind == "timeout"  # type: ignore[attr-defined]
    assert caplog.records[1].suppressed == 3  # type: ignore[attr-defined]
