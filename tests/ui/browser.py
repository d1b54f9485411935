"""What the browser tests share: Debian's Chromium driven by Playwright (the ``browser`` fixture in
tests/ui/conftest.py), pages opened at a size, screenshots kept in ``artifacts/screenshots`` (or
``$TURBOSTUDIO_ARTIFACTS``)."""
from __future__ import annotations

import os
import shutil

from tests.conftest import ROOT

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
SHAPES = os.path.join(ROOT, "assets", "examples", "shapes.png")      # the Vision tests' picture
ARTIFACTS = os.environ.get("TURBOSTUDIO_ARTIFACTS") or os.path.join(ROOT, "artifacts", "screenshots")
# as the machine's probe starts it: without the background-networking flags Chromium's connections
# are refused by this machine's closed network, many at a time
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]


def open_page(browser, url, width: int = 1280, height: int = 900):
    pg = browser.new_page(viewport={"width": width, "height": height})
    pg.goto(url, wait_until="load")
    return pg


def shot(pg, name: str) -> None:
    pg.screenshot(path=os.path.join(ARTIFACTS, f"{name}.png"), full_page=True)


def ask_vision(pg, question: str, files=SHAPES) -> None:
    """On the Vision page (opened, its input enabled): attach ``files``, wait for the thumbnail, send
    ``question``."""
    pg.set_input_files("#vision-input input[type=file]", files)
    pg.wait_for_selector("#vision-input img, #vision-input .thumbnail-item", timeout=20000)
    pg.fill("#vision-input textarea", question)
    pg.press("#vision-input textarea", "Enter")
