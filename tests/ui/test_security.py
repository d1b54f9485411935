"""Shared and authenticated apps: who may load what, and a storm of cancelled streams."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

pytest.importorskip("gradio_client")
from gradio_client import Client  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402

from tests.clients import wait_released  # noqa: E402
from tests.conftest import ROOT, AppProcess  # noqa: E402

LOAD_ARGS = ("auto", "auto", "auto", "hf", 0, 0.8, None, 1)


def test_share_requires_auth_or_an_explicit_opt_out():
    r = subprocess.run([sys.executable, os.path.join(ROOT, "app.py"), "--share", "--no-load"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "--auth" in r.stderr and "public" in r.stderr


@pytest.mark.slow
def test_login_is_required(users_app):
    with pytest.raises(Exception):
        Client(users_app.url, verbose=False).predict(api_name="/engine_info")
    with pytest.raises(Exception):
        Client(users_app.url, auth=("bob", "wrong"), verbose=False)


@pytest.mark.slow
def test_users_chat_but_only_the_admin_loads_models(users_app):
    bob = Client(users_app.url, auth=("bob", "pw2"), verbose=False)
    assert "Paris" in bob.predict([{"role": "user", "content": "What is the capital of France?"}],
                                  {"temperature": 0, "max_new_tokens": 12}, api_name="/chat")
    with pytest.raises(AppError, match="Only an administrator"):
        bob.predict("", *LOAD_ARGS, api_name="/load_model")
    with pytest.raises(AppError, match="Only an administrator"):
        bob.predict(api_name="/unload_model")


@pytest.mark.slow
@pytest.mark.parametrize("path", ["/etc", "/tmp", "~/.cache/turbostudio/models/../../..", "org/model"])
def test_admin_cannot_load_outside_the_roots(users_app, path):
    ann = Client(users_app.url, auth=("ann", "pw1"), verbose=False)
    with pytest.raises(AppError, match="not allowed"):
        ann.predict(path, *LOAD_ARGS, api_name="/load_model")
    assert ann.predict(api_name="/engine_info")["model"] == "SmolLM2-135M-Instruct"


@pytest.mark.slow
def test_admin_reloads_the_builtin_model(users_app):
    ann = Client(users_app.url, auth=("ann", "pw1"), verbose=False)
    status = ann.predict("", *LOAD_ARGS, api_name="/load_model")
    assert "SmolLM2-135M-Instruct" in status


@pytest.mark.slow
def test_cancel_storm_leaves_the_engine_serving(app_server):
    """40 streams cancelled mid-way: no stuck sessions, and the next user is served at full speed."""
    c = app_server.client()
    msgs = [{"role": "user", "content": "Write a very long story about the sea."}]
    t0 = time.perf_counter()
    base = c.predict([{"role": "user", "content": "Count from one to twenty."}],
                     {"temperature": 0, "max_new_tokens": 32}, api_name="/chat")
    base_s = time.perf_counter() - t0
    jobs = [c.submit(msgs, {"temperature": 0.8, "max_new_tokens": 1000, "seed": i}, api_name="/chat")
            for i in range(40)]
    deadline = time.time() + 120
    while not all(any(j.outputs()) for j in jobs[:8]) and time.time() < deadline:
        time.sleep(0.1)
    for j in jobs:
        j.cancel()
    wait_released(c, 60)
    assert c.predict(api_name="/engine_info")["running"] == 0, "every cancelled stream must be released"
    t0 = time.perf_counter()
    again = c.predict([{"role": "user", "content": "Count from one to twenty."}],
                      {"temperature": 0, "max_new_tokens": 32}, api_name="/chat")
    assert again == base
    assert time.perf_counter() - t0 < 3 * base_s + 2
    assert app_server.alive()


@pytest.mark.slow
def test_a_full_queue_says_busy_and_the_app_keeps_serving(cache_dir, smollm2):
    import time

    from tests.conftest import AppProcess

    app = AppProcess(["--cache-dir", cache_dir, "--concurrency", "1", "--max-queue", "1"])
    try:
        c = app.client()
        p = {"temperature": 0.7, "max_new_tokens": 400}
        jobs = []
        for i in range(4):
            jobs.append(c.submit([{"role": "user", "content": f"Write a long story number {i}."}], p,
                                 api_name="/chat"))
            time.sleep(0.3)
        errors = []
        for j in jobs[1:]:
            try:
                j.result(timeout=120)
            except Exception as e:  # noqa: BLE001
                errors.append(str(e))
        jobs[0].cancel()
        # Gradio's own wording (the browser's: "This application is currently busy")
        assert any("Queue is full" in e for e in errors), errors
        assert app.alive()
        out = c.predict([{"role": "user", "content": "Hi"}], {"temperature": 0, "max_new_tokens": 4},
                        api_name="/chat")
        assert out, "served again once the queue drained"
    finally:
        app.stop()
