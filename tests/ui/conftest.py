"""The one Chromium every browser test in tests/ui shares (Playwright's sync API runs once per
thread, so the test files cannot each start their own)."""
from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="session")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api")
    from tests.ui.browser import ARGS, ARTIFACTS, CHROMIUM

    if not CHROMIUM:
        pytest.skip("Chromium is not installed (apt-get install chromium)")
    os.makedirs(ARTIFACTS, exist_ok=True)
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        yield b
        b.close()
