"""A real browser (Debian's Chromium, driven by Playwright) against the launched app.

Screenshots of each page are kept in ``artifacts/screenshots`` (or ``$TURBOSTUDIO_ARTIFACTS``).
Skipped where Chromium or Playwright is missing; `.ci/run` installs both.
"""
from __future__ import annotations

import os
import shutil

import pytest

pytestmark = pytest.mark.browser
sync_api = pytest.importorskip("playwright.sync_api")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARTIFACTS = os.environ.get("TURBOSTUDIO_ARTIFACTS") or os.path.join(ROOT, "artifacts", "screenshots")


@pytest.fixture(scope="module")
def page(app_server):
    if not CHROMIUM:
        pytest.skip("Chromium is not installed (apt-get install chromium)")
    os.makedirs(ARTIFACTS, exist_ok=True)
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync"])
        pg = browser.new_page(viewport={"width": 1280, "height": 900})
        pg.goto(app_server.url, wait_until="load")
        yield pg
        browser.close()


def test_chat_in_the_browser_streams_an_answer(page):
    page.wait_for_selector("#chat-input textarea", timeout=30000)
    page.get_by_text("Sampling").first.click()             # greedy, so the answer is known
    temp = page.locator(".temperature input[type=number]").first
    temp.fill("0")
    temp.press("Enter")
    page.fill("#chat-input textarea", "What is the capital of France?")
    page.click("#chat-send")
    bot = page.locator("#chatbot .message-row.bot-row, #chatbot [data-testid='bot']").last
    bot.wait_for(timeout=60000)
    page.wait_for_function(
        "() => { const t = document.querySelector('#chatbot').innerText; return t.includes('tok/s'); }",
        timeout=120000)
    text = page.inner_text("#chatbot")
    assert "Paris" in text
    assert "first token" in text and "tok/s" in text
    page.screenshot(path=os.path.join(ARTIFACTS, "chat.png"), full_page=True)


def test_empty_message_shows_a_notice_and_sends_nothing(page):
    before = page.inner_text("#chatbot")
    page.fill("#chat-input textarea", "   ")
    page.click("#chat-send")
    page.wait_for_selector("text=nothing was sent", timeout=20000)
    assert page.inner_text("#chatbot") == before


def test_other_pages_open(page):
    for tab, marker in (("Engines", "#engine-status"), ("Vision", "#vision-status"), ("Monitor", "#monitor-panel")):
        page.get_by_role("tab", name=tab).click()
        page.wait_for_selector(marker, state="visible", timeout=20000)
        page.screenshot(path=os.path.join(ARTIFACTS, f"{tab.lower()}.png"), full_page=True)
    assert "SmolLM2-135M-Instruct" in page.inner_text("#engine-status") or \
        "transformers" in page.inner_text("#engine-status")
    page.get_by_role("tab", name="Chat").click()
