"""The Monitor and Engines pages in a real browser (Debian's Chromium, driven by Playwright), as a
newcomer meets them on a CPU machine: the panel says "No NVIDIA GPU" in words, what needs a GPU is
disabled with the reason next to it, a load test counts replies done of replies expected, the
header follows a model switch (by the model's name, not its folder), and a refusal is a warning
that leaves the page as it was.

Screenshots at 1400x900 go to ``artifacts/screenshots`` (or ``$TURBOSTUDIO_ARTIFACTS``):
``monitor.png``, ``engines.png`` and the states in between. Skipped where Chromium or Playwright
is missing.
"""
from __future__ import annotations

import os
import re
import time

import pytest

from tests.conftest import AppProcess
from tests.ui.browser import ARTIFACTS, open_page, shot

pytestmark = [pytest.mark.browser, pytest.mark.slow]
pytest.importorskip("playwright.sync_api")


def _gpu_machine() -> bool:
    from ui.engines import machine

    return machine().gpu_engines


cpu_only = pytest.mark.skipif("_gpu_machine()", reason="this machine runs the GPU engines")


@pytest.fixture(scope="module")
def app(cache_dir, smollm2):
    """An app of this module's own: the tests switch its model."""
    a = AppProcess(["--cache-dir", cache_dir])
    yield a
    a.stop()


@pytest.fixture
def page(browser, app):
    pg = open_page(browser, app.url, width=1400)
    pg.wait_for_selector("#header", timeout=30000)
    yield pg
    pg.close()


def open_tab(pg, name, marker):
    pg.get_by_role("tab", name=name).click()
    pg.wait_for_selector(marker, state="visible", timeout=20000)


def open_accordion(pg, title):
    pg.get_by_text(title).first.click()
    time.sleep(0.5)


def no_error_badges(pg) -> bool:
    """Gradio marks an event's outputs with a red "Error" when its function raised."""
    return pg.locator(".error, [data-testid='status-tracker'] .error").count() == 0 and \
        pg.get_by_text("Error", exact=True).count() == 0


def test_monitor_says_no_nvidia_gpu_in_words(page):
    if _gpu_machine():
        pytest.skip("this machine has a GPU")
    open_tab(page, "Monitor", "#monitor-panel")
    page.wait_for_function("() => document.querySelector('#monitor-panel').innerText.includes('RAM')",
                           timeout=20000)
    text = page.inner_text("#monitor-panel")
    assert "No NVIDIA GPU: showing CPU and RAM" in text, text
    body = page.inner_text("body")
    assert "NVML" not in body and "NVMLError" not in body
    assert re.search(r"this process \d+(\.\d)? (MiB|GiB)", text), text        # human units
    # the requests chart names both its lines (its legend is fixed from the frame drawn first, at the
    # app's start before any sample: "queued" was missing)
    page.wait_for_function("() => [...document.querySelectorAll('svg text')].some(t => t.textContent === 'queued')",
                           timeout=20000)


@cpu_only
def test_gpu_only_controls_are_disabled_with_the_reason(page):
    open_tab(page, "Monitor", "#monitor-panel")
    open_accordion(page, "Engine comparison")
    note = page.inner_text("#compare-gpu-note")
    assert "TurboMind and LMDeploy-PyTorch are not offered" in note and ("CUDA" in note or "LMDeploy" in note)
    page.click("#compare-engines input")
    options = page.locator("ul[role=listbox] li").all_inner_texts()
    page.keyboard.press("Escape")
    assert not any(o.strip() in ("turbomind", "pytorch") for o in options), options
    assert not page.locator("#compare-table").is_visible(), "no empty table (its headers would be 1 2 3)"
    assert page.get_by_text("1 2 3").count() == 0
    open_accordion(page, "KV-cache sweep")
    sweep = page.locator("#sweep-run")
    assert sweep.is_disabled() and "needs a CUDA GPU" in sweep.inner_text()
    assert "cannot run on this machine" in page.inner_text("#sweep-gpu-note")
    assert not page.locator("#sweep-table").is_visible()
    shot(page, "monitor-gpu-only")

    open_tab(page, "Engines", "#engine-status")
    open_accordion(page, "Engine options")
    assert "off on this machine" in page.inner_text("#engine-gpu-note")
    for elem in ("#engine-model-format", "#engine-quant-policy", "#engine-tp"):
        assert page.locator(f"{elem} input").first.is_disabled(), elem
        assert "TurboMind / LMDeploy only" in page.inner_text(elem), elem
    assert page.locator("#engine-cache input[type=range]").is_disabled()
    assert page.locator("#engine-session-len input, #engine-session-len textarea").first.input_value() == "", \
        "session_len is empty (the model's own), not 0"
    open_accordion(page, "Servers: lmdeploy api_server")
    assert page.locator("#start-api-server").is_disabled()
    assert "api_server needs a CUDA GPU and LMDeploy" in page.inner_text("#servers-note")
    body = page.inner_text("body")
    assert "weights_bytes" not in body and re.search(r"weights \d+ MiB", body), "human units"
    shot(page, "engines-gpu-only")


def test_load_test_progress_counts_replies(page):
    open_tab(page, "Monitor", "#monitor-panel")
    open_accordion(page, "Load test: N simulated users")
    for elem, value in (("users", "2"), ("seconds", "3"), ("tokens", "8")):
        box = page.locator(f"#loadtest-{elem} input[type=number]")
        box.fill(value)
        box.press("Enter")
    page.click("#loadtest-run")
    seen, deadline = [], time.time() + 240
    while time.time() < deadline:
        text = page.inner_text("#loadtest-result")
        seen.append(text)
        if "replies** from" in text or " replies from " in text:
            break
        time.sleep(0.25)
    progress = [t for t in seen if re.search(r"\d+ of ~?\d+ replies|\d+ replies done, \d+ under way", t)]
    assert progress, seen[:5]
    assert not any("replies so far" in t for t in seen)
    final = page.inner_text("#loadtest-result")
    m = re.search(r"(\d+) replies from 2 users", final)
    assert m and int(m.group(1)) >= 2, final
    assert "errors 0" in final and re.search(r"First token: p50 .*\(\d+ replies", final), final
    if int(m.group(1)) < 100:
        assert "too few for a p99" in final, "a p99 from a few samples is not shown as one"
    for kind in ("json", "csv"):        # the result files appear with the result, nothing drawn over them
        page.wait_for_selector(f"#loadtest-{kind} [aria-label='loadtest.{kind}']", timeout=20000)
    assert no_error_badges(page)
    page.locator("#loadtest-result").scroll_into_view_if_needed()
    page.screenshot(path=os.path.join(ARTIFACTS, "monitor-loadtest.png"))
    page.evaluate("window.scrollTo(0, 0)")
    shot(page, "monitor")


def test_a_refusal_on_the_engines_page_is_a_warning(page):
    open_tab(page, "Engines", "#engine-status")
    before = page.inner_text("#engine-status")
    open_accordion(page, "Engine options")
    page.fill("#engine-session-len textarea, #engine-session-len input", "abc")
    page.click("#engine-load")
    page.wait_for_selector("text=session_len must be a whole number", timeout=20000)
    assert "⚠" in page.inner_text("#engine-action"), "the reason stays in the page once the toast fades"
    assert page.inner_text("#engine-status") == before, "the page as it was"
    assert no_error_badges(page)
    page.fill("#engine-session-len textarea, #engine-session-len input", "")


def test_the_header_follows_a_model_switch(page, tiny_llama):
    header = page.inner_text("#header")
    assert "SmolLM2-135M-Instruct" in header
    open_tab(page, "Engines", "#engine-status")
    page.fill("#engine-model textarea, #engine-model input", tiny_llama.path)
    page.click("#engine-load")
    name = os.path.basename(tiny_llama.path)
    page.wait_for_function(f"() => document.querySelector('#header').innerText.includes({name!r})",
                           timeout=180000)
    header = page.inner_text("#header")
    assert "SmolLM2" not in header and tiny_llama.path not in header and "/" not in header, header
    assert f"Loaded {name} on transformers" in page.inner_text("#engine-action")
    status = page.inner_text("#engine-status")
    assert status.startswith(f"{name} on transformers"), status
    time.sleep(1.5)          # nothing refreshes the confirmation away
    assert f"Loaded {name}" in page.inner_text("#engine-action")
    shot(page, "engines-switched")

    page.fill("#engine-model textarea, #engine-model input", "")          # back to the built-in model
    page.click("#engine-load")
    page.wait_for_function("() => document.querySelector('#header').innerText.includes('SmolLM2-135M-Instruct')",
                           timeout=180000)
    assert "Loaded SmolLM2-135M-Instruct" in page.inner_text("#engine-action")
    page.reload()
    page.wait_for_selector("#header", timeout=30000)
    assert "SmolLM2-135M-Instruct" in page.inner_text("#header"), "and at the next page load"
    open_tab(page, "Engines", "#engine-status")
    shot(page, "engines")


def _download(pg, button: str) -> str:
    """Click a download button once: the file it downloads (Playwright fails if none comes)."""
    with pg.expect_download(timeout=20000) as d:
        pg.click(button)
    with open(d.value.path(), encoding="utf-8") as f:
        return f.read()


def test_reply_metrics_csv_downloads_at_the_first_click(page):
    """One click on "Download reply metrics (CSV)" downloads the metrics as they are at that click.
    (A DownloadButton downloads the file it held *before* its click ran: the first click gave
    nothing, each later one the file made at the click before.)"""
    import csv
    import io

    open_tab(page, "Monitor", "#monitor-panel")
    first = list(csv.DictReader(io.StringIO(_download(page, "#metrics-csv"))))
    page.get_by_role("tab", name="Chat").first.click()
    page.fill("#chat-input textarea", "Name a colour.")
    page.click("#chat-send")
    page.wait_for_selector("#chat-status >> text=generating", timeout=30000)
    page.wait_for_function("() => document.querySelector('#chatbot .message.bot') && "
                           "document.querySelector('#chatbot .message.bot').innerText.trim().length > 0",
                           timeout=120000)
    page.click("#chat-stop")
    page.wait_for_function("!document.querySelector('#chat-status').innerText.includes('generating')",
                           timeout=30000)
    open_tab(page, "Monitor", "#monitor-panel")
    rows = list(csv.DictReader(io.StringIO(_download(page, "#metrics-csv"))))
    assert len(rows) == len(first) + 1, "the file made at this click, with the reply just sent"
    assert rows[-1]["source"] == "chat" and int(rows[-1]["tokens"]) > 0, rows[-1]
    assert no_error_badges(page)
