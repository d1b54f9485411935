"""The Vision page's branch navigation (issue #18): regenerate makes a sibling, "‹ n/m ›" marks it,
and the Chat page's row of ‹ › (``ui.chat.branch_row`` / ``move_branch`` / ``nav_view``) moves
between the versions; the next question continues from the branch shown, with that branch's images.

A unit test on a real (in-memory) conversation store, and a Chromium test on a launched app with the
tiny LLaVA and a cache folder of its own."""
from __future__ import annotations

import os
import sqlite3

import pytest

from tests.conftest import ROOT, AppProcess, wait_for_vision
from tests.ui.test_conversations import history_cache

SHAPES = os.path.join(ROOT, "assets", "examples", "shapes.png")
CHART = os.path.join(ROOT, "assets", "examples", "chart.png")


# ---------------------------------------------------------------- unit: the page's helpers on a real store
def test_moving_between_versions_continues_from_the_branch_shown_with_its_images():
    pytest.importorskip("gradio")
    from storage.conversations import ConversationStore
    from ui.chat import Conversation, move_branch, nav_view, turns_from
    from ui.vision import display, picked_turn

    store = ConversationStore(":memory:")
    try:
        c = Conversation(store, "vision", "browser:x", None)
        turns = [{"role": "user", "content": "What shapes?", "images": [SHAPES, CHART]}]
        assert c.add_user(turns) and c.cid is not None
        q = turns[0]["id"]
        replies = [store.append(c.owner, c.cid, "assistant", f"answer {k}", parent=q) for k in (1, 2, 3)]
        turns = c.reload(turns)
        assert [t["content"] for t in turns] == ["What shapes?", "answer 3"]
        assert "‹ 3/3 ›" in display(turns)[-1]["content"]
        assert nav_view(turns, None)[1].startswith("Reply 3/3 (turn 1)")

        shown = []
        focus = None
        for step in (-1, -1, +1, +1, +1):          # 2, 1, 2, 3, then round to 1
            turns, focus = move_branch(c, turns, focus, step)
            shown.append((turns[-1]["content"], nav_view(turns, focus)[1].split(" (")[0]))
            assert turns[0]["images"] == [SHAPES, CHART], "the branch keeps its question's images"
            assert store.get(c.owner, c.cid)["leaf"] == turns[-1]["id"] == focus, \
                "the store's branch shown is the one on the page"
        assert shown == [("answer 2", "Reply 2/3"), ("answer 1", "Reply 1/3"), ("answer 2", "Reply 2/3"),
                         ("answer 3", "Reply 3/3"), ("answer 1", "Reply 1/3")]
        turns, focus = move_branch(c, turns, focus, +1)
        assert turns[-1]["id"] == replies[1]

        # the next question continues from branch 2, and a reload reads it back through branch 2
        turns = turns + [{"role": "user", "content": "And the colours?"}]
        assert c.add_user(turns)
        back = turns_from(store, c.owner, c.cid)
        assert [t["content"] for t in back] == ["What shapes?", "answer 2", "And the colours?"]
        assert back[0]["images"] == [SHAPES, CHART]

        # a click picks a message by its place in the chatbot, where each image is a message of its own:
        # [image, image, question, reply 2, follow-up]
        assert [picked_turn(back, i) for i in range(6)] == [0, 0, 0, 1, 2, None]
        assert picked_turn(back, None) is None and picked_turn(back, -1) is None

        # nothing to move between (no versions, history off): the page stays as it is
        alone = [{"role": "user", "content": "hi"}]
        assert move_branch(Conversation(None, "vision", "browser:x", None), alone, None, +1) == (alone, None)
        assert nav_view(alone, None)[1] == ""
    finally:
        store.close()


# ---------------------------------------------------------------- Chromium on a launched app
BOT = "#vision-chatbot .message.bot"


@pytest.fixture(scope="module")
def app(cache_dir, smollm2, tiny_llava, tmp_path_factory):
    folder = tmp_path_factory.mktemp("vision-branches") / "cache"
    a = AppProcess(["--cache-dir", history_cache(cache_dir, folder), "--vision-model", tiny_llava])
    a.folder = str(folder)
    wait_for_vision(a, 240)         # the vision model loads in the background
    yield a
    a.stop()


def _reply_text(pg, k: int = -1) -> str:
    """The text of the k-th reply drawn, without its last line (the "‹ n/m ›" mark and details)."""
    return pg.locator(BOT).nth(k).inner_text().strip().rsplit("\n", 1)[0].strip()


def _wait_reply_done(pg, count: int) -> None:
    """``count`` replies drawn, the last one ended (its details line shows its speed) and stored."""
    pg.wait_for_function(f"(() => {{ const b = document.querySelectorAll('{BOT}'); return b.length === {count} "
                         "&& b[b.length - 1].innerText.includes('tok/s'); })()", timeout=180000)


def _label(pg, want: str, timeout: int = 120000) -> None:
    """The branch row says ``want`` (it is not drawn at all while hidden). The wait is long: after a
    regenerate the row follows the new reply, which the tiny LLaVA on a busy 2-core machine (CI
    beside other apps) takes well over 20 s to write."""
    pg.wait_for_function("(w) => { const l = document.querySelector('#vision-branch-label'); "
                         "return l !== null && l.innerText.includes(w); }", arg=want, timeout=timeout)


@pytest.mark.slow
@pytest.mark.browser
def test_regenerate_twice_move_between_three_branches_and_continue_from_one(browser, app):
    from tests.ui.browser import ask_vision, open_page, shot

    pg = open_page(browser, app.url, width=1400, height=900)
    try:
        pg.get_by_role("tab", name="Vision").click()
        pg.wait_for_selector("#vision-input textarea:not([disabled])", state="visible", timeout=60000)
        assert not pg.locator("#vision-branches").is_visible(), "no versions yet: no branch row"
        ask_vision(pg, "What shapes are here?")
        _wait_reply_done(pg, 1)
        replies = [_reply_text(pg)]
        for n in (2, 3):          # sampled (the page's default temperature): each version its own text
            pg.click("#vision-regenerate")
            _label(pg, f"Reply {n}/{n}")       # the row follows the stored reply
            _wait_reply_done(pg, 1)
            pg.wait_for_function(f"[...document.querySelectorAll('{BOT}')].pop().innerText.includes('‹ {n}/{n} ›')",
                                 timeout=20000)
            replies.append(_reply_text(pg))
        assert len(set(replies)) == 3, f"three different versions: {replies}"
        assert pg.locator(BOT).count() == 1, "a regenerated reply is a sibling, not another message"
        assert pg.locator("#vision-branches").is_visible()

        for button, want in (("#vision-branch-prev", 2), ("#vision-branch-prev", 1), ("#vision-branch-next", 2),
                             ("#vision-branch-next", 3), ("#vision-branch-next", 1), ("#vision-branch-next", 2)):
            pg.click(button)
            _label(pg, f"Reply {want}/3 (turn 1)")
            pg.wait_for_function(f"[...document.querySelectorAll('{BOT}')].pop().innerText.includes('‹ {want}/3 ›')",
                                 timeout=10000)
            assert _reply_text(pg) == replies[want - 1], f"branch {want} shows its own reply"
        assert pg.locator("#vision-chatbot img").count() >= 1, "the branch shown keeps its image"

        # branch 2 is shown: a follow-up with no new image is taken (the branch's image counts) and
        # continues from it
        pg.fill("#vision-input textarea", "What colour is the circle?")
        pg.press("#vision-input textarea", "Enter")
        _wait_reply_done(pg, 2)
        assert _reply_text(pg, 0) == replies[1]
        # the follow-up has one version: the row stays on the first reply's versions
        _label(pg, "Reply 2/3 (turn 1)")

        # a version of the follow-up too: by default the row is for the last reply with versions; a
        # click on the first reply (its place in the chatbot counts the image drawn above it) picks it
        pg.click("#vision-regenerate")
        _label(pg, "Reply 2/2 (turn 2)")
        _wait_reply_done(pg, 2)
        pg.locator(BOT).first.click()
        _label(pg, "Reply 2/3 (turn 1)")
        pg.click("#vision-branch-next")
        _label(pg, "Reply 3/3 (turn 1)")
        pg.wait_for_function(f"document.querySelectorAll('{BOT}').length === 1", timeout=10000)
        assert _reply_text(pg, 0) == replies[2], "branch 3 has no follow-up"
        pg.click("#vision-branch-prev")
        _label(pg, "Reply 2/3 (turn 1)")
        pg.wait_for_function(f"document.querySelectorAll('{BOT}').length === 2", timeout=10000)
        assert _reply_text(pg, 0) == replies[1], "back on branch 2, with its follow-up"
        shot(pg, "vision-branches")

        # the store: the follow-up's parent is branch 2's reply, and a reload opens the branch shown
        db = sqlite3.connect(f"file:{os.path.join(app.folder, 'history', 'conversations.sqlite3')}?mode=ro",
                             uri=True)
        try:
            follow = db.execute("SELECT parent FROM messages WHERE content = 'What colour is the circle?'").fetchall()
            assert len(follow) == 1, follow
            versions = [r[0] for r in db.execute(
                "SELECT id FROM messages WHERE parent = (SELECT parent FROM messages WHERE id = ?) "
                "ORDER BY created, rowid", follow[0])]
        finally:
            db.close()
        assert len(versions) == 3 and versions.index(follow[0][0]) == 1, "asked on branch 2: its reply's child"
        pg.reload()
        pg.get_by_role("tab", name="Vision").click()
        pg.wait_for_selector("#vconv-list label", timeout=60000)
        pg.locator("#vconv-list label").first.click()
        pg.wait_for_function("document.querySelector('#vision-chatbot').innerText.includes('What colour is the "
                             "circle?')", timeout=20000)
        pg.wait_for_function(f"document.querySelectorAll('{BOT}').length === 2", timeout=10000)
        assert _reply_text(pg, 0) == replies[1], "reopened on branch 2"
        pg.wait_for_selector("#vision-chatbot img", state="attached", timeout=30000)
        _label(pg, "Reply 2/2 (turn 2)")
    finally:
        pg.close()
