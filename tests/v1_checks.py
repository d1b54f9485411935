"""The /v1 checks every engine must pass (OpenAI parity, disconnects), shared by the CPU test on
Transformers (tests/ui/test_openai_api.py) and the GPU test on TurboMind (tests/gpu/test_gpu_v1.py)."""
from __future__ import annotations

import time

LONG = [{"role": "user", "content": "Write a very long story about the sea, with many chapters."}]


def engine_info(app) -> dict:
    return app.client().predict(api_name="/engine_info")


def check_parity(app, model: str) -> None:
    """Streamed and not agree; stop ends before the stop string; what the engine cannot honour is a
    400 naming the parameter; max_tokens 0 is refused."""
    import httpx
    import openai

    oai = openai.OpenAI(base_url=app.url + "v1", api_key="none", max_retries=0)
    full = oai.chat.completions.create(model=model, messages=LONG, temperature=0, max_tokens=48)
    text = full.choices[0].message.content
    assert text and full.usage.completion_tokens > 0
    streamed = "".join(c.choices[0].delta.content or "" for c in oai.chat.completions.create(
        model=model, messages=LONG, temperature=0, max_tokens=48, stream=True) if c.choices)
    assert streamed[:40] == text[:40], (streamed[:80], text[:80])
    words = [w for w in text.split() if len(w) > 2]
    if words:
        word = words[len(words) // 2]
        cut = oai.chat.completions.create(model=model, messages=LONG, temperature=0, max_tokens=48, stop=[word])
        assert word not in cut.choices[0].message.content and cut.choices[0].finish_reason == "stop"
    caps = engine_info(app)["capabilities"]
    r = httpx.post(app.url + "v1/chat/completions", timeout=60,
                   json={"messages": LONG, "max_tokens": 4, "presence_penalty": 0.5})
    if caps["penalties"]:
        assert r.status_code == 200, r.text
    else:
        assert r.status_code == 400 and r.json()["error"]["param"] == "presence_penalty", r.text
    r = httpx.post(app.url + "v1/chat/completions", timeout=60, json={"messages": LONG, "max_tokens": 0})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"


def check_disconnects(app, n: int = 50, batch: int = 10) -> list[float]:
    """``n`` streaming clients gone after their first text: nothing left running within 2 s, and
    each place free within 1 s of its abort (measured by the server). Returns those times."""
    import httpx

    seen = len(engine_info(app)["abort_release_s"])
    body = {"messages": LONG, "max_tokens": 2000, "temperature": 0.8, "stream": True}
    for _ in range(n // batch):
        clients = [httpx.Client(base_url=app.url + "v1", timeout=60) for _ in range(batch)]
        streams = [c.stream("POST", "/chat/completions", json=body) for c in clients]
        for s in streams:
            r = s.__enter__()
            assert r.status_code == 200, r.read()
            for line in r.iter_lines():
                if '"content": "' in line and '"content": ""' not in line:
                    break
        for s, c in zip(streams, clients):
            s.__exit__(None, None, None)
            c.close()
    deadline = time.time() + 2.0
    while engine_info(app)["running"] and time.time() < deadline:
        time.sleep(0.05)
    info = engine_info(app)
    assert info["running"] == 0, "a vanished client's request kept running"
    # and the engine itself let go of them (the manager's count drops at the abort; an engine that
    # kept decoding an orphan would show here, as issue #15 measured before the one road)
    deadline = time.time() + 5.0
    while engine_info(app)["engine_requests"] and time.time() < deadline:
        time.sleep(0.1)
    assert engine_info(app)["engine_requests"] == 0, "the engine still holds a vanished client's request"
    freed = info["abort_release_s"][seen:]
    assert len(freed) == n and max(freed) < 1.0, f"places free after an abort: max {max(freed):.3f} s"
    return freed
