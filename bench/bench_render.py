"""How long opening a long stored conversation takes in a real browser: Chromium (Playwright) on the
Chat page of a launched app, a conversation of N messages imported through the page, then opened
from the side list; the time is from the click to its last message drawn in the chatbot.

    python -m bench.bench_render                        # 1 000 messages, 3 openings, an app of its own
    python -m bench.bench_render --messages 5000 --url http://127.0.0.1:7860/

Prints each opening's seconds and the median. tests/ui/test_browser_conversations.py runs the same
measurement with a generous bound (the issue asks for under 1 s).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def long_export(n: int, marker: str = "LAST") -> dict:
    """A version-1 export of ``n`` messages (user and assistant in turns), the last one ending in
    ``marker`` so the page can tell when it is drawn."""
    msgs = []
    for i in range(n):
        role = "user" if i % 2 == 0 else "assistant"
        text = f"Message {i}: " + ("a question about the sea" if role == "user" else
                                   "an answer with **some markdown**, a list:\n\n- one\n- two\n\nand more words")
        msgs.append({"role": role, "content": text})
    msgs[-1]["content"] += f" {marker}"
    return {"format": "turbostudio-chat", "version": 1, "system": "", "messages": msgs}


def import_conversation(pg, n: int, marker: str = "LAST") -> str:
    """Import an ``n``-message conversation through the page's Import button; returns its title."""
    data = long_export(n, marker)
    fd, path = tempfile.mkstemp(suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f)
    pg.get_by_text("Export / import").first.click()
    pg.locator("input[type=file][accept*='.json']").first.set_input_files(path)
    pg.wait_for_function(f"document.querySelector('#chatbot').innerText.includes('{marker}')", timeout=120000)
    os.unlink(path)
    return data["messages"][0]["content"]


def time_open(pg, title: str, marker: str = "LAST") -> float:
    """Seconds from a click on the conversation in the side list to its last message drawn."""
    pg.click("#conv-new")
    pg.wait_for_function(f"!document.querySelector('#chatbot').innerText.includes('{marker}')", timeout=30000)
    item = pg.locator("#conv-list label", has_text=title[:40]).first
    item.wait_for(timeout=30000)
    t0 = time.perf_counter()
    item.click()
    pg.wait_for_function(f"document.querySelector('#chatbot').innerText.includes('{marker}')", timeout=60000,
                         polling="raf")
    return time.perf_counter() - t0


def measure(browser, url: str, n: int, rounds: int = 3) -> list[float]:
    pg = browser.new_page(viewport={"width": 1280, "height": 900})
    try:
        pg.goto(url, wait_until="load")
        pg.wait_for_selector("#chat-input textarea", timeout=60000)
        title = import_conversation(pg, n)
        return [time_open(pg, title) for _ in range(rounds)]
    finally:
        pg.close()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--messages", type=int, default=1000, help="messages in the conversation")
    ap.add_argument("--rounds", type=int, default=3, help="openings measured")
    ap.add_argument("--url", help="a running app (default: start one with --no-load on port 7971)")
    args = ap.parse_args(argv)
    from playwright.sync_api import sync_playwright

    proc, url = None, args.url
    if url is None:
        cache = tempfile.mkdtemp(prefix="bench-render-")
        url = "http://127.0.0.1:7971/"
        proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "app.py"), "--no-load", "--server-port", "7971",
                                 "--cache-dir", cache], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(240):
            try:
                urllib.request.urlopen(url + "gradio_api/info", timeout=2)
                break
            except OSError:
                time.sleep(0.5)
    try:
        chromium = shutil.which("chromium") or shutil.which("chromium-browser")
        with sync_playwright() as p:
            b = p.chromium.launch(executable_path=chromium, headless=True,
                                  args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
            times = measure(b, url, args.messages, args.rounds)
            b.close()
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(20)
    print(f"opening a conversation of {args.messages} messages: " + ", ".join(f"{t:.3f}" for t in times)
          + f" s; median {statistics.median(times):.3f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
