"""Vision export / import (issue #18): the Chat page's JSON (version 2: the tree, its metadata) with
the images inside it as data URLs, so the file imports on another machine; Markdown with every
version of a reply and the images embedded; an image that cannot be used or a file of another kind
gives a warning and loses nothing.

A unit test on real (in-memory) stores with two cache folders (fast tier); through gradio_client, a
conversation asked and regenerated on one app (the tiny LLaVA) exported and imported into a second
app with a cache folder of its own; in Chromium, one click on Export downloads the file."""
from __future__ import annotations

import base64
import io
import json
import os

import pytest

from tests.conftest import ROOT, AppProcess, wait_for_vision
from tests.ui.test_conversations import history_cache

SHAPES = os.path.join(ROOT, "assets", "examples", "shapes.png")
CHART = os.path.join(ROOT, "assets", "examples", "chart.png")
GREEDY = [24, 0, 0.9, 40, 1.0, None]          # max_new_tokens, temperature, top_p, top_k, rep, seed
SAMPLED = [24, 1.0, 0.9, 40, 1.0, "7"]


def _pixels(src) -> tuple:
    from PIL import Image

    with Image.open(src) as im:
        return im.size, im.convert("RGB").tobytes()


def _data_pixels(url: str) -> tuple:
    head, _, body = url.partition(",")
    assert head == "data:image/png;base64", head
    return _pixels(io.BytesIO(base64.b64decode(body)))


# ---------------------------------------------------------------- unit: the page's helpers on real stores
def test_export_carries_the_images_and_imports_into_another_cache_folder(tmp_path):
    pytest.importorskip("gradio")
    from storage.conversations import ConversationStore
    from ui.chat import Conversation
    from ui.vision import WrongKind, export_conversation, import_conversation, save_prepared, to_markdown

    here, there = tmp_path / "here", tmp_path / "there"
    a, b = ConversationStore(":memory:"), ConversationStore(":memory:")
    try:
        img, _ = save_prepared(str(here), SHAPES)              # as an upload is kept
        c = Conversation(a, "vision", "browser:x", None)
        turns = [{"role": "user", "content": "What shapes?", "images": [img]}]
        assert c.add_user(turns)
        q = turns[0]["id"]
        meta = {"model": "tiny-llava", "backend": "transformers", "tokens": 5, "tokens_per_s": 12.5}
        a.append(c.owner, c.cid, "assistant", "a circle", parent=q, meta={**meta, "tokens": 3})
        a.append(c.owner, c.cid, "assistant", "two squares", parent=q, meta=meta)
        turns = c.reload(turns)

        data, warnings = export_conversation(a, c.owner, c.cid, turns, str(here / "uploads"))
        assert warnings == []
        data = json.loads(json.dumps(data))               # what the file holds
        assert data["kind"] == "vision" and data["version"] == 2 and data["title"] == "What shapes?"
        user, *replies = data["tree"]
        assert _data_pixels(user["images"][0]) == _pixels(SHAPES), "the image itself, not its path"
        assert str(tmp_path) not in json.dumps(data), "no path on the server in the file"
        assert [r["content"] for r in replies] == ["a circle", "two squares"] and data["leaf"] == replies[1]["id"]
        assert all("images" not in m for m in data["messages"]), "the images once, in the tree"

        md = to_markdown(data)
        assert md.startswith("# What shapes?") and "What shapes?" in md
        assert "(version 1 of 2)" in md and "a circle" in md and "(version 2 of 2)" in md and "two squares" in md
        assert "![image 1][image-1]" in md and f"[image-1]: {user['images'][0]}" in md
        assert "3 tokens" in md and "tiny-llava on transformers" in md, "each version's details line"

        # another machine: the image is written under its cache folder, the same (content-addressed) file
        turns, cid, warnings, _ = import_conversation(b, "browser:y", data, str(there))
        assert warnings == [] and cid is not None
        path = turns[0]["images"][0]
        assert os.path.dirname(path) == str(there / "uploads") and os.path.basename(path) == os.path.basename(img)
        assert _pixels(path) == _pixels(SHAPES)
        got = b.get("browser:y", cid)
        assert got["kind"] == "vision" and [m["content"] for m in got["messages"]] == ["What shapes?", "a circle",
                                                                                       "two squares"]
        assert got["messages"][2]["meta"] == meta and got["messages"][1]["meta"]["tokens"] == 3
        assert turns[-1]["content"] == "two squares" and len(turns[-1]["siblings"]) == 2

        # a bad image: left out with a warning naming it; every message, version and metadata imported
        bad = json.loads(json.dumps(data))
        bad["tree"][0]["images"] = ["data:image/png;base64," + base64.b64encode(b"not a png").decode(), "shapes.png"]
        turns, cid2, warnings, _ = import_conversation(b, "browser:y", bad, str(there))
        assert len(warnings) == 2 and "image 1 of message 1" in warnings[0] and "not an image" in warnings[0]
        assert "image 2 of message 1" in warnings[1] and "file name" in warnings[1]
        assert all("What shapes?" in w and "left out" in w for w in warnings)
        assert [m["content"] for m in b.get("browser:y", cid2)["messages"]] == ["What shapes?", "a circle",
                                                                               "two squares"]
        assert "images" not in turns[0] and turns[-1]["stats"] == meta

        # past the images one import may hold (a multiple of --max-images): the rest left out, named
        chart, _ = save_prepared(str(here), CHART)
        two = export_conversation(a, c.owner, c.cid, [], str(here / "uploads"))[0]
        two["tree"][0]["images"].append(export_conversation(None, "-", None, turns_with(chart),
                                                            str(here / "uploads"))[0]["tree"][0]["images"][0])
        turns, _, warnings, _ = import_conversation(b, "browser:y", two, str(there), max_images=1)
        assert turns[0]["images"] == [path] and len(warnings) == 1
        assert warnings[0].startswith("image 2 of message 1: past the 1 images one import may hold")

        # another page's export, a text chat, no export at all: refused, nothing written
        before = len(b.list("browser:y"))
        for other, says in (({**data, "kind": "chat"}, "import it on the Chat page"),
                            ({**data, "kind": "compare"}, "not a Vision one"),
                            ([{"role": "user", "content": "hi"}], "no images")):
            with pytest.raises(WrongKind, match=says) as e:
                import_conversation(b, "browser:y", other, str(there))
            assert "Nothing was imported" in str(e.value)
        with pytest.raises(ValueError, match="'tree' must be a list"):
            import_conversation(b, "browser:y", {"kind": "vision", "version": 2, "tree": "x"}, str(there))
        assert len(b.list("browser:y")) == before

        # history off: the tab's turns, with the images, as the export; imported into the tab alone
        data, _ = export_conversation(None, "browser:x", None, turns_with(img), str(here / "uploads"))
        assert data["kind"] == "vision" and _data_pixels(data["tree"][0]["images"][0]) == _pixels(SHAPES)
        turns, cid, _, _ = import_conversation(None, "browser:y", data, str(there))
        assert cid is None and turns[0]["images"] == [path] and turns[1]["content"] == "a circle"

        # an image outside the page's folder is never read into an export (named, not embedded)
        data, warnings = export_conversation(None, "browser:x", None, turns_with(SHAPES), str(here / "uploads"))
        assert data["tree"][0]["images"] == ["shapes.png"] and "not one of this app's images" in warnings[0]
    finally:
        a.close()
        b.close()


def turns_with(image: str) -> list[dict]:
    return [{"role": "user", "content": "What shapes?", "images": [image]},
            {"role": "assistant", "content": "a circle", "stats": {"tokens": 3}}]


# ---------------------------------------------------------------- through the app (gradio_client)
@pytest.fixture(scope="module")
def fresh(cache_dir, smollm2, tiny_llava, tmp_path_factory):
    """A second app with the tiny LLaVA and a cache folder of its own (its own conversations file and
    uploads folder: "another machine")."""
    folder = tmp_path_factory.mktemp("vision-export") / "cache"
    app = AppProcess(["--cache-dir", history_cache(cache_dir, folder), "--vision-model", tiny_llava])
    app.folder = str(folder)
    wait_for_vision(app, 240)         # the vision model loads in the background
    yield app
    app.stop()


def _only_vision(client) -> dict:
    listed = [s for s in client.predict("", api_name="/conversations") if s["kind"] == "vision"]
    assert len(listed) == 1, listed
    return client.predict(listed[0]["id"], api_name="/conversation_get")


@pytest.mark.slow
def test_ask_regenerate_export_and_import_into_another_app(vision_app, fresh, tmp_path):
    from gradio_client import handle_file

    a = vision_app.client()
    a.predict({"text": "What shapes are here?", "files": [handle_file(SHAPES)]}, None, *GREEDY,
              api_name="/vision_send")
    a.predict(*SAMPLED, api_name="/vision_regenerate")            # a second version of the reply
    mine = _only_vision(a)
    question, first, second = mine["messages"]
    assert first["parent"] == second["parent"] == question["id"] and mine["path"][-1] == second["id"]
    assert first["content"] != second["content"], "two versions to tell apart"
    assert second["meta"]["params"]["temperature"] == 1.0 and "tokens_per_s" in second["meta"]

    path = a.predict(api_name="/export_vision")
    data = json.load(open(path, encoding="utf-8"))
    assert data["kind"] == "vision" and data["title"] == "What shapes are here?"
    assert [m["content"] for m in data["tree"]] == [question["content"], first["content"], second["content"]]
    assert _data_pixels(data["tree"][0]["images"][0]) == _pixels(question["images"][0]) == _pixels(SHAPES)
    md = open(a.predict(api_name="/export_vision_markdown"), encoding="utf-8").read()
    assert "What shapes are here?" in md and first["content"].strip() in md and second["content"].strip() in md
    assert "(version 1 of 2)" in md and "(version 2 of 2)" in md
    assert md.count("data:image/png;base64,") == 1 and "![image 1][image-1]" in md
    stranger = vision_app.client().predict(api_name="/export_vision")
    assert json.load(open(stranger, encoding="utf-8"))["tree"] == [], \
        "another session exports its own (empty) conversation, never this one"

    b = fresh.client()
    chat, context = b.predict(handle_file(path), api_name="/import_vision")
    assert context.startswith("Imported: 2 messages on the branch shown, 1 image(s).") and "⚠️" not in context
    assert ".png" in str(chat[0]["content"]) and "‹ 2/2 ›" in str(chat[-1]["content"])
    got = _only_vision(b)
    assert [m["content"] for m in got["messages"]] == [question["content"], first["content"], second["content"]]
    assert [m["meta"] for m in got["messages"]] == [question["meta"], first["meta"], second["meta"]]
    assert got["path"][-1] == got["messages"][2]["id"], "on the version shown when exported"
    img = got["messages"][0]["images"][0]
    assert os.path.dirname(img) == os.path.join(fresh.folder, "uploads") and _pixels(img) == _pixels(SHAPES)

    # a damaged image: a warning naming it, the rest imported; a chat export: refused, nothing lost
    data["tree"][0]["images"] = ["data:image/png;base64,AAAA" + "!" * 8]
    data["title"] = "damaged"
    bad = tmp_path / "damaged.json"
    bad.write_text(json.dumps(data))
    chat, context = b.predict(handle_file(str(bad)), api_name="/import_vision")
    assert "⚠️ image 1 of message 1: its base64 data is damaged" in context and "left out" in context
    assert [m["role"] for m in chat] == ["user", "assistant"], chat
    data["kind"] = "chat"
    other = tmp_path / "chat.json"
    other.write_text(json.dumps(data))
    _, context = b.predict(handle_file(str(other)), api_name="/import_vision")
    assert "not a Vision one: import it on the Chat page" in context
    not_json = tmp_path / "notes.json"
    not_json.write_text("{ not json")
    _, context = b.predict(handle_file(str(not_json)), api_name="/import_vision")
    assert "Not a Vision export" in context
    titles = sorted(s["title"] for s in b.predict("", api_name="/conversations") if s["kind"] == "vision")
    assert titles == ["What shapes are here?", "damaged"], "the refused files added nothing, removed nothing"
    shown = json.load(open(b.predict(api_name="/export_vision"), encoding="utf-8"))
    assert shown["title"] == "damaged", "the page still shows the conversation imported before"
    assert fresh.alive()


# ---------------------------------------------------------------- Chromium
BOT = "#vision-chatbot .message.bot"


def _export(pg, button: str) -> str:
    """Click an Export button once: the file it downloads (Playwright fails if none comes)."""
    with pg.expect_download(timeout=30000) as d:
        pg.click(button)
    with open(d.value.path(), encoding="utf-8") as f:
        return f.read()


@pytest.mark.slow
@pytest.mark.browser
def test_one_click_on_export_downloads_the_vision_conversation(browser, fresh):
    from tests.ui.browser import ask_vision, open_page, shot

    pg = open_page(browser, fresh.url, width=1400, height=900)
    try:
        pg.get_by_role("tab", name="Vision").click()
        pg.wait_for_selector("#vision-input textarea:not([disabled])", state="visible", timeout=60000)
        ask_vision(pg, "Which shapes?")
        pg.wait_for_function(f"[...document.querySelectorAll('{BOT}')].pop()?.innerText.includes('tok/s')",
                             timeout=180000)
        pg.click("#vision-regenerate")
        pg.wait_for_function("(document.querySelector('#vision-branch-label') || {}).innerText?.includes('Reply 2/2')",
                             timeout=180000)
        pg.wait_for_function(f"[...document.querySelectorAll('{BOT}')].pop().innerText.includes('tok/s')",
                             timeout=180000)
        pg.locator("#vision-export-box").get_by_text("Export / import").click()
        data = json.loads(_export(pg, "#vision-export"))
        assert data["kind"] == "vision" and data["title"] == "Which shapes?"
        replies = [m for m in data["tree"] if m["role"] == "assistant"]
        assert len(replies) == 2 and len({m["parent"] for m in replies}) == 1, "both versions, siblings"
        assert all("tokens_per_s" in m["meta"] for m in replies) and data["leaf"] == replies[1]["id"]
        assert _data_pixels(data["tree"][0]["images"][0]) == _pixels(SHAPES)
        md = _export(pg, "#vision-export-md")
        assert md.startswith("# Which shapes?") and "(version 1 of 2)" in md and "(version 2 of 2)" in md
        assert "[image-1]: data:image/png;base64," in md
        # the file imports back here as a new conversation, on the version shown
        pg.set_input_files("input[data-testid='Import vision chat (JSON)-upload-button']", files=[
            {"name": "shapes.json", "mimeType": "application/json", "buffer": json.dumps(data).encode()}])
        pg.wait_for_function("document.querySelectorAll('#vconv-list label').length === 2", timeout=30000)
        pg.wait_for_function("document.querySelector('#vision-context').innerText.includes('Imported')",
                             timeout=30000)
        pg.wait_for_function("document.querySelector('#vision-branch-label').innerText.includes('Reply 2/2')",
                             timeout=20000)
        pg.wait_for_selector("#vision-chatbot img", state="attached", timeout=30000)
        shot(pg, "vision-export")
    finally:
        pg.close()
