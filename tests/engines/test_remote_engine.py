"""The remote engine against a small OpenAI-compatible server in this process (no model, no app):
abort by request id before the response headers came and while the reply streams, what the payload
carries (penalties and stop strings pass through; the server decides), and refusals as errors."""
from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from engines.base import ChatMessage, ChatRequest, EngineError, GenParams

pytest.importorskip("httpx")


class FakeServer:
    """``mode``: "stream" (a chunk every 20 ms), "hold" (no headers until ``release``), "busy" (429)."""

    def __init__(self):
        self.mode = "stream"
        self.bodies: list[dict] = []
        self.release = threading.Event()
        self.gone = threading.Event()          # a client went away mid-reply (a write failed)
        self.arrived = threading.Event()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def do_GET(self):
                self._json(200, {"data": [{"id": "fake", "max_model_len": 4096}]})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.bodies.append(body)
                server.arrived.set()
                if server.mode == "busy":
                    return self._json(429, {"error": {"message": "too many", "code": "busy"}})
                if server.mode == "hold":
                    server.release.wait(10)
                try:
                    self.send_response(200)
                    self.send_header("Content-Type", "text/event-stream")
                    self.send_header("Connection", "close")
                    self.end_headers()
                    for i in range(body.get("max_tokens", 16)):
                        chunk = {"choices": [{"delta": {"content": f"t{i} "}, "finish_reason": None}]}
                        self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
                        self.wfile.flush()
                        time.sleep(0.02)
                    end = {"choices": [{"delta": {}, "finish_reason": "length"}]}
                    self.wfile.write(f"data: {json.dumps(end)}\n\ndata: [DONE]\n\n".encode())
                    self.wfile.flush()
                except (BrokenPipeError, ConnectionResetError):
                    server.gone.set()

            def _json(self, code, obj):
                data = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.release.set()
        self.httpd.shutdown()


@pytest.fixture
def server():
    s = FakeServer()
    yield s
    s.close()


@pytest.fixture
def engine(server, tmp_path):
    from engines import models, registry
    from engines.configs import RemoteConfig

    eng = registry.create(models.resolve(server.url, str(tmp_path)), RemoteConfig())
    yield eng
    eng.close()


def ask(n=16, **kw):
    return ChatRequest((ChatMessage("user", "hello"),), GenParams(max_new_tokens=n, **kw))


def test_streams_and_passes_penalties_and_stop_through(engine, server):
    assert engine.info.capabilities.penalties
    deltas = list(engine.stream(ask(5, presence_penalty=0.5, frequency_penalty=-0.25, stop=("END", "\n\n"))))
    assert "".join(d.text for d in deltas) == "t0 t1 t2 t3 t4 "
    assert deltas[-1].finish_reason == "length" and deltas[-1].tokens == 5
    body = server.bodies[-1]
    assert body["presence_penalty"] == 0.5 and body["frequency_penalty"] == -0.25
    assert body["stop"] == ["END", "\n\n"]
    list(engine.stream(ask(2)))
    assert "presence_penalty" not in server.bodies[-1] and "stop" not in server.bodies[-1]
    assert engine.live_requests() == 0


def test_abort_before_the_response_headers_came(engine, server):
    server.mode = "hold"
    req = ask()
    out = {}

    def run():
        it = engine.stream(req)                 # blocks until the headers (or the abort)
        out["deltas"] = list(it)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    assert server.arrived.wait(5)
    time.sleep(0.1)
    assert t.is_alive(), "stream() must wait for the server's headers"
    t0 = time.perf_counter()
    engine.abort(req.request_id)
    t.join(1.0)
    assert not t.is_alive(), "the stream did not end within 1 s of its abort"
    assert time.perf_counter() - t0 < 1.0
    assert out["deltas"][-1].finish_reason == "abort" and out["deltas"][-1].tokens == 0
    server.release.set()                        # the headers come: the request's connection is closed
    assert server.gone.wait(5), "the server kept streaming to an aborted request"
    assert _wait(lambda: engine.live_requests() == 0)


def test_abort_while_the_reply_streams(engine, server):
    req = ask(500)
    it = engine.stream(req)
    got = []
    t0 = None
    for d in it:
        got.append(d)
        if len(got) == 3:
            t0 = time.perf_counter()
            engine.abort(req.request_id)
    assert time.perf_counter() - t0 < 1.0
    assert got[-1].finish_reason == "abort" and 0 < got[-1].tokens < 500
    assert server.gone.wait(5), "the server kept streaming to an aborted request"
    assert _wait(lambda: engine.live_requests() == 0)


def test_a_consumer_that_leaves_early_aborts(engine, server):
    it = engine.stream(ask(500))
    next(it)
    it.close()
    assert server.gone.wait(5)
    assert _wait(lambda: engine.live_requests() == 0)


def test_refusals_are_raised_from_stream(engine, server):
    server.mode = "busy"
    with pytest.raises(EngineError) as e:
        engine.stream(ask())
    assert e.value.code == "busy" and "429" in e.value.message
    assert _wait(lambda: engine.live_requests() == 0)


def test_message_tokens_is_the_byte_estimate_per_message(engine):
    msgs = [ChatMessage("user", "abcd"), ChatMessage("assistant", "héllo"), ChatMessage("user", "")]
    assert engine.message_tokens(msgs) == [2, 3, 0]
    assert engine.count_tokens(msgs) >= sum(engine.message_tokens(msgs))


def _wait(cond, timeout=2.0):
    deadline = time.time() + timeout
    while not cond() and time.time() < deadline:
        time.sleep(0.01)
    return cond()
