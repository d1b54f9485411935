"""The app's OpenAI-compatible endpoint (--api) and the remote engine, against a second app."""
from __future__ import annotations

import time

import pytest

pytestmark = pytest.mark.slow          # a launched app serves every test here
pytest.importorskip("gradio_client")

from engines import models, registry  # noqa: E402
from engines.base import (ChatMessage, ChatRequest, ContextTooLong, EngineError, EngineUnavailable,  # noqa: E402
                          GenParams, ModelLoadError)
from engines.configs import RemoteConfig  # noqa: E402

from tests.conftest import AppProcess, free_port  # noqa: E402

KEY = "ann:pw"
ASK = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module", autouse=True)
def openai():
    """The openai package, imported when these tests run (~1 s), not when pytest collects them."""
    return pytest.importorskip("openai")


@pytest.fixture(scope="module")
def api_server(cache_dir, smollm2):
    app = AppProcess(["--cache-dir", cache_dir, "--api", "--auth", KEY, "--max-queue", "4"])
    yield app
    app.stop()


@pytest.fixture(scope="module")
def client(api_server, openai):
    return openai.OpenAI(base_url=api_server.url + "v1", api_key=KEY)


def test_models_lists_the_loaded_model(client):
    ms = client.models.list().data
    assert [m.id for m in ms] == ["SmolLM2-135M-Instruct"]


def test_official_client_streaming_and_not_agree(client):
    r = client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=ASK, temperature=0, max_tokens=24)
    text = r.choices[0].message.content
    assert "Paris" in text and r.usage.completion_tokens > 0 and r.usage.prompt_tokens > 10
    chunks = list(client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=ASK, temperature=0,
                                                 max_tokens=24, stream=True))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == text
    assert len(chunks) > 3
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_max_tokens_and_length_finish(client):
    r = client.chat.completions.create(model="SmolLM2-135M-Instruct", temperature=0, max_tokens=5,
                                       messages=[{"role": "user", "content": "Write a long poem about the sea."}])
    assert r.usage.completion_tokens == 5 and r.choices[0].finish_reason == "length"


@pytest.mark.parametrize("kwargs, error, fragment", [
    ({"model": "no-such-model"}, "NotFoundError", "does not exist"),
    ({"temperature": 9}, "BadRequestError", "temperature: Input should be less than or equal to 2"),
    ({"max_tokens": 10**7}, "BadRequestError", "max_tokens must be in"),
    ({"messages": [{"role": "user", "content": "word " * 30000}]}, "BadRequestError", "characters"),
    ({"messages": [{"role": "user", "content": "word " * 20000}]}, "BadRequestError", "context is 8192 tokens"),
])
def test_errors_come_back_in_openai_form(client, openai, kwargs, error, fragment):
    args = {"model": "SmolLM2-135M-Instruct", "messages": ASK, **kwargs}
    with pytest.raises(getattr(openai, error)) as e:
        client.chat.completions.create(**args)
    assert fragment in str(e.value)


def test_wrong_key_is_401(api_server, openai):
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=api_server.url + "v1", api_key="wrong").models.list()


def _remote(api_server, **kw):
    return _create(api_server.url, api_key=KEY, **kw)


def _create(url, **kw):
    return registry.create(models.resolve(url, "/tmp"), RemoteConfig(**kw))


def ask(text, params):
    return ChatRequest((ChatMessage("user", text),), params)


def test_remote_engine_streams_the_same_answer(api_server, client):
    eng = _remote(api_server)
    try:
        assert eng.info.backend == "remote" and eng.info.model == "SmolLM2-135M-Instruct"
        assert eng.info.context_length == 8192
        deltas = list(eng.stream(ask(ASK[0]["content"], GenParams(temperature=0, max_new_tokens=24))))
        text = "".join(d.text for d in deltas)
        ref = client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=ASK, temperature=0, max_tokens=24)
        assert text == ref.choices[0].message.content
        assert len(deltas) > 3 and deltas[-1].finish_reason == "stop"
    finally:
        eng.close()


def test_remote_abort_stops_and_the_server_keeps_serving(api_server, client):
    eng = _remote(api_server)
    try:
        req = ask("Write a very long story about the sea.", GenParams(temperature=0.8, max_new_tokens=2000, seed=1))
        it = eng.stream(req)
        t0 = time.perf_counter()
        last, n, aborted_at = None, 0, None
        for d in it:
            n += 1
            if n == 3:
                aborted_at = time.perf_counter()
                eng.abort(req.request_id)
            last = d
        assert last.finish_reason == "abort" and last.tokens < 2000
        assert time.perf_counter() - aborted_at < 1.0
        assert time.perf_counter() - t0 < 60
        r = client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=ASK, temperature=0, max_tokens=8)
        assert "Paris" in r.choices[0].message.content
    finally:
        eng.close()


def test_remote_errors_are_clear(api_server):
    with pytest.raises(EngineError, match="refused the API key"):
        _create(api_server.url, api_key="wrong")
    with pytest.raises(ModelLoadError, match="does not serve 'nope'"):
        _remote(api_server, remote_model="nope")
    with pytest.raises(EngineUnavailable, match="Cannot reach"):
        _create(f"http://127.0.0.1:{free_port()}")
    eng = _remote(api_server)
    try:
        with pytest.raises(ContextTooLong):
            # under the server's 16000-character limit, over its 8192-token context
            cjk = "".join(chr(0x4E00 + (i * 7919) % 20000) for i in range(15000))
            list(eng.stream(ask(cjk, GenParams(max_new_tokens=4))))
    finally:
        eng.close()


def test_app_on_a_remote_engine_chats(api_server, cache_dir, tmp_path):
    app = AppProcess(["--engine", "remote", "--model", api_server.url, "--remote-api-key", KEY,
                      "--cache-dir", str(tmp_path)])
    try:
        c = app.client()
        info = c.predict(api_name="/engine_info")
        assert info["backend"] == "remote" and "server URL" in info["reason"]
        assert "Paris" in c.predict(ASK, {"temperature": 0, "max_new_tokens": 16}, api_name="/chat")
    finally:
        app.stop()


def test_server_launcher_starts_waits_and_stops_a_real_server(cache_dir, tmp_path):
    """The launcher with a real OpenAI-compatible server (this app with --api; LMDeploy's own
    api_server is launched the same way on a GPU machine)."""
    import os
    import sys

    from engines.servers import ServerManager, api_server_command

    from tests.conftest import ROOT

    mgr = ServerManager(str(tmp_path / "logs"))
    port = free_port()
    srv = mgr.start("studio", [sys.executable, os.path.join(ROOT, "app.py"), "--api", "--server-port", str(port),
                               "--cache-dir", cache_dir], f"http://127.0.0.1:{port}", timeout=180)
    try:
        assert srv.state == "ready" and mgr.status()[0]["state"] == "ready"
        eng = _create(srv.url)
        text = "".join(d.text for d in eng.stream(ask(ASK[0]["content"], GenParams(temperature=0, max_new_tokens=12))))
        eng.close()
        assert "Paris" in text
    finally:
        mgr.stop("studio")
    assert srv.proc.poll() is not None and mgr.status()[0]["state"] == "stopped"
    with pytest.raises(EngineError, match="exited with code 3"):
        mgr.start("dies", [sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"],
                  f"http://127.0.0.1:{free_port()}", timeout=30)
    with pytest.raises(EngineError, match="did not answer"):
        mgr.start("silent", [sys.executable, "-c", "import time; time.sleep(60)"],
                  f"http://127.0.0.1:{free_port()}", timeout=2)
    cmd = api_server_command("/m", 23333, tp=2, cache_max_entry_count=0.4, quant_policy=8, model_format="awq",
                             proxy_url="http://p:8000")
    i = cmd.index("serve")
    assert cmd[i:i + 3] == ["serve", "api_server", "/m"]
    pairs = dict(zip(cmd[i + 3::2], cmd[i + 4::2]))
    assert pairs == {"--server-name": "127.0.0.1", "--server-port": "23333", "--backend": "turbomind", "--tp": "2",
                     "--cache-max-entry-count": "0.4", "--quant-policy": "8", "--model-format": "awq",
                     "--proxy-url": "http://p:8000"}


def test_starting_api_server_without_lmdeploy_says_so(app_server):
    from gradio_client.exceptions import AppError

    c = app_server.client()
    with pytest.raises(AppError) as e:
        c.predict("/nonexistent-model-dir-for-test", 23999, "turbomind", "", 1, 0.8, 0, "hf", None,
                  api_name="/start_api_server")
    assert "exited with code" in str(e.value) or "not found" in str(e.value) or "lmdeploy" in str(e.value).lower()
    assert app_server.alive()
