"""Unit tests for maas_common.reload.WatchedFile: load, hot reload, last-good-version fallback."""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

import pytest

from maas_common.errors import ConfigError
from maas_common.reload import ReloadResult, WatchedFile


def parse(text: str, source: str) -> str:
    """The parsed value is the stripped text; a file containing BROKEN is invalid."""
    if "BROKEN" in text:
        raise ConfigError(source, "value", "is BROKEN")
    return text.strip()


class Watched:
    """A WatchedFile of `path` whose callbacks are recorded."""

    def __init__(self, path: Path) -> None:
        self.results: list[ReloadResult] = []
        self.changes: list[str] = []
        self.file: WatchedFile[str] = WatchedFile(
            path,
            parse,
            name="test-config",
            on_reload=self.results.append,
            on_change=self.changes.append,
        )


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text("one\n", encoding="utf-8")
    return path


# --- load -----------------------------------------------------------------------------------


def test_load_parses_the_file_and_calls_on_change(config: Path) -> None:
    w = Watched(config)
    assert w.file.load() == "one"
    assert w.file.value == "one"
    assert w.changes == ["one"]
    assert w.results == []  # the first load is not a reload


def test_value_before_load_is_an_error_naming_the_file(config: Path) -> None:
    w = Watched(config)
    with pytest.raises(RuntimeError, match=r"^test-config was never loaded$"):
        _ = w.file.value


def test_load_of_a_bad_file_raises_the_parse_error(config: Path) -> None:
    config.write_text("BROKEN\n", encoding="utf-8")
    w = Watched(config)
    with pytest.raises(ConfigError) as excinfo:
        w.file.load()
    assert str(excinfo.value) == f"{config}: value: is BROKEN"
    assert w.changes == []


def test_load_of_a_missing_file_is_a_config_error(tmp_path: Path) -> None:
    missing = tmp_path / "missing.yaml"
    with pytest.raises(ConfigError) as excinfo:
        Watched(missing).file.load()
    assert str(excinfo.value) == f"{missing}: cannot be read: No such file or directory"


def test_load_of_a_file_that_is_not_utf8_is_a_config_error(config: Path) -> None:
    config.write_bytes(b"caf\xe9\n")
    with pytest.raises(ConfigError) as excinfo:
        Watched(config).file.load()
    assert str(excinfo.value) == f"{config}: is not UTF-8 text"


# --- reload_if_changed ----------------------------------------------------------------------


@pytest.mark.asyncio
async def test_an_unchanged_file_reloads_to_none(config: Path) -> None:
    w = Watched(config)
    w.file.load()
    assert await w.file.reload_if_changed() is None
    config.write_text("one\n", encoding="utf-8")  # rewritten with the same bytes
    assert await w.file.reload_if_changed() is None
    assert w.results == []
    assert w.changes == ["one"]


@pytest.mark.asyncio
async def test_a_changed_good_file_is_applied(config: Path) -> None:
    w = Watched(config)
    w.file.load()
    config.write_text("two\n", encoding="utf-8")
    assert await w.file.reload_if_changed() == "applied"
    assert w.file.value == "two"
    assert w.changes == ["one", "two"]
    assert w.results == ["applied"]
    assert await w.file.reload_if_changed() is None


@pytest.mark.asyncio
async def test_a_broken_new_version_is_rejected_once_and_the_old_value_kept(
    config: Path, caplog: pytest.LogCaptureFixture
) -> None:
    w = Watched(config)
    w.file.load()
    config.write_text("two BROKEN\n", encoding="utf-8")
    with caplog.at_level(logging.ERROR, logger="maas_common.reload"):
        assert await w.file.reload_if_changed() == "rejected"
    assert w.file.value == "one"
    assert w.changes == ["one"]
    assert w.results == ["rejected"]
    assert "test-config: rejected the new version, keeping the previous one" in caplog.text
    assert "is BROKEN" in caplog.text

    # The same broken bytes are not reported again ...
    assert await w.file.reload_if_changed() is None
    assert w.results == ["rejected"]
    # ... but a different broken version is.
    config.write_text("three BROKEN\n", encoding="utf-8")
    assert await w.file.reload_if_changed() == "rejected"
    assert w.results == ["rejected", "rejected"]
    assert w.file.value == "one"


@pytest.mark.asyncio
async def test_a_fixed_file_after_a_rejected_one_is_applied(config: Path) -> None:
    w = Watched(config)
    w.file.load()
    config.write_text("BROKEN\n", encoding="utf-8")
    assert await w.file.reload_if_changed() == "rejected"
    config.write_text("fixed\n", encoding="utf-8")
    assert await w.file.reload_if_changed() == "applied"
    assert w.file.value == "fixed"
    assert w.results == ["rejected", "applied"]


@pytest.mark.asyncio
async def test_a_new_version_that_is_not_utf8_is_rejected(config: Path) -> None:
    w = Watched(config)
    w.file.load()
    config.write_bytes(b"\xff\xfe")
    assert await w.file.reload_if_changed() == "rejected"
    assert w.file.value == "one"


@pytest.mark.asyncio
async def test_a_deleted_file_is_unreadable_and_the_old_value_kept(
    config: Path, caplog: pytest.LogCaptureFixture
) -> None:
    w = Watched(config)
    w.file.load()
    config.unlink()
    with caplog.at_level(logging.ERROR, logger="maas_common.reload"):
        assert await w.file.reload_if_changed() == "unreadable"
        assert await w.file.reload_if_changed() == "unreadable"
    assert w.file.value == "one"
    assert w.results == ["unreadable"]  # reported once while it stays missing
    assert caplog.text.count("keeping the previous version") == 1

    config.write_text("one\n", encoding="utf-8")  # back, even with the same bytes
    assert await w.file.reload_if_changed() == "applied"
    assert w.results == ["unreadable", "applied"]
    assert w.file.value == "one"


@pytest.mark.asyncio
async def test_a_configmap_style_symlink_swap_is_picked_up(tmp_path: Path) -> None:
    # Kubernetes mounts: file -> ..data/file, ..data -> ..<timestamp>; updates swap ..data.
    mount = tmp_path / "mount"
    mount.mkdir()
    for version, text in [("..2026_1", "first\n"), ("..2026_2", "second\n")]:
        (mount / version).mkdir()
        (mount / version / "config.yaml").write_text(text, encoding="utf-8")
    (mount / "..data").symlink_to("..2026_1")
    (mount / "config.yaml").symlink_to("..data/config.yaml")

    w = Watched(mount / "config.yaml")
    assert w.file.load() == "first"
    assert await w.file.reload_if_changed() is None

    (mount / "..data_tmp").symlink_to("..2026_2")
    os.replace(mount / "..data_tmp", mount / "..data")
    assert (mount / "config.yaml").is_symlink()  # the file's own link never changed

    assert await w.file.reload_if_changed() == "applied"
    assert w.file.value == "second"
    assert w.changes == ["first", "second"]
    assert w.results == ["applied"]


@pytest.mark.asyncio
async def test_watch_polls_until_cancelled(config: Path) -> None:
    applied = asyncio.Event()
    w: WatchedFile[str] = WatchedFile(
        config,
        parse,
        name="test-config",
        interval=0,  # asyncio.sleep(0) only yields; the test waits on the event, not on time
        on_reload=lambda result: applied.set() if result == "applied" else None,
    )
    w.load()
    watcher = asyncio.create_task(w.watch())
    config.write_text("two\n", encoding="utf-8")
    async with asyncio.timeout(10):  # a safety net only: the event is set on the first poll
        await applied.wait()
    assert w.value == "two"
    watcher.cancel()
    with pytest.raises(asyncio.CancelledError):
        await watcher
