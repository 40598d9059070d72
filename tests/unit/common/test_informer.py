"""The informer loop over a scripted transport: list, watch, relist on 410, backoff on failure."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from typing import Any

import pytest

from maas_common.errors import BackendUnavailable
from maas_common.informer import Backoff, Collection, Gone, Informer, Object


def obj(name: str, version: str, namespace: str = "ns", **spec: Any) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "namespace": namespace, "resourceVersion": version},
        "spec": spec,
    }


def listing(version: str, *items: dict[str, Any]) -> dict[str, Any]:
    return {"metadata": {"resourceVersion": version}, "items": list(items)}


def event(kind: str, body: dict[str, Any]) -> dict[str, Any]:
    return {"type": kind, "object": body}


GONE = event("ERROR", {"kind": "Status", "code": 410, "message": "too old resource version"})


class ScriptedTransport:
    """Answers list() and watch() from scripts; an exception in a script is raised there."""

    def __init__(self, lists: list[Any], watches: list[list[Any]]) -> None:
        self.lists = lists
        self.watches = watches
        self.calls: list[tuple[str, str]] = []
        self.done = asyncio.Event()
        self.open_streams = 0  # watch streams begun and not yet closed
        self.open_at_list: list[int] = []

    async def list(self, path: str) -> Object:
        self.calls.append(("list", path))
        self.open_at_list.append(self.open_streams)
        if not self.lists:
            self.done.set()
            await asyncio.Event().wait()
        answer = self.lists.pop(0)
        if isinstance(answer, BaseException):
            raise answer
        return answer  # type: ignore[no-any-return]

    async def watch(self, path: str, resource_version: str) -> AsyncGenerator[Object, None]:
        self.calls.append(("watch", resource_version))
        self.open_streams += 1
        try:
            if not self.watches:
                self.done.set()
                await asyncio.Event().wait()
            for item in self.watches.pop(0):
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            self.open_streams -= 1


class Rig:
    def __init__(self, transport: ScriptedTransport) -> None:
        self.transport = transport
        self.snapshots: list[list[tuple[str, Any]]] = []
        self.errors: list[str] = []
        self.sleeps: list[float] = []

        async def sleep(seconds: float) -> None:
            self.sleeps.append(seconds)

        self.informer = Informer(
            "things",
            "/apis/x/v1/things",
            transport,
            self.on_change,
            backoff=Backoff(first=0.5, ceiling=2.0),
            sleep=sleep,
            on_error=lambda _name, kind: self.errors.append(kind),
        )

    def on_change(self, objects: list[Object]) -> None:
        self.snapshots.append(sorted((o["metadata"]["name"], o["spec"].get("v")) for o in objects))

    async def run(self) -> None:
        task = asyncio.create_task(self.informer.run())
        await asyncio.wait_for(self.transport.done.wait(), 5)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


@pytest.mark.asyncio
async def test_lists_then_applies_every_watch_event_in_order() -> None:
    rig = Rig(
        ScriptedTransport(
            [listing("10", obj("a", "9", v=1))],
            [
                [
                    event("ADDED", obj("b", "11", v=1)),
                    event("MODIFIED", obj("a", "12", v=2)),
                    event("DELETED", obj("b", "13")),
                ]
            ],
        )
    )
    await rig.run()
    assert rig.informer.synced.is_set()
    assert rig.snapshots == [
        [("a", 1)],
        [("a", 1), ("b", 1)],
        [("a", 2), ("b", 1)],
        [("a", 2)],
    ]
    assert rig.transport.calls[:2] == [("list", "/apis/x/v1/things"), ("watch", "10")]
    assert rig.informer.collection.resource_version == "13"


@pytest.mark.asyncio
async def test_a_watch_the_server_ends_resumes_from_the_last_version_and_bookmarks_move_it() -> (
    None
):
    rig = Rig(
        ScriptedTransport(
            [listing("10")],
            [
                [event("ADDED", obj("a", "11", v=1))],
                [event("BOOKMARK", {"metadata": {"resourceVersion": "20"}})],
                [],
            ],
        )
    )
    await rig.run()
    watches = [version for call, version in rig.transport.calls if call == "watch"]
    assert watches[:3] == ["10", "11", "20"]
    assert rig.snapshots == [[], [("a", 1)]]  # the bookmark changed nothing
    assert rig.sleeps == []


@pytest.mark.asyncio
async def test_410_gone_lists_again_and_the_new_list_replaces_everything() -> None:
    rig = Rig(
        ScriptedTransport(
            [listing("10", obj("a", "9", v=1)), listing("50", obj("c", "49", v=3))],
            [[GONE], [event("ADDED", obj("d", "51", v=4))]],
        )
    )
    await rig.run()
    assert [c for c, _ in rig.transport.calls][:4] == ["list", "watch", "list", "watch"]
    assert rig.transport.calls[3] == ("watch", "50")
    assert rig.snapshots == [[("a", 1)], [("c", 3)], [("c", 3), ("d", 4)]]
    assert rig.errors == [] and rig.sleeps == []
    # the 410 arrived as an event; its stream was closed before the relist, not left to the GC
    assert rig.transport.open_at_list == [0, 0]
    assert rig.transport.open_streams == 0


@pytest.mark.asyncio
async def test_failures_back_off_doubling_to_the_ceiling_and_a_working_watch_resets_it() -> None:
    down = BackendUnavailable("kubernetes", "connect", "refused")
    rig = Rig(
        ScriptedTransport(
            [down, down, down, down, listing("10")],
            [[event("ADDED", obj("a", "11", v=1)), down], [down]],
        )
    )
    await rig.run()
    assert rig.errors == ["connect"] * 6
    # the event after the list resets the delay; the next failure, with no event, doubles it
    assert rig.sleeps == [0.5, 1.0, 2.0, 2.0, 0.5, 1.0]
    assert rig.snapshots == [[], [("a", 1)]]
    assert not any(c == "list" for c, _ in rig.transport.calls[5:])  # resumed by watching


@pytest.mark.asyncio
async def test_a_failing_on_change_is_counted_and_the_informer_lists_again() -> None:
    transport = ScriptedTransport(
        [listing("1", obj("a", "1", v=1)), listing("2", obj("a", "2", v=2))], [[]]
    )
    seen: list[int] = []
    errors: list[str] = []

    def on_change(objects: list[Object]) -> None:
        seen.append(objects[0]["spec"]["v"])
        if len(seen) == 1:
            raise RuntimeError("a bug")

    async def no_sleep(_seconds: float) -> None:
        return None

    informer = Informer(
        "x",
        "/x",
        transport,
        on_change,
        sleep=no_sleep,
        on_error=lambda _n, kind: errors.append(kind),
    )
    task = asyncio.create_task(informer.run())
    await asyncio.wait_for(transport.done.wait(), 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert seen == [1, 2] and errors == ["internal"]


def test_the_collection_refuses_what_is_not_a_watch_event() -> None:
    collection = Collection()
    collection.replace(listing("1"))
    with pytest.raises(BackendUnavailable, match="unknown event type"):
        collection.apply(event("SNAPSHOT", obj("a", "2")))
    with pytest.raises(BackendUnavailable, match="without object"):
        collection.apply({"type": "ADDED"})
    with pytest.raises(BackendUnavailable) as caught:
        collection.apply(event("ERROR", {"code": 500, "message": "etcd is sad"}))
    assert caught.value.kind == "watch_error"
    with pytest.raises(Gone):
        collection.apply(GONE)
    with pytest.raises(BackendUnavailable, match="without items"):
        collection.replace({"metadata": {}})
