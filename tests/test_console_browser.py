"""The web console in a real browser: Playwright driving Debian's Chromium (/usr/bin/chromium, no
browser download) against a real gateway (uvicorn). Screenshots of each page land in the test's
tmp folder; with SCOPEGATE_CONSOLE_SCREENSHOTS=1 the three in docs/ are written again too."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import REPO, RunningGateway

CHROMIUM = Path("/usr/bin/chromium")
UI = "/_gateway/ui"
XSS = "<img src=x onerror=alert(1)>"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]



@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    """A fresh Chromium profile per test; every dialog (alert, confirm) is recorded and dismissed."""
    # Never a skip: the console is untested without them. scripts/test and .ci/run install both.
    try:
        from playwright import sync_api
    except ImportError:
        pytest.fail("the playwright package is missing; .venv/bin/pip install -e '.[test]'")
    if not CHROMIUM.exists():
        pytest.fail("Debian's chromium is not installed: apt-get install chromium (.ci/run does)")
    with sync_api.sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=str(CHROMIUM), headless=True, args=ARGS,
            viewport={"width": 1280, "height": 860})
        dialogs: list[str] = []
        setattr(context, "dialogs", dialogs)  # noqa: B010  (tests read browser.dialogs)

        def on_dialog(dialog: Any) -> None:
            dialogs.append(dialog.message)
            dialog.dismiss()

        def on_page(page: Any) -> None:
            page.on("dialog", on_dialog)

        context.on("page", on_page)
        for page in context.pages:  # the window a persistent context opens with
            on_page(page)
        try:
            yield context
        finally:
            context.close()


def mint(gateway: RunningGateway, *grants: str, **options: Any) -> str:
    """`gateway.mint` runs its own event loop: off this thread, where Playwright's runs."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(gateway.mint, *grants, **options).result()


def open_page(browser: Any) -> Any:
    page = browser.pages[0] if browser.pages else browser.new_page()
    page.set_default_timeout(10_000)
    return page


def sign_in(page: Any, gateway: RunningGateway, token: str) -> None:
    page.goto(f"{gateway.url}{UI}/")
    page.fill("#token", token)
    page.click("#signin")
    page.wait_for_load_state()


def shot(page: Any, folder: Path, name: str, *, full_page: bool = True) -> Path:
    folder.mkdir(exist_ok=True)
    path = folder / f"{name}.png"
    page.screenshot(path=str(path), full_page=full_page)
    return path


def test_sign_in_mint_list_revoke_watch_the_audit_and_sign_out(browser: Any, gateway: RunningGateway,
                                                                tmp_path: Path) -> None:
    shots = tmp_path / "screenshots"
    admin = mint(gateway, "token-admin@gateway", name="admin")
    page = open_page(browser)
    page.goto(f"{gateway.url}{UI}/")
    assert page.url.endswith("/signin")
    shot(page, shots, "signin")
    sign_in(page, gateway, admin)
    assert page.url.endswith(f"{UI}/tokens")
    assert admin not in page.content()
    cookies = {c["name"]: c for c in browser.cookies()}
    assert cookies["sg_console"]["httpOnly"] and cookies["sg_console"]["sameSite"] == "Strict"
    assert page.evaluate("document.cookie") == ""  # nothing a script could read
    assert page.evaluate("localStorage.length + sessionStorage.length") == 0

    # Mint with the grant builder: checked as typed, then by the server.
    page.click("text=Mint")
    page.fill("#name", "web-ci")
    page.select_option("#role0", "deployer")
    page.select_option("#kind0", "env")
    page.fill("#pattern0", "produciton")
    assert "must be one of" in page.inner_text("#hint0") and page.is_disabled("#do-mint")
    page.fill("#pattern0", "staging")
    assert page.inner_text("#hint0") == "✓ deployer@env:staging" and page.is_enabled("#do-mint")
    page.fill("#ttl", "400d")
    assert page.is_disabled("#do-mint")
    page.fill("#ttl", "2h")
    shot(page, shots, "mint")
    page.click("#do-mint")
    minted = page.input_value("#secret")
    assert minted.startswith("sgt_")
    shot(page, shots, "minted")

    # Listed, with a filter; then its page.
    page.goto(f"{gateway.url}{UI}/tokens?name=web-ci&state=active")
    assert page.locator("#tokens tbody tr").count() == 1
    shot(page, shots, "tokens")
    page.click("#tokens >> text=web-ci")
    assert page.inner_text("#token-name").startswith("web-ci")
    assert "machines:deploy" in page.inner_text("#allowances")
    shot(page, shots, "token")

    # The live audit view, filtered to denials: a refused request appears without a reload.
    audit = browser.new_page()
    audit.set_default_timeout(10_000)
    audit.goto(f"{gateway.url}{UI}/audit?decision=deny")
    audit.wait_for_selector("#live.on")
    with httpx.Client(base_url=gateway.url) as client:
        refused = client.get("/v1/apps/web-prod/machines", headers={"authorization": f"Bearer {minted}"})
    assert refused.status_code == 403
    row = audit.locator("#lines tr", has_text="/v1/apps/web-prod/machines")
    row.wait_for()
    assert "deny 403" in row.inner_text()
    audit.wait_for_selector("#chart rect.bar-deny")
    shot(audit, shots, "audit")
    row.locator("a", has_text="web-ci").click()
    audit.wait_for_selector("#token-name")
    assert audit.inner_text("#token-name").startswith("web-ci")
    audit.close()

    # Revoke: the cascade first, then done.
    page.click("#revoke")
    assert "these 1 token(s)" in page.content()
    shot(page, shots, "revoke")
    page.fill("input[name=reason]", "test over")
    page.click("#confirm-revoke")
    assert page.locator("#revoked li").count() == 1
    page.goto(f"{gateway.url}{UI}/tokens?name=web-ci")
    assert page.inner_text("#tokens tbody tr .state") == "revoked"

    # Explain, then sign out: the session is over.
    page.click("text=Explain")
    page.fill("#path", "/v1/apps/web-staging/machines")
    page.fill("input[name=grants]", "viewer@env:staging")
    page.click("#do-explain")
    assert "allowed" in page.inner_text("#result") and "viewer@env:staging allows" in page.inner_text("#reason")
    shot(page, shots, "explain")
    page.click("#signout")
    assert page.url.endswith("/signin")
    page.goto(f"{gateway.url}{UI}/tokens")
    assert page.url.endswith("/signin")
    assert browser.dialogs == []
    assert {p.name for p in shots.iterdir()} >= {"signin.png", "tokens.png", "token.png", "mint.png", "audit.png",
                                                  "explain.png", "revoke.png"}


def test_a_name_written_as_html_is_shown_as_text(browser: Any, gateway: RunningGateway, tmp_path: Path) -> None:
    admin = mint(gateway, "token-admin@gateway", name="admin")
    hostile = mint(gateway, "viewer@app:web-staging", name=XSS, subject=XSS)
    page = open_page(browser)
    page.evaluate("alert('probe')")  # the detector works: a dialog is seen
    assert browser.dialogs == ["probe"]
    browser.dialogs.clear()
    sign_in(page, gateway, admin)
    with httpx.Client(base_url=gateway.url) as client:  # an audit line naming it, and a path with markup
        client.get("/v1/apps/web-staging/machines/<b>x</b>", headers={"authorization": f"Bearer {hostile}"})
    page.goto(f"{gateway.url}{UI}/tokens")
    assert page.get_by_text(XSS, exact=True).first.is_visible()
    page.get_by_text(XSS, exact=True).first.click()
    assert page.inner_text("#token-name").startswith(XSS)
    page.goto(f"{gateway.url}{UI}/audit")
    page.locator("#lines a", has_text=XSS).first.wait_for()
    assert page.locator("#lines img").count() == 0 and page.locator("img").count() == 0
    shot(page, tmp_path / "screenshots", "xss-audit")
    assert browser.dialogs == [], "a script ran from a token's name"


def test_a_token_without_token_admin_sees_its_own_page(browser: Any, gateway: RunningGateway) -> None:
    mine = mint(gateway, "deployer@app:web-staging", name="web-ci")
    page = open_page(browser)
    sign_in(page, gateway, mine)
    assert page.inner_text("#token-name").startswith("web-ci")
    assert page.locator("text=Tokens").count() == 0 and page.locator("#lineage").count() == 0
    page.goto(f"{gateway.url}{UI}/tokens")
    assert "token-admin@gateway" in page.inner_text("main")


def test_screenshots_of_the_pages_for_the_docs(browser: Any, gateway: RunningGateway, tmp_path: Path) -> None:
    """A small but real deployment's console: the token list, a lineage, the audit view's chart."""
    admin = mint(gateway, "token-admin@gateway", name="ops-admin", subject="user:alice")
    for name, grant in (("web-ci", "deployer@app:web-staging"), ("api-ci", "deployer@app:api-staging"),
                        ("prod-deployer", "deployer@app:web-prod"), ("preview-bot", "deployer@app:web-pr-*"),
                        ("staging-viewer", "viewer@env:staging"), ("oncall", "operator@env:production")):
        mint(gateway, grant, name=name, subject=f"ci:{name}")
    parent = mint(gateway, "deployer@env:staging", name="release-pipeline", subject="ci:release", ttl_s=7 * 86400)
    with httpx.Client(base_url=gateway.url) as client:
        def attenuate(token: str, grant: str, name: str) -> str:
            answer = client.post("/_gateway/v1/token/attenuate", headers={"authorization": f"Bearer {token}"},
                                 json={"grants": [grant], "ttl": "1d", "name": name})
            assert answer.status_code == 201, answer.text
            return str(answer.json()["token"])

        web = attenuate(parent, "deployer@app:web-staging", "release/web")
        attenuate(parent, "viewer@app:api-staging", "release/api-read")
        attenuate(web, "viewer@app:web-staging", "release/web/smoke")
        jti = gateway.services.authorizer.verifier.verify(web).jti
        rotated = client.post(f"/_gateway/v1/tokens/{jti}/rotate", headers={"authorization": f"Bearer {admin}"},
                              json={"grace": "1h"})
        assert rotated.status_code == 201
        successor = rotated.json()["jti"]
    page = open_page(browser)
    sign_in(page, gateway, admin)
    audit = browser.new_page()
    audit.goto(f"{gateway.url}{UI}/audit")
    audit.wait_for_selector("#live.on")
    tokens = {"web": mint(gateway, "deployer@app:web-staging", name="web-ci-2"),
              "viewer": mint(gateway, "viewer@env:staging", name="dashboards")}
    with httpx.Client(base_url=gateway.url) as client:
        for index in range(40):
            token = tokens["web"] if index % 3 else tokens["viewer"]
            app = ("web-staging", "api-staging", "web-prod")[index % 3]
            method = "POST" if index % 4 == 0 else "GET"
            client.request(method, f"/v1/apps/{app}/machines", headers={"authorization": f"Bearer {token}"},
                           json={} if method == "POST" else None)
            time.sleep(0.15)  # spread over a few seconds: the chart's bars are seconds wide
    audit.locator("#lines tr").nth(30).wait_for()
    audit.wait_for_selector("#chart rect.bar-deny")
    folder = tmp_path / "screenshots"
    page.goto(f"{gateway.url}{UI}/tokens")
    made = {"console-tokens": shot(page, folder, "console-tokens")}
    page.goto(f"{gateway.url}{UI}/tokens/{successor}")
    assert page.locator("#lineage li").count() >= 4
    made["console-lineage"] = shot(page, folder, "console-lineage")
    made["console-audit"] = shot(audit, folder, "console-audit", full_page=False)
    assert browser.dialogs == []
    if os.environ.get("SCOPEGATE_CONSOLE_SCREENSHOTS") == "1":
        for name, path in made.items():
            shutil.copyfile(path, REPO / "docs" / f"{name}.png")
