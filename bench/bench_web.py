"""The web layer alone: the app's real server path (Gradio queue, ``/chat``, ``/v1``, the async relay,
the engine manager) in front of a *synthetic* engine that makes tokens at a GPU engine's pace, against
that engine alone, side by side in one run.

    python -m bench.bench_web --users 1,16,64 --path chat,v1 --rounds 3          # about 4 minutes
    python -m bench.bench_web --users 16,64 --variant base=git:HEAD~3            # before/after a change

Not an engine benchmark and not a stand-in for one: it answers one question the GPU runs cannot
separate, namely how much of the gap between the app and an in-process engine the server costs by
itself. The synthetic engine is a continuous-batching loop: every ``--step-ms`` (a decode step, GIL
released like a GPU kernel) it hands one token to every running request through that request's
queue, per-token Python work like LMDeploy's pipeline does. It runs in the app's process, as an
in-process engine would; with ``--variant core=env:TURBOSTUDIO_ENGINE_PROCESS=on`` a second app runs
it in an engine core process of its own (``engines/core.py``), and the server CPU figures count the
app's child processes too.

Figures, for each number of users and each path (``chat``: Gradio's REST protocol,
``/gradio_api/call/chat`` and its server-sent events; ``v1``: the OpenAI endpoint, streaming):

* app/engine: aggregate tokens/s of the app against the engine driven by threads in this process;
* first-token latency p50/p99, measured by each client from the moment it sends its request;
* **server CPU ms per token**: the app's CPU time (user + system, every thread, its child processes
  included: psutil)
  over the run, per token delivered to the clients. Unlike the ratios it hardly depends on what else
  the machine runs, so it is the figure to develop against on a shared machine. The synthetic
  engine's own share is measured alone (``engine CPU``) and printed beside it;
* client CPU ms per token: what the load generator itself burnt (it shares the machine's cores).

Clients are plain HTTP (bench_app.py's load generator: 8 users per process, every process warmed
before it is measured). On a small machine they compete with the server for its cores: the client
CPU figure says how much; ``--client-nice`` lowers their priority so the server comes first.

Rounds alternate (engine alone, then every variant and path, the order rotated each round) and the
figures are medians over rounds. A ``--variant LABEL=SPEC`` is another server run side by side with
this checkout's: ``git:REF`` (that commit's tree, exported with ``git archive``: a before/after of a
change in one run) or ``env:NAME=VALUE,...`` (this checkout with those environment variables, e.g.
``env:TURBOSTUDIO_SESSION_SHIM=0``) or ``dir:FOLDER`` (a copy of the app elsewhere).
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
        if {**self.options, **options}.get("engine_process") == "on":     # the engine core (engines/core.py)
            from engines.core import CoreEngine

            self._engine = CoreEngine("bench.bench_web:SyntheticEngine", (step_ms,))
        else:
            self._engine = SyntheticEngine(step_ms)
        return self._engine.info

    m.EngineManager.load = load
    import app

    return app.main(["--server-port", str(port), "--model", "synthetic", *extra])


def chat_stream(url: str, messages, params: dict) -> dict:
    """One streamed reply through Gradio's REST protocol: ``bench_app.http_stream``."""
    from bench.bench_app import http_stream

    return http_stream(url, messages, params)


def users_in_process(url: str, path: str, messages, params: dict, count: int, start_at: float) -> list[dict]:
    """``count`` users (threads) of this load-generator process, all starting at ``start_at``, each
    one streamed reply through ``path`` ("chat" or "v1"); returns each one's figures."""
    from bench.bench_app import openai_stream

    res: list = [None] * count

    def one(i):
        time.sleep(max(0.0, start_at - time.time()))
        t_start = time.time()
        try:
            r = chat_stream(url, messages, params) if path == "chat" else openai_stream(url, messages, params)
        except Exception as e:  # noqa: BLE001 - reported, the run goes on
            r = {"ttft": None, "seconds": time.time() - t_start, "text": "", "updates": 0, "error": repr(e)[:300]}
        r["start"], r["end"], r["worker"] = t_start, time.time(), os.getpid()
        res[i] = r

    threads = [threading.Thread(target=one, args=(i,)) for i in range(count)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    return res


def _tree(pid: int) -> list[int]:
    """``pid`` and its live descendants (the app's engine core and history writer processes)."""
    import psutil

    try:
        return [pid, *(c.pid for c in psutil.Process(pid).children(recursive=True))]
    except psutil.Error:
        return [pid]


def _cpu_s(pids) -> float:
    """CPU seconds (user + system, all threads) the processes ``pids`` have used so far."""
    import psutil

    total = 0.0
    for pid in pids:
        try:
            t = psutil.Process(pid).cpu_times()
        except psutil.Error:        # a load-generator process that ended: counted up to its last read
            continue
        total += t.user + t.system
    return total


def _machine() -> str:
    import platform

    try:
        model = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor() or "?"
    return f"{os.cpu_count()} cores ({model}), Python {platform.python_version()}"


def _load() -> str:
    return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())


def _export(ref: str) -> str:
    """``ref``'s tree of this repository, exported into a temporary folder (``git archive``: the
    checkout and its git state are untouched); returns the folder."""
    import subprocess
    import tempfile

    sha = subprocess.run(["git", "rev-parse", "--short", ref], cwd=ROOT, check=True, capture_output=True,
                         text=True).stdout.strip()
    dest = os.path.join(tempfile.gettempdir(), f"bench-web-{sha}")
    if not os.path.isdir(dest):
        os.makedirs(dest + ".part", exist_ok=True)
        archive = subprocess.Popen(["git", "archive", sha], cwd=ROOT, stdout=subprocess.PIPE)
        subprocess.run(["tar", "-x", "-C", dest + ".part"], stdin=archive.stdout, check=True)
        archive.wait()
        os.rename(dest + ".part", dest)
    return dest


def _variants(specs: list[str], checkout: bool = True) -> list[dict]:
    """[{"label", "root", "env"}]: this checkout first ("app", unless ``checkout`` is False), then
    each ``--variant``."""
    out = [{"label": "app", "root": ROOT, "env": {}}] if checkout else []
    for spec in specs:
        label, _, how = spec.partition("=")
        if how.startswith("git:"):
            out.append({"label": label, "root": _export(how[4:]), "env": {}})
        elif how.startswith("dir:") and os.path.isfile(os.path.join(how[4:], "app.py")):
            out.append({"label": label, "root": os.path.abspath(how[4:]), "env": {}})
        elif how.startswith("env:"):
            env = dict(kv.split("=", 1) for kv in how[4:].split(",") if kv)
            out.append({"label": label, "root": ROOT, "env": env})
        else:
            raise SystemExit(f"--variant {spec!r}: expected LABEL=git:REF, LABEL=dir:FOLDER (a copy of the "
                             "app) or LABEL=env:NAME=VALUE,...")
    return out


def _start(variant: dict, port: int, a) -> object:
    """The variant's server (its own tree and environment) on ``port``, waited for."""
    import subprocess
    import urllib.request

    env = {**os.environ, **variant["env"], "PYTHONPATH": variant["root"]}
    log = open(f"/tmp/bench-web-{port}.log", "w")
    args = [sys.executable, "-m", "bench.bench_web", "--serve", "--port", str(port), "--step-ms", str(a.step_ms),
            "--app-args=" + " ".join([*a.app_args.split(), *(["--api"] if "v1" in a.path else [])])]
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, cwd=variant["root"], env=env)
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"{variant['label']} server ended:\n" + open(log.name).read()[-3000:])
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/gradio_api/info", timeout=2)
            return proc
        except OSError:
            time.sleep(0.2)


def _nice_worker(nice: int) -> None:
    if nice:
        os.nice(nice)


def _users(pool, url, path, msgs, p, n, server_pid, client_pids, expect) -> dict:
    """N users at once through ``path`` ("chat" or "v1"); the server's and the clients' CPU seconds
    measured around the run."""
    from bench.bench_app import per_process

    per = per_process(n)
    load = os.getloadavg()[0]
    start_at = time.time() + 1.0      # every worker has its users' threads ready by then
    server = _tree(server_pid)        # the app's processes: itself, its engine core, its history writer
    cpu0, ccpu0 = _cpu_s(server), _cpu_s(client_pids)
    futs = [pool.submit(users_in_process, url, path, msgs, p, k, start_at) for k in per]
    res = [r for f in futs for r in f.result()]
    errors = [r["error"] for r in res if r.get("error")]
    if errors:
        raise SystemExit(f"{len(errors)} of {n} users failed through /{path}: {errors[0]}")
    cpu1, ccpu1 = _cpu_s(server), _cpu_s(client_pids)
    wall = max(r["end"] for r in res) - min(r["start"] for r in res)
    ttfts = sorted(r["ttft"] if r["ttft"] is not None else r["seconds"] for r in res)
    tokens = expect * n
    return {"tokens": tokens, "seconds": wall, "ttft_p50": ttfts[len(ttfts) // 2],
            "ttft_p99": ttfts[min(len(ttfts) - 1, int(round(0.99 * (len(ttfts) - 1))))],
            "server_cpu_ms_per_token": (cpu1 - cpu0) * 1000 / tokens,
            "client_cpu_ms_per_token": (ccpu1 - ccpu0) * 1000 / tokens,
            "updates_per_reply": sum(r["updates"] for r in res) / n, "load1": load,
            "whole_text": all(r["text"] == " tok" * expect for r in res),
            # per user: start (s after the first start), first token, reply time (s), updates seen
            "users_detail": sorted([round(r["start"] - min(x["start"] for x in res), 3), round(r["ttft"], 3),
                                    round(r["seconds"], 3), r["updates"]] for r in res)}


def _engine_alone(eng, msgs, params, n) -> dict:
    from bench.bench_app import streams_at_once

    cpu0 = _cpu_s([os.getpid()])
    e = streams_at_once(eng, msgs, params, [n])[n]
    cpu = _cpu_s([os.getpid()]) - cpu0
    return {"tokens": e["tokens"], "seconds": e["seconds"], "ttft_p50": e["ttft_p50"],
            "cpu_ms_per_token": cpu * 1000 / e["tokens"]}


def _median(runs: list[dict]) -> dict:
    import statistics

    out = dict(runs[0])
    for k, v in runs[0].items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            out[k] = statistics.median(r[k] for r in runs)
    out["whole_text"] = all(r.get("whole_text", True) for r in runs)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--users", default="1,16,64", help="comma-separated numbers of simultaneous users")
    ap.add_argument("--new-tokens", type=int, default=256, help="tokens in every reply")
    ap.add_argument("--step-ms", type=float, default=3.0, help="decode step (3 ms: TurboMind, 1.8B, batch 16)")
    ap.add_argument("--path", default="chat", help="comma-separated: chat (Gradio's /chat), v1 (OpenAI)")
    ap.add_argument("--rounds", type=int, default=1, help="alternating rounds; medians are reported")
    ap.add_argument("--variant", action="append", default=[],
                    help="LABEL=git:REF, LABEL=dir:FOLDER or LABEL=env:NAME=VALUE,...: another server, side by side")
    ap.add_argument("--variants-only", action="store_true",
                    help="serve only the --variant sides, not this checkout (A/B of two exported trees)")
    ap.add_argument("--client-nice", type=int, default=0,
                    help="niceness of the load-generator processes (e.g. 10: the server's cores first)")
    ap.add_argument("--port", type=int, default=7897, help="first server's port (variants: the next ones)")
    ap.add_argument("--app-args", default="", help="extra app.py arguments for every server")
    ap.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--json", help="write every figure (each round's too) to this file")
    a = ap.parse_args(argv)
    if a.serve:
        return _serve(a.port, a.step_ms, a.app_args.split())
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    users = [int(u) for u in a.users.split(",")]
    paths = [x for x in a.path.split(",") if x]
    if not set(paths) <= {"chat", "v1"}:
        raise SystemExit("--path: chat and/or v1")
    msgs = [ChatMessage("user", "Tell me a story.")]
    params = GenParams(temperature=0, max_new_tokens=a.new_tokens)
    p = {k: getattr(params, k) for k in GenParams.RANGES if getattr(params, k) is not None}
    variants = _variants(a.variant, checkout=not a.variants_only)
    print(f"bench_web: {_machine()}; {_load()}", flush=True)
    eng = SyntheticEngine(a.step_ms)
    procs = {}
    runs: list[dict] = []            # one row per (round, side, path, users)
    try:
        for i, v in enumerate(variants):
            procs[v["label"]] = (_start(v, a.port + i, a), f"http://127.0.0.1:{a.port + i}/")
        time.sleep(2.0)
        idle = {lab: _cpu_s(_tree(pr.pid)) for lab, (pr, _) in procs.items()}
        time.sleep(5.0)
        idle = {lab: (_cpu_s(_tree(pr.pid)) - idle[lab]) / 5.0 for lab, (pr, _) in procs.items()}
        workers = max(1, (max(users) + 7) // 8)
        with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn"),
                                 initializer=_nice_worker, initargs=(a.client_nice,)) as pool:
            client_pids: set[int] = set()
            for lab, (pr, url) in procs.items():
                for path in paths:
                    start_at = time.time() + 3.0
                    warm = [pool.submit(users_in_process, url, path, msgs, {**p, "max_new_tokens": 8}, 8,
                                        start_at) for _ in range(workers)]
                    client_pids |= {r["worker"] for f in warm for r in f.result()}
            for r in range(a.rounds):
                order = [(lab, path) for lab in procs for path in paths]
                order = order[r % len(order):] + order[:r % len(order)]
                print(f"round {r + 1}: {_load()}", flush=True)
                for n in users:
                    runs.append({"round": r, "side": "engine", "path": "", "users": n,
                                 **_engine_alone(eng, msgs, params, n)})
                for lab, path in order:
                    pr, url = procs[lab]
                    for n in users:
                        row = _users(pool, url, path, msgs, p, n, pr.pid, client_pids, a.new_tokens)
                        runs.append({"round": r, "side": lab, "path": path, "users": n, **row})
    finally:
        eng.close()
        for pr, _ in procs.values():
            pr.terminate()
        for pr, _ in procs.values():
            pr.wait(20)
    report = {"args": vars(a), "machine": _machine(), "idle_server_cpu_per_s": idle, "runs": runs,
              "engine": {}, "sides": {}}
    for n in users:
        e = _median([x for x in runs if x["side"] == "engine" and x["users"] == n])
        report["engine"][str(n)] = e
        e_rate = e["tokens"] / e["seconds"]
        print(f"users {n:3d}: engine alone {e_rate:8.1f} tok/s, ttft p50 {e['ttft_p50'] * 1000:6.1f} ms, "
              f"engine CPU {e['cpu_ms_per_token']:.3f} ms/token", flush=True)
        for lab in procs:
            for path in paths:
                g = _median([x for x in runs if x["side"] == lab and x["path"] == path and x["users"] == n])
                g["app/engine"] = round((g["tokens"] / g["seconds"]) / e_rate, 3)
                report["sides"].setdefault(f"{lab}/{path}", {})[str(n)] = g
                print(f"  {lab:>6s} /{path:4s}: {g['tokens'] / g['seconds']:8.1f} tok/s x{g['app/engine']:.3f} | "
                      f"ttft p50 {g['ttft_p50'] * 1000:6.1f} p99 {g['ttft_p99'] * 1000:7.1f} ms | server CPU "
                      f"{g['server_cpu_ms_per_token']:.3f} ms/token, clients {g['client_cpu_ms_per_token']:.3f} | "
                      f"{g['updates_per_reply']:.0f} updates/reply | load {g['load1']:.2f} | "
                      f"whole text: {g['whole_text']}", flush=True)
    for lab, c in idle.items():
        print(f"idle server {lab}: {c * 100:.1f}% of a core", flush=True)
    # the first side's /chat figures under the names earlier reports used
    report["app"] = report["sides"][f"{variants[0]['label']}/{paths[0]}"]
    if a.json:
        with open(a.json, "w") as f:
            json.dump(report, f, indent=1)
    return report


if __name__ == "__main__":
    main()
