"""Compare (Chat page): one prompt to model A and model B, both streaming at once, saved as a
conversation with two branches; model B loads only if it fits (issue #18)."""
from __future__ import annotations

import json
import os
import re
import time

import pytest

from ui.compare import first_difference

B_CAST = "SmolLM2-135M-Instruct · transformers · bfloat16 (A's weights, cast)"


def test_first_difference():
    assert first_difference("Paris is nice", "Paris is nice") is None
    assert first_difference("Paris is nice", "Paris was nice") == 6
    assert first_difference("Paris", "Paris, France") == 5          # one is the other's beginning
    assert first_difference("", "x") == 0


def test_model_b_that_does_not_fit_is_refused_with_the_figures(tmp_path):
    """A checkpoint bigger than this machine's RAM (a sparse file: no disk used) is refused before
    anything loads, with what it needs and what is free; a small one passes."""
    import psutil

    from engines.manager import EngineManager, room_beside

    folder = tmp_path / "huge-llama"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "torch_dtype": "bfloat16",
        "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 4, "vocab_size": 100}))
    size = int(psutil.virtual_memory().total * 2)
    with open(folder / "model.safetensors", "wb") as f:
        f.truncate(size)
    m = EngineManager(str(tmp_path / "cache"))
    why = room_beside(m, str(folder), "transformers", {"device": "cpu", "dtype": "bfloat16"})
    assert why is not None and "huge-llama on transformers needs about" in why, why
    assert f"{size * 1.2 / 1024 ** 3:.1f} GiB" in why and "GiB of RAM available" in why, why
    # float32 on the CPU ("auto") doubles a bfloat16 checkpoint's need
    why32 = room_beside(m, str(folder), "transformers", {"device": "cpu"})
    assert f"{size * 2 * 1.2 / 1024 ** 3:.1f} GiB" in why32, why32
    with open(folder / "model.safetensors", "wb") as f:
        f.truncate(1024 * 1024)
    assert room_beside(m, str(folder), "transformers", {"device": "cpu"}) is None


@pytest.mark.slow
def test_compare_streams_both_and_saves_two_branches(app_server):
    """Model B = A's weights cast to bfloat16 (one click); a greedy prompt streams on both at once;
    the verdict compares the texts; the comparison is a conversation whose question has two replies
    (siblings), each with what produced it."""
    c = app_server.client()
    try:
        assert "on transformers (cpu, bfloat16)" in c.predict(B_CAST, api_name="/compare_load")
        job = c.submit("What is the capital of France? Answer in one word.", True, 24, 0.2, 0.9, 40, 1.0, None,
                       api_name="/compare")
        both_at_once = live_speed = False
        while not job.done():
            for o in job.outputs()[-1:]:
                a, b, verdict = o[1], o[2], o[5]
                if "both streaming" in verdict and a and b and a[-1]["content"] and b[-1]["content"]:
                    both_at_once = True
                    # each pane's line gives its speed while it streams, not only at the end
                    live_speed = live_speed or ("tok/s" in o[3] and "tok/s" in o[4] and "streaming" in o[3])
            time.sleep(0.02)
        out = job.result()
        text_a, text_b = out[1][-1]["content"][0]["text"], out[2][-1]["content"][0]["text"]
        assert "Paris" in text_a and "Paris" in text_b, (text_a, text_b)
        assert "tok/s" in out[3] and "tok/s" in out[4]
        assert ("Same text" in out[5]) or ("First difference at token" in out[5]), out[5]
        if "Same text" in out[5]:      # the replies' own token count (with the end-of-turn token)
            n = re.search(r"(\d+) tokens", out[3]).group(1)
            assert f"({n} tokens)" in out[5], (out[3], out[5])
        assert both_at_once, "both panes should show streamed text before either reply ends"
        assert live_speed, "tokens/s beside each pane while both stream"
        convs = [x for x in c.predict("", api_name="/conversations") if x["kind"] == "compare"]
        assert convs, "the comparison is saved as a conversation"
        got = c.predict(convs[0]["id"], api_name="/conversation_get")
        msgs = got["messages"]
        users = [m for m in msgs if m["role"] == "user"]
        replies = [m for m in msgs if m["role"] == "assistant"]
        assert len(users) == 1 and len(replies) == 2, msgs
        assert {r["parent"] for r in replies} == {users[0]["id"]}, "the two replies are siblings"
        dtypes = sorted(r["meta"].get("dtype", "") for r in replies)
        assert dtypes == ["bfloat16", "float32"] or dtypes == ["torch.bfloat16", "torch.float32"], dtypes
        assert all(r["meta"].get("tokens_per_s") is not None and r["meta"].get("ttft") for r in replies)
    finally:
        c.predict(api_name="/compare_unload")
    with pytest.raises(Exception, match="nothing to unload"):     # not "Model B unloaded." a second time
        c.predict(api_name="/compare_unload")


@pytest.mark.slow
def test_model_b_is_for_administrators(users_app):
    from gradio_client import Client

    bob = Client(users_app.url, auth=("bob", "pw2"), verbose=False)
    with pytest.raises(Exception, match="Only an administrator"):
        bob.predict(B_CAST, api_name="/compare_load")


@pytest.mark.slow
def test_compare_in_the_browser(browser, app_server):
    """Chromium: Chat → Compare A | B, load B from the list, one prompt, both panes stream at once,
    the verdict line appears; the Monitor lists both models with their memory."""
    from tests.ui.browser import open_page, shot

    pg = open_page(browser, app_server.url, width=1400, height=900)
    try:
        pg.get_by_role("tab", name="Compare A | B").click()
        pg.wait_for_selector("#compare-models", state="visible", timeout=20000)
        assert "not loaded" in pg.inner_text("#compare-models")
        pg.click("#compare-b-load")
        pg.wait_for_function("() => document.querySelector('#compare-models').innerText.includes('bfloat16')",
                             timeout=120000)
        pg.fill("#compare-input textarea", "Name three colours.")
        pg.press("#compare-input textarea", "Enter")
        pg.wait_for_function(
            "() => { const a = document.querySelector('#compare-a-chatbot').innerText;"
            " const b = document.querySelector('#compare-b-chatbot').innerText;"
            " const v = document.querySelector('#compare-verdict').innerText;"
            " return v.includes('both streaming') && a.split('Name three colours.')[1]?.trim().length > 0"
            " && b.split('Name three colours.')[1]?.trim().length > 0; }", timeout=120000)
        shot(pg, "compare-streaming")
        pg.wait_for_function("() => /Same text|First difference/.test(document.querySelector('#compare-verdict').innerText)",
                             timeout=180000)
        shot(pg, "compare-done")
        answer_b = pg.inner_text("#compare-b-chatbot")
        # the comparison is in the view's own list; a new one empties both panes, and opening the
        # saved one brings both sides back
        pg.wait_for_selector("#compare-list label:has-text('Name three colours')", timeout=30000)
        pg.click("#compare-new")
        pg.wait_for_function("() => !document.querySelector('#compare-b-chatbot').innerText.includes('Name three')",
                             timeout=30000)
        pg.click("#compare-list label:has-text('Name three colours')")
        pg.wait_for_function("() => document.querySelector('#compare-a-chatbot').innerText.includes('Name three')"
                             " && document.querySelector('#compare-b-chatbot').innerText.includes('Name three')",
                             timeout=30000)
        assert answer_b.split("Name three colours.")[-1].strip()[:40] in pg.inner_text("#compare-b-chatbot")
        shot(pg, "compare-reopened")
        pg.get_by_role("tab", name="Monitor").click()
        pg.wait_for_function("() => document.querySelector('#monitor-panel').innerText.includes('Model B (Compare)')",
                             timeout=30000)
        text = pg.inner_text("#monitor-panel")
        assert "Model A:" in text and "weights" in text, text
    finally:
        pg.close()
        app_server.client().predict(api_name="/compare_unload")
