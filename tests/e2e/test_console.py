"""The operator console in a real headless Chromium against the real stack: sign in, live
decisions with a filter, the simulator, quota lookup, usage from the ledger (and its CSV), a
policy edit (dry run, then applied
through the watched file and in force without a restart). Screenshots go to the test's
directory, and also to $MAAS_CONSOLE_SCREENSHOTS when set (docs/images holds the committed ones).
"""

from __future__ import annotations

import asyncio
import os
import pathlib
from collections.abc import AsyncIterator, Iterator

import pytest
import pytest_asyncio

from maas_demo.stack import LocalStack, Ports
from tests.e2e.conftest import Gateway, http
from tests.support.browser import Browser

CHAT = "/llm/tiny/v1/chat/completions"
BODY = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


@pytest.fixture(scope="module")
def console_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    stack = LocalStack(tmp_path_factory.mktemp("console"), Ports.free())
    stack.start()
    yield Gateway(stack)
    stack.stop()


@pytest_asyncio.fixture
async def browser(tmp_path: pathlib.Path) -> AsyncIterator[Browser]:
    chrome = Browser(tmp_path / "chromium")
    await chrome.start()
    yield chrome
    await chrome.close()


async def shoot(browser: Browser, tmp_path: pathlib.Path, name: str) -> None:
    await browser.screenshot(tmp_path / name)
    wanted = os.environ.get("MAAS_CONSOLE_SCREENSHOTS")
    if wanted:
        await browser.screenshot(pathlib.Path(wanted) / name)


@pytest.mark.asyncio
async def test_the_console_end_to_end(
    console_gateway: Gateway, browser: Browser, tmp_path: pathlib.Path
) -> None:
    gw = console_gateway
    url = f"http://127.0.0.1:{gw.stack.ports.authz_admin}/"
    await browser.open(url)
    assert await browser.text("h1") == "MaaS gateway console"

    # a wrong key is refused, the admin key signs in
    await browser.fill("#key", "sk-demo-nope")
    await browser.click("#signin")
    await browser.wait_for("document.querySelector('#error').textContent.length > 0")
    assert "not an admin credential" in await browser.text("#error")
    await browser.fill("#key", "sk-demo-admin")
    await browser.click("#signin")
    await browser.wait_for("document.querySelector('#who').textContent.includes('demo-admin')")
    await browser.wait_for("document.querySelector('#live').textContent === 'following'")

    # live decisions: the free tier's 6th request is refused, and the row says by which limit
    answers = [await asyncio.to_thread(gw.request, CHAT, "sk-demo-free", BODY) for _ in range(6)]
    await browser.wait_for(
        "[...document.querySelectorAll('#decision-rows tr')]"
        ".some(r => r.textContent.includes('free-requests') && r.textContent.includes('429'))"
    )
    # a filter: only denied requests
    await browser.evaluate("document.querySelector('[name=allowed]').value = 'false'")
    await browser.click("#decision-filters button[type=submit]")
    await browser.wait_for("document.querySelector('#live').textContent === 'following'")
    await browser.wait_for("document.querySelectorAll('#decision-rows tr').length > 0")
    rows = await browser.evaluate(
        "[...document.querySelectorAll('#decision-rows tr')].map(r => r.textContent)"
    )
    assert rows and all("denied" in row for row in rows)
    await shoot(browser, tmp_path, "console-decisions.png")

    # the simulator: a synthetic premium user, with a token estimate
    await browser.click("nav button[data-tab=simulate]")
    await browser.fill("#simulate-form [name=user]", "newcomer")
    await browser.fill("#simulate-form [name=groups]", "tier-premium-users")
    await browser.fill("#simulate-form [name=model]", "llm/tiny")
    await browser.fill("#simulate-form [name=tokens]", "400")
    await browser.click("#simulate-form button[type=submit]")
    await browser.wait_for("!!document.querySelector('#verdict')")
    assert "allowed" in await browser.text("#verdict")
    assert "premium-tokens" in await browser.text("#simulate-result")
    assert "after estimate 49600" in await browser.text("#simulate-result")
    await shoot(browser, tmp_path, "console-simulator.png")

    # quota lookup for the refused user
    await browser.click("nav button[data-tab=quota]")
    await browser.fill("#quota-form [name=user]", "demo-free")
    await browser.click("#quota-form button[type=submit]")
    await browser.wait_for("!!document.querySelector('#quota-scope')")
    assert "tier free" in await browser.text("#quota-scope")
    assert await browser.evaluate("document.querySelectorAll('#quota-result tr.limit').length") == 2
    await shoot(browser, tmp_path, "console-quota.png")

    # the usage ledger: the free user's charged answers, by day, and their records as CSV
    await browser.click("nav button[data-tab=usage]")
    await browser.fill("#usage-form [name=user]", "demo-free")
    served = [r for r in answers if r.status == 200]
    # asked again until the ledger has them all (it is written every 0.2 s)
    await browser.wait_for(
        "document.querySelector('#usage-form button[type=submit]').click() || "
        "[...document.querySelectorAll('#usage-result tr.usage-total td')]"
        f".some(td => td.textContent === '{len(served)}')",
        timeout=15,
    )
    assert await browser.evaluate("document.querySelectorAll('#usage-result tr.usage').length") == 1
    total_tokens = sum(r.json()["usage"]["total_tokens"] for r in served)  # type: ignore[index]
    assert str(total_tokens) in await browser.text("#usage-result tr.usage-total")
    csv_text = await browser.evaluate("usageCsv()")
    assert csv_text.splitlines()[0].startswith("request_id,ts_ms,user,model")
    assert len(csv_text.splitlines()) == 1 + len(served)
    await shoot(browser, tmp_path, "console-usage.png")

    # a policy edit: a new tier, dry run first (a diff, nothing applied), then applied
    await browser.click("nav button[data-tab=policy]")
    await browser.wait_for("document.querySelector('#policy-text').value.includes('premium')")
    tiers_file = gw.stack.workdir / "config" / "tiers.yaml"
    before = tiers_file.read_text()
    gold = "- name: gold\n  level: 5\n  groups: [tier-gold-users]\n"
    await browser.evaluate(f"document.querySelector('#policy-text').value += {gold!r}")
    await browser.click("#policy-dry")
    await browser.wait_for("document.querySelector('#policy-diff').textContent.includes('gold')")
    assert "dry run" in await browser.text("#policy-diff")
    assert tiers_file.read_text() == before
    await shoot(browser, tmp_path, "console-policy.png")
    await browser.click("#policy-apply")
    await browser.wait_for("document.querySelector('#policy-diff').textContent.includes('applied')")
    await browser.wait_for("document.querySelector('#tiers-table').textContent.includes('gold')")
    assert "tier-gold-users" in tiers_file.read_text()
    # in force without a restart
    explained = http(
        f"http://127.0.0.1:{gw.stack.ports.authz_admin}/admin/v1/explain",
        body={"user": "vip", "groups": ["tier-gold-users"], "model": "llm/tiny"},
        headers={"Authorization": "Bearer sk-demo-admin"},
    ).json()
    assert isinstance(explained, dict)
    assert explained["tier"] == "gold"  # (and then no access to the model: not granted)
    assert not [line for line in browser.console if line.startswith("uncaught")]
