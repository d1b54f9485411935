"""The web layer alone: the app's real server path (Gradio queue, ``/chat``, the async relay, the
engine manager) in front of a *synthetic* engine that makes tokens at a GPU engine's pace, against
that engine alone, side by side in one run.

    python -m bench.bench_web --users 1,16,64 --step-ms 3 --new-tokens 256

Not an engine benchmark and not a stand-in for one: it answers one question the GPU runs cannot
separate, namely how much of the gap between the app and an in-process engine (bench_app.py on the
H100: 0.63 at 16 users, 0.26 at 64) the server costs by itself. The synthetic engine is a
continuous-batching loop: every ``--step-ms`` (a decode step, GIL released like a GPU kernel) it hands
one token to every running request through that request's queue, per-token Python work like
LMDeploy's pipeline does. It runs in the app's process, where TurboMind would. Clients are plain HTTP
(bench_app.py's load generator, several processes). Figures: the ratio of aggregate tokens/s and the
first-token latency of the app against the engine driven by threads in this process.
"""
from __future__ import annotations

import argparse
import json
import os
import queue
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from engines.base import (Capabilities, ChatMessage, ChatRequest, Delta, EngineError, EngineInfo,  # noqa: E402
                          GenParams, SchedulerView)


class SyntheticEngine:
    """Tokens at a fixed step, for every running request at once (see the module's docstring). It
    keeps the engine contract (``engines.base.Engine``): requests by id, abort in any state."""

    def __init__(self, step_ms: float = 3.0, max_batch: int = 256):
        self.step = step_ms / 1000
        self.info = EngineInfo(backend="synthetic", model="synthetic", device="cpu", context_length=32768,
                               max_batch=max_batch, reason="bench/bench_web.py",
                               capabilities=Capabilities(penalties=False, seed=False))
        self._active: dict[str, tuple[queue.Queue, list]] = {}
        self._lock = threading.Lock()
        self._closed = threading.Event()
        threading.Thread(target=self._loop, daemon=True, name="synthetic-engine").start()

    def _loop(self):
        while not self._closed.is_set():
            time.sleep(self.step)                       # the "GPU" step: no GIL held
            with self._lock:
                rows = list(self._active.values())
            for q, left in rows:
                if left[0] > 0:
                    left[0] -= 1
                    q.put(" tok")

    def count_tokens(self, messages) -> int:
        return sum(self.message_tokens(messages)) + 4 * len(messages)

    def message_tokens(self, messages) -> list[int]:
        return [len(m.content.split()) for m in messages]

    def stream(self, request: ChatRequest):
        q: queue.Queue = queue.Queue()
        n = request.params.max_new_tokens
        with self._lock:
            if request.request_id in self._active:
                raise EngineError(f"A request with id {request.request_id!r} is still running.")
            self._active[request.request_id] = (q, [n])
        return self._relay(q, request.request_id, n)

    def _relay(self, q, key, n):
        try:
            for i in range(1, n + 1):
                item = q.get()
                if item is None:                        # aborted
                    yield Delta("", i - 1, "abort")
                    return
                yield Delta(item, i, "length" if i == n else None)
        finally:
            with self._lock:
                self._active.pop(key, None)

    def abort(self, request_id: str) -> None:
        with self._lock:
            row = self._active.get(request_id)
        if row is not None:
            row[1][0] = 0                               # no more tokens for it
            row[0].put(None)

    def health(self) -> str | None:
        return None

    def scheduler(self) -> SchedulerView:
        with self._lock:
            return SchedulerView(active=len(self._active), waiting=0)

    def live_requests(self) -> int:
        with self._lock:
            return len(self._active)

    def close(self) -> None:
        self._closed.set()
        with self._lock:
            ids = list(self._active)
        for rid in ids:
            self.abort(rid)


def _serve(port: int, step_ms: float, extra: list[str]) -> int:
    """The real app.py with the synthetic engine where a model would load (run in a subprocess)."""
    from engines import manager as m

    def load(self, model, engine="auto", progress=None, policy=None, **options):
        self._engine = SyntheticEngine(step_ms)
        return self._engine.info

    m.EngineManager.load = load
    import app

    return app.main(["--server-port", str(port), "--model", "synthetic", *extra])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--users", default="1,16,64")
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--step-ms", type=float, default=3.0, help="decode step (3 ms: TurboMind, 1.8B, batch 16)")
    ap.add_argument("--port", type=int, default=7897)
    ap.add_argument("--app-args", default="")
    ap.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--json")
    a = ap.parse_args(argv)
    if a.serve:
        return _serve(a.port, a.step_ms, a.app_args.split())
    from bench.bench_app import app_runs, start_server, streams_at_once

    users = [int(u) for u in a.users.split(",")]
    msgs = [ChatMessage("user", "Tell me a story.")]
    params = GenParams(temperature=0, max_new_tokens=a.new_tokens)
    eng = SyntheticEngine(a.step_ms)
    engine = streams_at_once(eng, msgs, params, users)
    eng.close()
    proc, _ = start_server([sys.executable, "-m", "bench.bench_web", "--serve", "--port", str(a.port),
                            "--step-ms", str(a.step_ms), "--app-args", a.app_args], a.port)
    try:
        app = app_runs(f"http://127.0.0.1:{a.port}/", msgs, params, users,
                       {n: e["tokens"] for n, e in engine.items()}, kind="http")
    finally:
        proc.terminate()
        proc.wait(20)
    report = {"args": vars(a), "engine": engine, "app": {n: {k: v for k, v in r.items() if k != "texts"}
                                                          for n, r in app.items()}}
    for n in users:
        e, g = engine[n], app[n]
        ratio = (g["tokens"] / g["seconds"]) / (e["tokens"] / e["seconds"])
        same = all(t == " tok" * a.new_tokens for t in g["texts"])
        print(f"users {n:3d}: engine {e['tokens'] / e['seconds']:8.1f} tok/s (ttft p50 {e['ttft_p50'] * 1000:6.1f} ms)"
              f" | app {g['tokens'] / g['seconds']:8.1f} tok/s (ttft p50 {g['ttft_p50'] * 1000:6.1f} ms, p99 "
              f"{g['ttft_p99'] * 1000:6.1f} ms) | app/engine x{ratio:.3f} | whole text: {same}", flush=True)
    if a.json:
        json.dump(report, open(a.json, "w"), indent=1)


if __name__ == "__main__":
    sys.exit(main())
