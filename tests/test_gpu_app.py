"""The app on TurboMind (marker ``gpu``; needs the gpu-kit's engine and ui parts on the GPU machine):
concurrent users stream at once and get their own answers; stop frees the slot."""
from __future__ import annotations

import threading
import time

import pytest

pytestmark = pytest.mark.gpu
pytest.importorskip("gradio_client")

from .conftest import AppProcess  # noqa: E402
from .test_app import poll  # noqa: E402


@pytest.fixture(scope="module")
def tm_app(tiny_llama, tmp_path_factory):
    app = AppProcess(["--model", tiny_llama.path, "--engine", "turbomind", "--cache-max-entry-count", "0.2",
                      "--session-len", "4096", "--cache-dir", str(tmp_path_factory.mktemp("c"))], timeout=300)
    yield app
    app.stop()


def test_turbomind_app_serves_concurrent_users(tm_app):
    assert tm_app.client().predict(api_name="/engine_info")["backend"] == "turbomind"
    prompts = [f"Tell me about topic number {i}." for i in range(8)]
    p = {"temperature": 0, "max_new_tokens": 64}
    solo = [tm_app.client().predict([{"role": "user", "content": q}], p, api_name="/chat") for q in prompts[:2]]
    results, firsts, ends = {}, {}, {}

    def run(i):
        job = tm_app.client().submit([{"role": "user", "content": prompts[i]}], p, api_name="/chat")
        outs, firsts[i], ends[i] = poll(job)
        results[i] = outs[-1]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
    [t.start() for t in threads]
    [t.join(300) for t in threads]
    assert len(results) == 8 and all(results.values())
    assert results[0][:20] == solo[0][:20] and results[1][:20] == solo[1][:20]
    assert max(firsts.values()) < min(ends.values()), "all eight stream at the same time"


def test_stop_frees_the_slot_on_turbomind(tm_app):
    c = tm_app.client()
    job = c.submit([{"role": "user", "content": "Go on forever."}], {"temperature": 0.8, "max_new_tokens": 3000},
                   api_name="/chat")
    while not any(job.outputs()):
        time.sleep(0.05)
    job.cancel()
    deadline = time.time() + 30
    while c.predict(api_name="/engine_info")["running"] and time.time() < deadline:
        time.sleep(0.2)
    assert c.predict(api_name="/engine_info")["running"] == 0
    t0 = time.perf_counter()
    assert c.predict([{"role": "user", "content": "Hi"}], {"temperature": 0, "max_new_tokens": 8}, api_name="/chat")
    assert time.perf_counter() - t0 < 10
