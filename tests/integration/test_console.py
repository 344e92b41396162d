"""The admin console at /ui, in a real browser (Playwright driving Debian's Chromium): sign in,
create a key, chat in the playground and watch the tokens stream, upload a document and find it
by search, see the usage page count the requests (issue 19, item 4). The screenshots are kept
in docs/console/ (the README shows them)."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from gateway.auth import hash_key
from tests.conftest import REPO, Gateway, start_gateway, start_mock, stop_gateway

ADMIN = "sk-console-admin"
SHOTS = REPO / "docs" / "console"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync"]  # fmt: skip


@pytest.fixture(scope="module")
def gw(model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    tmp = tmp_path_factory.mktemp("console")
    gateway = start_gateway(
        tmp, models=[{"name": "smollm2"}],
        keys=[{"id": "console-admin", "sha256": hash_key(ADMIN), "admin": True}],
        env={"RAGLINE_RAG_DIR": str(tmp / "rag"),
             "RAGLINE_DATABASE_URL": f"sqlite:///{tmp}/usage.db",
             "RAGLINE_USAGE_SPOOL_DIR": str(tmp / "spool")},
    )  # fmt: skip
    yield gateway
    stop_gateway(gateway)


@pytest.fixture(scope="module")
def page(gw: Gateway) -> Iterator[object]:
    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "chromium is needed (apt-get install chromium; .ci/run installs it)"
    SHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        context = browser.new_context(viewport={"width": 1280, "height": 900})
        page = context.new_page()
        page.set_default_timeout(60_000)
        yield page
        browser.close()


@contextmanager
def loaded(page, tab: str) -> Iterator[None]:  # type: ignore[no-untyped-def]
    """Wait, after the body, for the page's next finished load of ``tab`` (app.js counts them
    in data-loads): a tab shown before still holds the previous load's figures."""
    before = int(page.get_attribute(f"#{tab}", "data-loads") or 0)
    yield
    page.wait_for_function(
        f"Number(document.querySelector('#{tab}').dataset.loads || 0) > {before}"
    )


def test_the_console_in_a_browser(gw: Gateway, page, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    # the page and its assets come from the gateway itself, without a key
    assert httpx.get(gw.url + "/ui").status_code == 200
    assert httpx.get(gw.url + "/ui/assets/vendor/uPlot.iife.min.js").status_code == 200
    page.goto(gw.url + "/ui")
    page.fill("#login-key", "sk-wrong")
    page.click("#login-form button")
    page.wait_for_function("document.querySelector('#login-error').textContent.length > 0")
    assert "Incorrect API key" in page.inner_text("#login-error")
    page.fill("#login-key", ADMIN)
    page.click("#login-form button")
    page.wait_for_selector("#overview:not([hidden])")

    # keys: create one, shown once, and it works
    page.click("a[href='#keys']")
    page.fill("#key-name", "from-the-console")
    page.fill("#key-team", "red")
    page.click("#key-form button")
    page.wait_for_selector("#key-created:not([hidden])")
    key = page.inner_text("#key-value")
    assert key.startswith("rl-")
    page.wait_for_function(
        "document.querySelector('#keys-table').textContent.includes('from-the-console')"
    )
    listed = httpx.get(gw.base_url + "/models", headers={"Authorization": f"Bearer {key}"})
    assert "smollm2" in [m["id"] for m in listed.json()["data"]]
    # edit its policy in the console: it may no longer see smollm2, at once
    page.once("dialog", lambda d: d.accept('{"models": ["other-*"], "team": "red"}'))
    row = page.locator("#keys-table tr", has_text="from-the-console")
    row.get_by_role("button", name="Edit policy").click()
    page.wait_for_function("document.querySelector('#keys-table').textContent.includes('other-*')")
    listed = httpx.get(gw.base_url + "/models", headers={"Authorization": f"Bearer {key}"})
    assert [m["id"] for m in listed.json()["data"]] == []
    page.screenshot(path=str(SHOTS / "keys.png"))

    # playground: the answer streams in, token by token
    page.click("a[href='#playground']")
    page.wait_for_function("document.querySelector('#chat-model').options.length > 0")
    page.select_option("#chat-model", "smollm2")
    page.fill("#chat-max", "24")
    page.fill("#chat-input", "Write two sentences about lighthouses.")
    page.evaluate("""() => {
        window.__updates = [];
        new MutationObserver(() => window.__updates.push(
            document.querySelector('#chat-output').textContent.length))
          .observe(document.querySelector('#chat-output'), {childList: true, characterData: true,
                                                             subtree: true});
    }""")
    page.click("#chat-send")
    page.wait_for_selector("#chat-usage")
    updates = page.evaluate("window.__updates")
    growing = [n for n in updates if n > 0]
    assert len(set(growing)) >= 3, updates  # the text grew in steps: it streamed
    assert growing == sorted(growing)
    assert "completion tokens" in page.inner_text("#chat-usage")
    page.screenshot(path=str(SHOTS / "playground.png"))

    # vector stores: create, upload a document, find it by search
    page.click("a[href='#stores']")
    page.fill("#store-name", "console-docs")
    page.click("#store-form button")
    page.wait_for_function(
        "document.querySelector('#stores-table').textContent.includes('console-docs')"
    )
    doc = tmp_path / "keeper.md"
    doc.write_text("# Keeper\n\nThe lighthouse keeper feeds the grey cat at seven every morning.\n")
    page.set_input_files("#upload-file", str(doc))
    page.click("#upload-form button")
    page.wait_for_function(
        "document.querySelector('#upload-status').textContent.startsWith('completed')"
    )
    page.fill("#search-query", "who feeds the cat")
    page.click("#search-form button")
    page.wait_for_function(
        "document.querySelector('#search-results').textContent.includes('keeper.md')"
    )
    assert "feeds the grey cat" in page.inner_text("#search-results")
    page.screenshot(path=str(SHOTS / "stores.png"))

    # usage: the page counts the playground's request, as the API does
    with loaded(page, "usage"):
        page.click("a[href='#usage']")
    page.fill("#usage-group", "key_id,route")
    with loaded(page, "usage"):  # the table of this grouping, not the tab's first load
        page.click("#usage-form button[type=submit]")
    rows = httpx.get(gw.url + "/admin/usage", params={"group_by": "key_id,route"},
                     headers={"Authorization": f"Bearer {ADMIN}"}).json()["data"]  # fmt: skip
    chats = next(r for r in rows if r["key_id"] == "console-admin" and r["route"] == "completions")
    assert chats["requests"] >= 1
    cells = page.locator("#usage-table tbody tr", has_text="completions").first.inner_text()
    assert "console-admin" in cells and str(chats["requests"]) in cells.split()
    page.screenshot(path=str(SHOTS / "usage.png"))

    # overview: the same numbers, and the charts drawn
    with loaded(page, "overview"):  # not the totals left by the load at sign-in
        page.click("a[href='#overview']")
    page.wait_for_selector("#chart-traffic canvas")
    requests = page.inner_text("#overview-totals .card[data-metric='requests'] b")
    assert int(requests) >= chats["requests"]
    page.screenshot(path=str(SHOTS / "overview.png"))

    # safety and prompts render for the same key
    page.click("a[href='#safety']")
    page.wait_for_selector("#safety-counts tr")
    page.click("a[href='#prompts']")
    page.wait_for_function(
        "document.querySelector('#prompts-table').textContent.includes('grounded-qa')"
    )
    page.wait_for_selector("#variants-table tr")


def test_a_console_key_reads_the_admin_routes_and_changes_nothing(tmp_path: Path) -> None:
    """A key with the `console` scope signs into the console (GET /admin/*) but may not create
    keys, set budgets or reload prompts; a plain key may not even read."""
    keys = [
        {"id": "viewer", "sha256": hash_key("sk-viewer"), "policy": {"console": True}},
        {"id": "plain", "sha256": hash_key("sk-plain")},
    ]
    mock = start_mock(tmp_path, model="mock", finish="stop")
    model = {"name": "m", "backend": "openai", "upstreams": [mock.url], "served_model": "mock"}
    gateway = start_gateway(tmp_path, models=[model], keys=keys,
                            env={"RAGLINE_DATABASE_URL": f"sqlite:///{tmp_path}/u.db"})  # fmt: skip
    try:
        viewer = {"Authorization": "Bearer sk-viewer"}
        for path in ("/admin/keys", "/admin/usage", "/admin/usage/series", "/admin/budgets",
                     "/admin/prompts", "/admin/safety/findings"):  # fmt: skip
            assert httpx.get(gateway.url + path, headers=viewer).status_code == 200, path
        for method, path in (
            ("POST", "/admin/keys"),
            ("PUT", "/admin/budgets/key/plain"),
            ("POST", "/admin/prompts/reload"),
            ("DELETE", "/admin/keys/x"),
            ("PATCH", "/admin/keys/x"),
        ):
            refused = httpx.request(method, gateway.url + path, headers=viewer, json={})
            assert refused.status_code == 403, (method, path)
            assert refused.json()["error"]["code"] == "not_admin"
        plain = httpx.get(
            gateway.url + "/admin/usage", headers={"Authorization": "Bearer sk-plain"}
        )
        assert plain.status_code == 403
    finally:
        stop_gateway(gateway)
        mock.kill()
