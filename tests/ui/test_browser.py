"""A real browser (Debian's Chromium, driven by Playwright) against the launched app: chat and its
streamed answer, a refused message, every page, an image on the Vision page, the login form.

Screenshots of each page are kept in ``artifacts/screenshots`` (or ``$TURBOSTUDIO_ARTIFACTS``).
Skipped where Chromium or Playwright is missing; `.ci/run` installs both.
"""
from __future__ import annotations

import os

import pytest

from tests.conftest import ROOT
from tests.ui.browser import ask_vision, open_page, shot

pytestmark = [pytest.mark.browser, pytest.mark.slow]
pytest.importorskip("playwright.sync_api")
SHAPES = os.path.join(ROOT, "assets", "examples", "shapes.png")


@pytest.fixture(scope="module")
def page(browser, app_server):
    pg = open_page(browser, app_server.url)
    yield pg
    pg.close()


def test_chat_in_the_browser_streams_an_answer(page):
    page.wait_for_selector("#chat-input textarea", timeout=30000)
    page.get_by_text("Sampling").first.click()             # greedy, so the answer is known
    # the page opens on the built-in model's recommended settings, says where they come from, and
    # the seed box is empty (random), not a 0 under a label that says "empty = random"
    # the line is drawn after the Sampling accordion opens: wait for it, not only for its text
    page.wait_for_function("() => { const e = document.querySelector('.defaults-line'); "
                           "return !!e && e.innerText.includes('generation_config'); }", timeout=20000)
    line = page.inner_text(".defaults-line")
    assert "temperature 0.2 · top_p 0.9 from SmolLM2-135M-Instruct's generation_config.json" in line, line
    assert page.locator(".temperature input[type=number]").first.input_value() == "0.2"
    assert page.locator(".seed textarea, .seed input").first.input_value() == ""
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
    # the message box takes most of its row, and the four buttons under it stay on one row
    box, send = (page.locator(e).bounding_box() for e in ("#chat-input", "#chat-send"))
    assert box["width"] > 2.5 * send["width"], (box, send)
    assert page.locator("#chat-regenerate").bounding_box()["y"] == page.locator("#chat-clear").bounding_box()["y"]
    shot(page, "chat")


def test_empty_message_shows_a_notice_and_sends_nothing(page):
    before = page.inner_text("#chatbot")
    page.fill("#chat-input textarea", "   ")
    page.click("#chat-send")
    page.wait_for_selector("text=nothing was sent", timeout=20000)
    assert page.inner_text("#chatbot") == before


def test_a_message_over_the_limit_is_refused_with_the_reason(page):
    page.get_by_role("tab", name="Chat").click()
    before = page.inner_text("#chatbot")
    page.fill("#chat-input textarea", "x" * 131073)          # the app's default limit: 131072
    page.click("#chat-send")
    page.wait_for_selector("text=the limit is 131072", timeout=20000)
    shot(page, "chat-limit")
    after = page.inner_text("#chatbot")
    assert "x" * 50 not in after and before.strip() in after, "nothing was added to the conversation"
    # a refusal is a warning, not Gradio's Error overlay over the outputs, and the message stays
    assert page.locator(".error").count() == 0 or not page.locator(".error").first.is_visible()
    assert len(page.input_value("#chat-input textarea")) == 131073
    page.fill("#chat-input textarea", "")


def test_other_pages_open(page):
    for tab, marker in (("Engines", "#engine-status"), ("Vision", "#vision-status"), ("Quantize", "#jobs-table"),
                        ("Monitor", "#monitor-panel")):
        page.get_by_role("tab", name=tab).click()
        page.wait_for_selector(marker, state="visible", timeout=20000)
        shot(page, f"{tab.lower()}-opened")
    assert "SmolLM2-135M-Instruct" in page.inner_text("#engine-status") or \
        "transformers" in page.inner_text("#engine-status")
    page.get_by_role("tab", name="Chat").click()


def test_vision_page_takes_an_uploaded_image_and_answers(browser, vision_app):
    """Upload a picture on the Vision page, ask about it, see the streamed answer and what the image
    cost in tokens; then too many images at once are refused with the limit."""
    pg = open_page(browser, vision_app.url)
    try:
        pg.get_by_role("tab", name="Vision").click()
        pg.wait_for_selector("#vision-input textarea", state="visible", timeout=20000)
        pg.wait_for_selector("#vision-examples .gallery-item", state="visible", timeout=20000)
        widths = {round(pg.locator("#vision-examples .gallery-item").nth(i).bounding_box()["width"])
                  for i in range(pg.locator("#vision-examples .gallery-item").count())}
        assert len(widths) == 1, f"the example cards have uneven widths: {widths}"
        ask_vision(pg, "What shapes are here?")
        pg.wait_for_function(
            "() => document.querySelector('#vision-context').innerText.includes('Image cost: shapes.png')",
            timeout=120000)
        text = pg.inner_text("#vision-chatbot")
        assert "What shapes are here?" in text
        # the picture is shown in the conversation (the chatbot renders a file part once it is fetched,
        # which can trail the text by a moment on a loaded machine: wait for it, don't sample once)
        pg.wait_for_selector("#vision-chatbot img", state="attached", timeout=30000)
        pg.wait_for_function("() => document.querySelector('#vision-chatbot').innerText.includes('tok/s')",
                             timeout=120000)          # the reply has ended (its speed is shown)
        shot(pg, "vision-answer")
        status = pg.inner_text("#vision-status")
        assert "loading" not in status and "on transformers" in status, status
        pg.set_input_files("#vision-input input[type=file]", [SHAPES] * 5)      # the turn limit is 4
        pg.wait_for_function("() => document.querySelectorAll('#vision-input img').length >= 5", timeout=30000)
        pg.fill("#vision-input textarea", "Compare them")
        pg.press("#vision-input textarea", "Enter")
        pg.wait_for_selector("text=limit is 4", timeout=30000)
        assert pg.get_by_text("Error", exact=True).count() == 0, "a refusal is a warning, not Error badges"
        assert "Compare them" in pg.input_value("#vision-input textarea"), "the message stays to fix"
        shot(pg, "vision-limit")
    finally:
        pg.close()


def test_login_when_auth_is_on(browser, users_app):
    """With --auth the page is a login form: a wrong password is refused, a right one opens the app."""
    pg = open_page(browser, users_app.url)
    try:
        pg.wait_for_selector("input[type=password]", timeout=20000)
        shot(pg, "login")
        pg.fill("input[data-testid=textbox]", "bob")
        pg.fill("input[type=password]", "wrong")
        pg.get_by_role("button", name="Login").click()
        pg.wait_for_selector("text=Incorrect Credentials", timeout=20000)
        pg.fill("input[data-testid=textbox]", "bob")
        pg.fill("input[type=password]", "pw2")
        pg.get_by_role("button", name="Login").click()
        pg.wait_for_selector("#chat-input textarea", timeout=30000)
        assert pg.get_by_role("tab", name="Engines").is_visible()
        shot(pg, "after-login")
    finally:
        pg.close()


def _running(app) -> int:
    return app.client().predict(api_name="/engine_info")["running"]


def _releases(app) -> list:
    return app.client().predict(api_name="/engine_info")["abort_release_s"]


def _wait_idle(app, limit: float) -> float:
    """Seconds until the app runs no request (fails past ``limit``)."""
    import time

    t0 = time.perf_counter()
    while _running(app):
        assert time.perf_counter() - t0 < limit, f"a request still runs {limit} s later"
        time.sleep(0.05)
    return time.perf_counter() - t0


def test_stop_marks_the_reply_and_leaves_no_generating_line(browser, app_server):
    pg = open_page(browser, app_server.url)
    try:
        pg.wait_for_selector("#chat-input textarea", timeout=30000)
        pg.fill("#chat-input textarea", "Write a very long story about the sea, with many chapters.")
        pg.click("#chat-send")
        pg.wait_for_function("document.querySelector('#chatbot').innerText.split(/\\s+/).length > 30",
                             timeout=60000)
        seen = len(_releases(app_server))
        pg.click("#chat-stop")
        _wait_idle(app_server, 5)
        freed = _releases(app_server)[seen:]
        assert len(freed) == 1 and freed[0] < 1.0, f"the stopped request's place was free after {freed} s"
        pg.wait_for_selector("#chatbot >> text=stopped", timeout=10000)
        assert "generating" not in pg.inner_text("#chat-status")
        shot(pg, "chat-stopped")
        # undo takes the stopped turn away and the status stays clear
        pg.click("#chat-undo")
        pg.wait_for_function("!document.querySelector('#chatbot').innerText.includes('stopped')", timeout=10000)
        assert "generating" not in pg.inner_text("#chat-status")
        print(f"stop freed the request {freed[0]:.3f} s after the abort")
    finally:
        pg.close()


def test_stop_before_the_first_token_leaves_no_empty_reply(browser, app_server):
    pg = open_page(browser, app_server.url)
    try:
        pg.wait_for_selector("#chat-input textarea", timeout=30000)
        pg.fill("#chat-input textarea", "Summarize this: " + "the sea is wide and deep " * 600)  # a long prefill
        pg.click("#chat-send")
        pg.wait_for_selector("#chat-status >> text=generating", timeout=10000)
        pg.click("#chat-stop")
        _wait_idle(app_server, 5)
        pg.wait_for_function("!document.querySelector('#chat-status').innerText.includes('generating')",
                             timeout=10000)
        bubbles = pg.locator("#chatbot .message.bot")
        for i in range(bubbles.count()):
            assert bubbles.nth(i).inner_text().strip(), "a stopped reply left an empty bubble"
    finally:
        pg.close()


def test_closing_the_tab_aborts_its_generation(browser, app_server):
    pg = open_page(browser, app_server.url)
    pg.wait_for_selector("#chat-input textarea", timeout=30000)
    pg.fill("#chat-input textarea", "Write a very long story about the sea, with many chapters.")
    pg.click("#chat-send")
    pg.wait_for_function("document.querySelector('#chatbot').innerText.split(/\\s+/).length > 20",
                         timeout=60000)
    assert _running(app_server) == 1
    seen = len(_releases(app_server))
    pg.close()
    _wait_idle(app_server, 5)
    freed = _releases(app_server)[seen:]
    assert len(freed) == 1 and freed[0] < 1.0, f"the closed tab's request was free after {freed} s"
    print(f"closing the tab freed the request {freed[0]:.3f} s after the abort")


def test_vision_without_a_model_says_what_to_do_and_its_controls_are_off(page):
    """Offline and without --vision-model: the page says how to point it at a folder, the input and
    buttons are disabled and the examples hidden (before, sending drew red Error badges)."""
    page.get_by_role("tab", name="Vision").click()
    page.wait_for_selector("#vision-status", state="visible", timeout=20000)
    page.wait_for_function("document.querySelector('#vision-status').innerText.includes('--vision-model')",
                           timeout=20000)
    page.wait_for_function("document.querySelector('#vision-input textarea').disabled", timeout=20000)
    assert "No vision model" in (page.get_attribute("#vision-input textarea", "placeholder") or "")
    assert not page.locator("#vision-examples").is_visible()
    shot(page, "vision-no-model")
    page.get_by_role("tab", name="Chat").click()
