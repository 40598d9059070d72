"""A real headless Chromium (Debian's `chromium`), driven over the DevTools protocol.

Just what the console tests need: open a page, run JavaScript in it (type, click, read the DOM),
wait for a condition, take a screenshot. No browser download, no driver binary: the protocol is
JSON over a WebSocket, spoken with aiohttp.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import pathlib
import re
import shutil
import subprocess
import time
from typing import Any

import aiohttp

_LISTENING = re.compile(r"DevTools listening on (ws://\S+)")


def chromium_path() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        raise FileNotFoundError("no chromium: scripts/install-test-packages.sh installs it")
    return found


class Browser:
    def __init__(self, workdir: pathlib.Path, *, width: int = 1400, height: int = 900) -> None:
        self._workdir = workdir
        self._size = (width, height)
        self._process: subprocess.Popen[bytes] | None = None
        self._session: aiohttp.ClientSession | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._ids = itertools.count(1)
        self.console: list[str] = []  # the page's console messages and uncaught errors

    async def start(self) -> None:
        self._workdir.mkdir(parents=True, exist_ok=True)
        with (self._workdir / "chromium.log").open("wb") as log:  # the child keeps its own copy
            self._process = subprocess.Popen(
                [chromium_path(), "--headless=new", "--no-sandbox", "--disable-gpu",
                 "--no-first-run", "--no-default-browser-check", "--disable-extensions",
                 f"--user-data-dir={self._workdir / 'profile'}", "--remote-debugging-port=0",
                 f"--window-size={self._size[0]},{self._size[1]}", "about:blank"],
                stdout=log,
                stderr=subprocess.STDOUT,
            )  # fmt: skip
        endpoint = await self._endpoint(self._workdir / "chromium.log")
        self._session = aiohttp.ClientSession()
        http = endpoint.replace("ws://", "http://").split("/devtools/")[0]
        async with self._session.get(f"{http}/json/list") as response:
            targets = await response.json()
        page = next(t for t in targets if t.get("type") == "page")
        self._ws = await self._session.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0)
        await self.send("Page.enable")
        await self.send("Runtime.enable")

    async def _endpoint(self, log_file: pathlib.Path, timeout: float = 30.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self._process is not None
            if self._process.poll() is not None:
                raise RuntimeError(f"chromium exited: {log_file.read_text()[-2000:]}")
            found = _LISTENING.search(log_file.read_text(errors="replace"))
            if found:
                return found.group(1)
            await asyncio.sleep(0.1)
        raise TimeoutError(f"chromium did not start: {log_file.read_text()[-2000:]}")

    async def send(self, method: str, **params: Any) -> dict[str, Any]:
        assert self._ws is not None
        call_id = next(self._ids)
        await self._ws.send_json({"id": call_id, "method": method, "params": params})
        while True:
            message = await asyncio.wait_for(self._ws.receive(), 30)
            if message.type != aiohttp.WSMsgType.TEXT:
                raise RuntimeError(f"DevTools connection closed: {message.type}")
            data = json.loads(message.data)
            self._note(data)
            if data.get("id") == call_id:
                if "error" in data:
                    raise RuntimeError(f"{method}: {data['error']}")
                result: dict[str, Any] = data.get("result", {})
                return result

    def _note(self, data: dict[str, Any]) -> None:
        method = data.get("method")
        if method == "Runtime.consoleAPICalled":
            args = data["params"].get("args", [])
            self.console.append(" ".join(str(a.get("value", a.get("description"))) for a in args))
        elif method == "Runtime.exceptionThrown":
            details = data["params"]["exceptionDetails"]
            self.console.append(f"uncaught: {details.get('exception', {}).get('description')}")

    async def open(self, url: str) -> None:
        await self.send("Page.navigate", url=url)
        await self.wait_for("document.readyState === 'complete'")

    async def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page (awaited if it is a promise)."""
        answer = await self.send(
            "Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True
        )
        if "exceptionDetails" in answer:
            raise RuntimeError(f"{expression!r} threw: {answer['exceptionDetails']}")
        return answer.get("result", {}).get("value")

    async def wait_for(self, expression: str, timeout: float = 10.0) -> Any:
        """Polls until `expression` is truthy; its value. On a timeout the error says what the
        page shows in its `[role=alert]` element, and what it logged."""
        deadline = time.monotonic() + timeout
        while True:
            value = await self.evaluate(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                alert = await self.text("[role=alert]")
                raise TimeoutError(
                    f"still false after {timeout}s: {expression} (alert: {alert!r}; "
                    f"console: {self.console[-5:]})"
                )
            await asyncio.sleep(0.1)

    async def fill(self, selector: str, value: str) -> None:
        await self.evaluate(
            f"(() => {{ const e = document.querySelector({json.dumps(selector)});"
            f" e.value = {json.dumps(value)}; e.dispatchEvent(new Event('input'));"
            " return true; })()"
        )

    async def click(self, selector: str) -> None:
        await self.evaluate(f"document.querySelector({json.dumps(selector)}).click()")

    async def text(self, selector: str) -> str:
        value = await self.evaluate(
            f"(document.querySelector({json.dumps(selector)}) || {{}}).textContent || ''"
        )
        return str(value)

    async def screenshot(self, path: pathlib.Path) -> None:
        """The whole page, not only what the window shows."""
        size = (await self.send("Page.getLayoutMetrics"))["cssContentSize"]
        clip = {"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1}
        shot = await self.send(
            "Page.captureScreenshot", format="png", captureBeyondViewport=True, clip=clip
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(shot["data"]))

    async def close(self) -> None:
        if self._ws is not None:
            await self._ws.close()
        if self._session is not None:
            await self._session.close()
        if self._process is not None:
            self._process.terminate()
            try:
                self._process.wait(10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
