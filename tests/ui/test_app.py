"""The launched app (`python app.py`, built-in SmolLM2 on CPU) driven through gradio_client."""
from __future__ import annotations

import json
import threading
import time

import pytest

pytestmark = pytest.mark.slow          # a launched app serves every test here
pytest.importorskip("gradio_client")
from gradio_client.exceptions import AppError

from tests.clients import first_output  # noqa: E402

GREEDY = {"temperature": 0, "max_new_tokens": 24}
ASK = [{"role": "user", "content": "What is the capital of France?"}]


def poll(job, timeout=120):
    """Collect a job's streamed outputs by polling (see bench/bench_app.py on gradio_client's
    iterator); returns (outputs, time of the first output, time of the end)."""
    t0 = time.perf_counter()
    first = None
    while True:
        done = job.done()
        outs = job.outputs()
        if first is None and any(outs):
            first = time.perf_counter()
        if done:
            return job.outputs(), first, time.perf_counter()
        assert time.perf_counter() - t0 < timeout
        time.sleep(0.01)


def test_engine_info_says_what_runs(app_server):
    info = app_server.client().predict(api_name="/engine_info")
    assert info["loaded"] and info["backend"] == "transformers"
    assert info["model"] == "SmolLM2-135M-Instruct"
    assert "no CUDA" in info["reason"] or "cpu" in info["reason"]
    assert info["context_length"] == 8192


def test_chat_streams_a_real_answer(app_server):
    job = app_server.client().submit(ASK, GREEDY, api_name="/chat")
    outs, first, end = poll(job)
    assert job.result().strip() == outs[-1].strip()
    assert "Paris" in outs[-1]
    assert len([o for o in outs if o]) >= 2, "the reply must arrive in several updates"
    assert all(b.startswith(a) for a, b in zip(outs, outs[1:])), "each update extends the last"


def test_multi_turn_uses_the_history(app_server):
    msgs = [{"role": "user", "content": "My name is Ada. Remember it."},
            {"role": "assistant", "content": "Nice to meet you, Ada!"},
            {"role": "user", "content": "What is my name?"}]
    out = app_server.client().predict(msgs, GREEDY, api_name="/chat")
    assert "Ada" in out


def test_same_seed_same_answer(app_server):
    c = app_server.client()
    p = {"temperature": 1.0, "max_new_tokens": 16, "seed": 7}
    a = c.predict(ASK, p, api_name="/chat")
    b = c.predict(ASK, p, api_name="/chat")
    assert a == b


def test_two_clients_stream_at_once_and_get_their_own_answers(app_server):
    questions = {"fr": "What is the capital of France?", "jp": "What is the capital of Japan?"}
    solo = {k: app_server.client().predict([{"role": "user", "content": q}], GREEDY, api_name="/chat")
            for k, q in questions.items()}
    results, firsts, ends = {}, {}, {}

    def run(k):
        job = app_server.client().submit([{"role": "user", "content": questions[k]}],
                                         {**GREEDY, "max_new_tokens": 48}, api_name="/chat")
        outs, firsts[k], ends[k] = poll(job)
        results[k] = outs[-1]

    threads = [threading.Thread(target=run, args=(k,)) for k in questions]
    [t.start() for t in threads]
    [t.join(180) for t in threads]
    assert "Paris" in results["fr"] and "Tokyo" in results["jp"]
    for k in questions:
        assert results[k].startswith(solo[k][:20])
    assert max(firsts.values()) < min(ends.values()), "both must stream at the same time"


@pytest.mark.parametrize("params, fragment", [
    ({"temperature": 5}, "temperature must be in [0.0, 2.0]"),
    ({"top_p": 0}, "top_p must be in (0, 1]"),
    ({"max_new_tokens": 0}, "max_new_tokens must be in"),
    ({"max_new_tokens": 10**6}, "max_new_tokens must be in"),
    ({"top_k": -1}, "top_k must be in [0, 1000]"),
    ({"repetition_penalty": 9}, "repetition_penalty must be in [0.5, 2.0]"),
    ({"seed": "abc"}, "seed must be a number"),
    ({"bogus": 1}, "unknown sampling parameter"),
])
def test_out_of_range_parameters_are_refused_with_the_range(app_server, params, fragment):
    with pytest.raises(AppError) as e:
        app_server.client().predict(ASK, params, api_name="/chat")
    assert fragment in str(e.value)


@pytest.mark.parametrize("messages, fragment", [
    ([], "non-empty list"),
    ([{"role": "user", "content": "   "}], "The last message is empty"),
    ([{"role": "robot", "content": "hi"}], "role must be"),
    ("not json", "JSON list"),
])
def test_bad_messages_are_refused(app_server, messages, fragment):
    with pytest.raises(AppError) as e:
        app_server.client().predict(messages, {}, api_name="/chat")
    assert fragment in str(e.value)


def test_ui_send_with_empty_message_sends_nothing(app_server):
    c = app_server.client()
    out = c.predict("   ", "", 32, 0, 0.9, 40, 1.0, None, api_name="/send")
    box, chat, status = out
    assert chat == [], "an empty message must not start a turn"


def test_ui_send_streams_into_the_chatbot(app_server):
    c = app_server.client()
    box, chat, status = c.predict("What is the capital of France?", "", 24, 0, 0.9, 40, 1.0, None,
                                  api_name="/send")
    assert [m["role"] for m in chat] == ["user", "assistant"]
    reply = chat[1]["content"][0]["text"] if isinstance(chat[1]["content"], list) else chat[1]["content"]
    assert "Paris" in reply
    assert "tok/s" in reply and "first token" in reply, "each reply shows its speed"


def test_ui_out_of_range_slider_value_is_refused(app_server):
    """Past the slider's range Gradio itself refuses (the page's slider cannot go there); a value
    the slider allows but the app does not is refused by the page, which stays as it was."""
    c = app_server.client()
    with pytest.raises(AppError, match="4096"):
        c.predict("hi", "", 10**6, 0, 0.9, 40, 1.0, "", api_name="/send")
    box, chat, status = c.predict("hi", "", 16, 0, 0.9, 40, 1.0, "seven", api_name="/send")
    assert box == "hi" and chat == []
    assert "seed must be a whole number" in status, "the page says why"


def test_overlong_history_drops_oldest_turns(app_server):
    """A conversation longer than the context is trimmed from the front, not a crash."""
    long = "lorem ipsum dolor sit amet " * 400   # ~2400 tokens a turn
    msgs = []
    for i in range(4):
        msgs += [{"role": "user", "content": f"{i}: {long}"}, {"role": "assistant", "content": "ok"}]
    msgs.append({"role": "user", "content": "Say hello."})
    out = app_server.client().predict(msgs, {"temperature": 0, "max_new_tokens": 8}, api_name="/chat")
    assert isinstance(out, str) and out


def test_single_message_longer_than_context_is_a_clear_error(app_server):
    huge = "word " * 20000
    with pytest.raises(AppError) as e:
        app_server.client().predict([{"role": "user", "content": huge}], {}, api_name="/chat")
    assert "characters" in str(e.value) or "context" in str(e.value)


@pytest.mark.parametrize("model, fragment", [
    ("/nonexistent/model/path", "not found"),
    ("__EMPTY_DIR__", "no config.json"),
    ("__BAD_ARCH__", "cannot run this model"),
])
def test_bad_model_load_keeps_the_old_model_serving(app_server, tmp_path, model, fragment):
    if model == "__EMPTY_DIR__":
        model = str(tmp_path)
    elif model == "__BAD_ARCH__":
        (tmp_path / "config.json").write_text(json.dumps({"architectures": ["FooForCausalLM"],
                                                          "model_type": "foo-unknown"}))
        model = str(tmp_path)
    c = app_server.client()
    with pytest.raises(AppError) as e:
        c.predict(model, "auto", "auto", "auto", "hf", 0, 0.8, None, 1, api_name="/load_model")
    assert fragment in str(e.value)
    assert "Paris" in c.predict(ASK, GREEDY, api_name="/chat")
    assert c.predict(api_name="/engine_info")["model"] == "SmolLM2-135M-Instruct"


def test_gpu_engine_on_cpu_machine_is_a_clear_error(app_server):
    c = app_server.client()
    with pytest.raises(AppError) as e:
        c.predict("", "turbomind", "auto", "auto", "hf", 0, 0.8, None, 1, api_name="/load_model")
    assert "CUDA" in str(e.value) or "LMDeploy" in str(e.value)
    assert app_server.alive()
    assert "Paris" in c.predict(ASK, GREEDY, api_name="/chat")


def test_stop_aborts_generation_and_frees_the_slot(app_server):
    c = app_server.client()
    job = c.submit([{"role": "user", "content": "Write a very long story about the sea."}],
                   {"temperature": 0.8, "max_new_tokens": 2000, "seed": 3}, api_name="/chat")
    first_output(job, 60)
    job.cancel()
    time.sleep(1.0)
    info = c.predict(api_name="/engine_info")
    t1 = time.perf_counter()
    assert "Paris" in c.predict(ASK, GREEDY, api_name="/chat")
    assert time.perf_counter() - t1 < 30
    assert info["loaded"]


def test_export_then_import_a_chat(app_server, tmp_path):
    from gradio_client import handle_file

    c = app_server.client()
    c.predict("What is the capital of France?", "Be brief.", 16, 0, 0.9, 40, 1.0, None, api_name="/send")
    path = c.predict("Be brief.", api_name="/export_chat")
    data = json.load(open(path))
    assert data["format"] == "turbostudio-chat" and data["system"] == "Be brief."
    assert [m["role"] for m in data["messages"]] == ["user", "assistant"]
    assert "tokens_per_s" in data["messages"][1]["stats"]
    other = app_server.client()          # a new browser session imports it
    chat, system = other.predict(handle_file(path), api_name="/import_chat")
    assert system == "Be brief." and [m["role"] for m in chat] == ["user", "assistant"]
    bad = tmp_path / "bad.json"
    bad.write_text('{"messages": [{"role": "wizard", "content": 1}]}')
    with pytest.raises(AppError, match="Not a chat export"):
        other.predict(handle_file(str(bad)), api_name="/import_chat")
    vision = tmp_path / "vision.json"        # a Vision page's export: its images have no place here
    vision.write_text(json.dumps({**data, "kind": "vision"}))
    with pytest.raises(AppError, match="import it on the Vision page"):
        other.predict(handle_file(str(vision)), api_name="/import_chat")


def test_regenerate_undo_and_edit_last(app_server):
    c = app_server.client()
    _, chat, _ = c.predict("What is the capital of France?", "", 12, 0, 0.9, 40, 1.0, None, api_name="/send")
    first = str(chat[-1]["content"])
    _, chat, _ = c.predict("", 12, 0, 0.9, 40, 1.0, None, api_name="/regenerate")
    assert [m["role"] for m in chat] == ["user", "assistant"], "regenerate replaces the reply, not appends"
    assert str(chat[-1]["content"]).split("<sub>")[0] == first.split("<sub>")[0], "greedy: same reply again"
    box, chat, status = c.predict(api_name="/edit_last")
    assert box == "What is the capital of France?" and chat == [] and status == ""
    c.predict("Hello there", "", 8, 0, 0.9, 40, 1.0, None, api_name="/send")
    chat, status = c.predict(api_name="/undo")
    assert chat == []
