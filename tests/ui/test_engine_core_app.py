"""The app with its engine in a process of its own (``--engine-process on``, the default for
LMDeploy's engines; here the built-in model on Transformers so it runs on CPU): it serves the Chat
page's API and ``/v1`` as before, and when the engine's process dies (killed, as TurboMind's own
aborts or the kernel's out-of-memory killer would), the app keeps serving: a stream in flight ends
with an error in OpenAI's shape instead of hanging, new requests get a clear 503 / message, the
Engines page says what happened, and a reload from there brings the model back."""
from __future__ import annotations

import json
import os
import signal
import time
import urllib.error
import urllib.request

import psutil
import pytest

from tests.conftest import AppProcess

pytestmark = pytest.mark.slow
ASK = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
GREEDY = {"temperature": 0, "max_new_tokens": 16}


@pytest.fixture(scope="module")
def core_app(cache_dir, smollm2):
    app = AppProcess(["--cache-dir", cache_dir, "--api", "--engine-process", "on"])
    yield app
    app.stop()


def engine_pid(app) -> int | None:
    kids = [p for p in psutil.Process(app.proc.pid).children() if "engines.core" in " ".join(p.cmdline())]
    return kids[0].pid if kids else None


def post(app, body: dict, timeout=60):
    req = urllib.request.Request(app.url + "v1/chat/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_the_app_serves_from_its_engine_process_and_survives_its_death(core_app):
    c = core_app.client()
    pid = engine_pid(core_app)
    assert pid is not None and pid != core_app.proc.pid
    assert "Paris" in c.predict(ASK, GREEDY, api_name="/chat")
    status, body = post(core_app, {"messages": ASK, "max_tokens": 16, "temperature": 0})
    assert status == 200 and "Paris" in json.loads(body)["choices"][0]["message"]["content"]

    # a long stream in flight when the engine's process is killed: it ends, with the reason
    req = urllib.request.Request(
        core_app.url + "v1/chat/completions",
        data=json.dumps({"messages": [{"role": "user", "content": "Write a very long story about the sea."}],
                         "max_tokens": 2000, "stream": True}).encode(),
        headers={"Content-Type": "application/json"})
    lines = []
    t0 = time.time()
    with urllib.request.urlopen(req, timeout=60) as r:
        for raw in r:
            line = raw.decode().strip()
            if line:
                lines.append(line)
            if len(lines) == 5:
                os.kill(pid, signal.SIGKILL)
    assert time.time() - t0 < 30
    errors = [json.loads(x[5:]) for x in lines if x.startswith("data: {") and '"error"' in x]
    assert errors and "engine process exited" in errors[0]["error"]["message"], lines[-3:]
    assert lines[-1] == "data: [DONE]"

    # new requests: a clear answer, not a hang or a 500
    status, body = post(core_app, {"messages": ASK, "max_tokens": 8})
    assert status == 503 and "engine process exited" in json.loads(body)["error"]["message"], body
    with pytest.raises(Exception) as e:
        c.predict(ASK, GREEDY, api_name="/chat")
    assert "engine process exited" in str(e.value)
    assert core_app.alive()
    assert "exited" in json.dumps(c.predict(api_name="/engine_info"))

    # a reload from the Engines page brings it back, in a new process
    c.predict("", "auto", "auto", "auto", "hf", 0, 0.8, None, 1, api_name="/load_model")
    assert "Paris" in c.predict(ASK, GREEDY, api_name="/chat")
    new = engine_pid(core_app)
    assert new is not None and new != pid
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
