"""The app against its own engine, side by side in one run: what streaming through Gradio costs.

    python -m bench.bench_app                       # CPU, built-in SmolLM2, small mode
    python -m bench.bench_app --model PATH --engine turbomind --users 1,16 --new-tokens 256

1. The engine alone, in this process: one stream, then N concurrent streams (same prompts).
2. The engine is closed, ``python app.py`` is launched on the same model, and the same requests go
   through the public ``/chat`` endpoint with ``gradio_client``.
Greedy decoding makes both produce the same text, so tokens counted by the engine apply to the app
run too (the bench checks the texts match). Prints app/engine ratios for tokens/s and the
difference in first-token latency, plus the time until the app answered its first request.
With ``--compare-engine E2`` the same app run is repeated on a second engine and the ratio of the
two app runs is printed (the issue's "chat page on TurboMind against the same page on Transformers").
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.bench_engines import build_engine, one_stream, prompt_of  # noqa: E402
from engines.base import GenParams  # noqa: E402


def engine_runs(resolved, engine, opts, messages, params, users):
    eng = build_engine(resolved, engine, opts)
    one_stream(eng, messages, params.replace(max_new_tokens=8), "warm")
    out = streams_at_once(eng, messages, params, users)
    eng.close()
    return out


def streams_at_once(eng, messages, params, users):
    """For each N in ``users``: N threads stream the same request from ``eng`` at once."""
    out = {}
    for n in users:
        res = [None] * n
        threads = [threading.Thread(target=lambda i=i: res.__setitem__(i, one_stream(eng, messages, params, f"e{i}")))
                   for i in range(n)]
        t0 = time.perf_counter()
        [t.start() for t in threads]
        [t.join() for t in threads]
        wall = time.perf_counter() - t0
        out[n] = {"tokens": sum(r["tokens"] for r in res), "seconds": wall,
                  "ttft_p50": statistics.median(r["ttft"] for r in res), "texts": [r["text"] for r in res],
                  "decode_tok_s_1": (res[0]["tokens"] - 1) / (res[0]["seconds"] - res[0]["ttft"])}
    return out


def launch(model, engine, port, extra):
    return start_server([sys.executable, os.path.join(ROOT, "app.py"), "--server-port", str(port),
                         "--engine", engine, *(["--model", model] if model else []), *extra], port)


def start_server(args, port, probe: str = "gradio_api/info", name: str = "app", env: dict | None = None):
    """Start a server process (``args``: a Gradio app, or any server that answers GET ``probe``) and
    wait until it answers on ``port``; returns the process and the seconds it took (the process's
    log is /tmp/bench-NAME-PORT.log)."""
    return wait_server(spawn_server(args, port, probe, name, env))


def spawn_server(args, port, probe: str = "gradio_api/info", name: str = "app", env: dict | None = None):
    """Start a server process without waiting (several load side by side): ``wait_server`` waits."""
    log = open(f"/tmp/bench-{name}-{port}.log", "w")
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                            env={**os.environ, **env} if env else None)
    return proc, time.perf_counter(), log.name, f"http://127.0.0.1:{port}/{probe}"


def wait_server(spawned):
    """(process, seconds from its start until it answered) for what ``spawn_server`` started."""
    proc, t0, log, url = spawned
    while True:
        if proc.poll() is not None:
            raise SystemExit(open(log).read()[-3000:])
        try:
            urllib.request.urlopen(url, timeout=2)
            break
        except OSError:
            time.sleep(0.2)
    return proc, time.perf_counter() - t0


def client_stream(client, messages, params):
    """One streamed reply through gradio_client. We poll ``job.outputs()`` instead of iterating
    the job: gradio_client 2.x's ``Job.__next__`` sleeps 1 ms while holding the communicator's lock,
    which can starve the thread that receives updates (seen on the 16-core GPU machine: first
    output only at the end, seconds late, while a plain HTTP client saw 25 ms)."""
    t0 = time.perf_counter()
    ttft, seen = None, 0
    job = client.submit([m.to_dict() for m in messages], params, api_name="/chat")
    while True:
        done = job.done()
        outs = job.outputs()
        if len(outs) > seen:
            seen = len(outs)
            if ttft is None and any(outs):
                ttft = time.perf_counter() - t0
        if done:
            break
        time.sleep(0.01)
    end = time.perf_counter()
    job.result()  # raises the server's error, if any
    outs = job.outputs()
    return {"ttft": ttft, "seconds": end - t0, "text": outs[-1] if outs else "", "updates": len(outs)}


_EXTRA_INPUTS: dict[str, list] = {}   # url -> /chat's inputs after (messages, params): their defaults


def per_process(n: int) -> list[int]:
    """N users split over load-generator processes, 8 each (the last takes the rest)."""
    return [8] * (n // 8) + ([n % 8] if n % 8 else [])


def http_stream(url, messages, params):
    """One streamed reply through Gradio's plain REST API (POST /gradio_api/call/chat, then its
    server-sent events): what a thin HTTP client sees, with no client library in the way. Every
    further input of ``/chat`` (``conversation_id``) is sent as its default: Gradio's REST API wants
    them all (asked once per process from /gradio_api/info)."""
    if url not in _EXTRA_INPUTS:
        info = json.load(urllib.request.urlopen(url + "gradio_api/info", timeout=30))
        _EXTRA_INPUTS[url] = [p.get("parameter_default") for p in info["named_endpoints"]["/chat"]["parameters"][2:]]
    t0 = time.perf_counter()
    body = json.dumps({"data": [[m.to_dict() for m in messages], params, *_EXTRA_INPUTS[url]]}).encode()
    req = urllib.request.Request(url + "gradio_api/call/chat", data=body,
                                 headers={"Content-Type": "application/json"})
    event_id = json.load(urllib.request.urlopen(req, timeout=60))["event_id"]
    ttft, text, updates, event, complete = None, "", 0, "", False
    with urllib.request.urlopen(f"{url}gradio_api/call/chat/{event_id}", timeout=600) as resp:
        for raw in resp:
            line = raw.decode().strip()
            if line.startswith("event:"):
                event = line[6:].strip()
                complete = complete or event == "complete"
            elif line.startswith("data:") and event in ("generating", "complete"):
                data = json.loads(line[5:])
                if data and data[0]:
                    text = data[0]
                    updates += 1
                    if ttft is None:
                        ttft = time.perf_counter() - t0
            elif line.startswith("data:") and event == "error":
                raise RuntimeError(line)
    out = {"ttft": ttft, "seconds": time.perf_counter() - t0, "text": text, "updates": updates}
    if not complete:        # the server closed the stream early: a cut reply, not a fast one
        out["error"] = f"the stream ended without its 'complete' event, after {updates} updates"
    return out


_SERVED_MODEL: dict[str, str] = {}     # url -> the server's first listed model, asked once per process


def openai_stream(url, messages, params):
    """One streamed reply from an OpenAI-compatible server (``lmdeploy serve api_server``, the app's
    own ``--api``): POST /v1/chat/completions with ``stream`` and read its server-sent events. The
    model is the server's first listed one, asked for before the clock starts."""
    if url not in _SERVED_MODEL:
        _SERVED_MODEL[url] = json.load(urllib.request.urlopen(url + "v1/models", timeout=30))["data"][0]["id"]
    model = _SERVED_MODEL[url]
    t0 = time.perf_counter()
    body = {"model": model, "messages": [m.to_dict() for m in messages], "stream": True,
            "max_tokens": params.get("max_new_tokens"), "temperature": params.get("temperature", 0),
            **{k: params[k] for k in ("top_p", "top_k", "repetition_penalty", "seed") if k in params}}
    req = urllib.request.Request(url + "v1/chat/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    ttft, text, updates = None, "", 0
    with urllib.request.urlopen(req, timeout=600) as resp:
        for raw in resp:
            line = raw.decode().strip()
            if not line.startswith("data:") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[5:])
            piece = (chunk.get("choices") or [{}])[0].get("delta", {}).get("content") or ""
            if piece:
                text += piece
                updates += 1
                if ttft is None:
                    ttft = time.perf_counter() - t0
    return {"ttft": ttft, "seconds": time.perf_counter() - t0, "text": text, "updates": updates}


def _users_in_process(url, kind, messages, params, count, start_at):
    """Run ``count`` users (threads) in this worker process, all starting at ``start_at``."""
    clients = []
    if kind == "gradio_client":
        from gradio_client import Client

        clients = [Client(url, verbose=False) for _ in range(count)]
    res = [None] * count

    def one(i):
        time.sleep(max(0.0, start_at - time.time()))
        t_start = time.time()
        r = (client_stream(clients[i], messages, params) if kind == "gradio_client" else
             openai_stream(url, messages, params) if kind == "openai" else http_stream(url, messages, params))
        r["start"], r["end"] = t_start, time.time()
        res[i] = r

    threads = [threading.Thread(target=one, args=(i,)) for i in range(count)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    for r in res:
        r["worker"] = os.getpid()
    return res


def _warm_worker(url, kind, messages, params, count, start_at):
    """Each load-generator process sends ``count`` short requests at once before it is measured.
    Without this, the users of a process that had never sent a request came ~180 ms later than the
    others (seen on the H200 host: of 16 users, exactly the 8 of the unwarmed process)."""
    return os.getpid(), len(_users_in_process(url, kind, messages, params, count, start_at))


def app_runs(url, messages, params, users, tokens_by_users, kind="gradio_client"):
    """Drive the app with N simulated users. The load generator is spread over several processes
    (8 users each at most) so that it is never the bottleneck: one Python process parsing 64
    streams was (its GIL capped what it could read, seen on the H100)."""
    from concurrent.futures import ProcessPoolExecutor
    import multiprocessing as mp

    p = {k: getattr(params, k) for k in GenParams.RANGES if getattr(params, k) is not None}
    out = {}
    workers = max(1, (max(users) + 7) // 8)
    with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn")) as pool:
        # every worker process warmed (all submitted at once, each waits for the same moment, so
        # each lands in a process of its own), not only the first
        start_at = time.time() + 5.0
        warm = [pool.submit(_warm_worker, url, kind, messages, {**p, "max_new_tokens": 8}, 8, start_at)
                for _ in range(workers)]
        warmed = {f.result()[0] for f in warm}
        if len(warmed) < workers:
            print(f"note: {len(warmed)} of {workers} load-generator processes warmed", flush=True)
        for n in users:
            per = per_process(n)
            start_at = time.time() + 3.0   # every worker has its clients ready by then
            futs = [pool.submit(_users_in_process, url, kind, messages, p, k, start_at) for k in per]
            res = [r for f in futs for r in f.result()]
            wall = max(r["end"] for r in res) - min(r["start"] for r in res)
            toks = tokens_by_users[n]
            r0 = res[0]
            per_tok = toks / n
            ttfts = sorted(r["ttft"] for r in res)
            out[n] = {"tokens": toks, "seconds": wall, "ttft_p50": statistics.median(ttfts),
                      "ttft_p99": ttfts[min(len(ttfts) - 1, int(round(0.99 * (len(ttfts) - 1))))],
                      "texts": [r["text"] for r in res],
                      "decode_tok_s_1": (per_tok - 1) / (r0["seconds"] - r0["ttft"]),
                      # per user: start (s after the first start), first token, reply time, updates
                      # seen, load-generator process: tells a late start from a late first token from
                      # a slow stream, and a slow client process from a slow server
                      "users_detail": sorted([round(r["start"] - min(x["start"] for x in res), 3),
                                              round(r["ttft"], 3), round(r["seconds"], 3), r.get("updates"),
                                              r.get("worker")]
                                             for r in res)}
    return out


def alternating(resolved, a, opts, extra, messages, params, users):
    """``a.rounds`` rounds of (engine alone, then the app), the engine loaded in this process the
    whole time beside the app's own: both sides see the same machine, round by round. Returns the
    engine's and the app's results as medians over the rounds (texts and per-user details of the
    first round, the worst first-token p99), the app's start time and each round's ratios."""
    eng = build_engine(resolved, a.engine, opts)
    one_stream(eng, messages, params.replace(max_new_tokens=8), "warm")
    proc, ready_s = launch(a.model, a.engine, a.port, extra)
    runs = []
    try:
        for _ in range(a.rounds):
            e = streams_at_once(eng, messages, params, users)
            g = app_runs(f"http://127.0.0.1:{a.port}/", messages, params, users,
                         {n: e[n]["tokens"] for n in users}, a.client)
            runs.append((e, g))
    finally:
        proc.terminate()
        proc.wait(30)
        eng.close()

    def median_of(side: int) -> dict:
        out = {}
        for n in users:
            rs = [r[side][n] for r in runs]
            out[n] = {**rs[0], **{k: statistics.median(r[k] for r in rs)
                                  for k in ("seconds", "ttft_p50", "decode_tok_s_1")}}
            if "ttft_p99" in rs[0]:
                out[n]["ttft_p99"] = max(r["ttft_p99"] for r in rs)
        return out

    rounds = [{n: {"app/engine": round(e[n]["seconds"] / g[n]["seconds"], 3),
                   "engine_tok_s": round(e[n]["tokens"] / e[n]["seconds"], 1),
                   "app_tok_s": round(g[n]["tokens"] / g[n]["seconds"], 1)} for n in users} for e, g in runs]
    for i, r in enumerate(rounds):
        print(f"round {i + 1}: " + ", ".join(f"{n} users x{v['app/engine']}" for n, v in r.items()), flush=True)
    return median_of(0), median_of(1), ready_s, rounds


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="model folder (default: the built-in SmolLM2)")
    ap.add_argument("--engine", default="transformers")
    ap.add_argument("--compare-engine", default=None)
    ap.add_argument("--users", default="1,4")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prompt-words", type=int, default=32)
    ap.add_argument("--port", type=int, default=7871)
    ap.add_argument("--app-args", default="", help="extra app.py arguments")
    ap.add_argument("--client", choices=["gradio_client", "http"], default="gradio_client",
                    help="how simulated users talk to the app")
    ap.add_argument("--rounds", type=int, default=1,
                    help="alternate engine-alone and app runs this many times (the engine stays loaded "
                         "beside the app) and report medians: on a shared GPU host one engine run's "
                         "speed varies by up to ~15%% from the next")
    ap.add_argument("--json")
    a = ap.parse_args(argv)
    from engines import models

    users = [int(u) for u in a.users.split(",")]
    messages = prompt_of(a.prompt_words)
    params = GenParams(temperature=0, max_new_tokens=a.new_tokens)
    resolved = models.resolve(a.model, os.path.join(os.path.expanduser("~"), ".cache", "turbostudio"))
    opts = {"cache_max_entry_count": 0.5, "session_len": 4096} if a.engine != "transformers" else {}
    extra = a.app_args.split() + (["--cache-max-entry-count", "0.5", "--session-len", "4096"]
                                  if a.engine != "transformers" else [])
    report = {"engine": a.engine, "model": resolved.spec, "engine_runs": {}, "app_runs": {}}
    if a.rounds > 1:
        eng, app, ready_s, report["rounds"] = alternating(resolved, a, opts, extra, messages, params, users)
    else:
        eng = engine_runs(resolved, a.engine, opts, messages, params, users)
        proc, ready_s = launch(a.model, a.engine, a.port, extra)
        try:
            app = app_runs(f"http://127.0.0.1:{a.port}/", messages, params, users,
                           {n: eng[n]["tokens"] for n in users}, a.client)
        finally:
            proc.terminate()
            proc.wait(30)
    print(f"\n{a.engine} on {resolved.spec}: app ready {ready_s:.1f} s after launch; users talk through {a.client}")
    for n in users:
        e, g = eng[n], app[n]
        same = e["texts"] == g["texts"]
        report["engine_runs"][n] = {k: v for k, v in e.items() if k != "texts"}
        report["app_runs"][n] = {k: v for k, v in g.items() if k != "texts"}
        print(f"users {n:3d}: engine {e['tokens'] / e['seconds']:8.1f} tok/s (ttft p50 {e['ttft_p50'] * 1000:6.1f} ms) | "
              f"app {g['tokens'] / g['seconds']:8.1f} tok/s (ttft p50 {g['ttft_p50'] * 1000:6.1f} ms, "
              f"p99 {g['ttft_p99'] * 1000:6.1f} ms) | app/engine x{e['seconds'] / g['seconds']:.3f}, "
              f"ttft +{(g['ttft_p50'] - e['ttft_p50']) * 1000:.1f} ms | same text: {same}", flush=True)
        if n == 1:
            print(f"          decode-only tok/s: engine {e['decode_tok_s_1']:.1f}, app {g['decode_tok_s_1']:.1f}, "
                  f"ratio x{g['decode_tok_s_1'] / e['decode_tok_s_1']:.3f}")
    report["ready_s"] = ready_s
    if a.compare_engine:
        proc, ready2 = launch(a.model, a.compare_engine, a.port + 1, a.app_args.split())
        try:
            other = app_runs(f"http://127.0.0.1:{a.port + 1}/", messages, params, users[:1],
                             {users[0]: eng[users[0]]["tokens"]}, a.client)
        finally:
            proc.terminate()
            proc.wait(30)
        n = users[0]
        ratio = other[n]["seconds"] / app[n]["seconds"]
        print(f"chat page {a.engine} vs {a.compare_engine}, {n} user(s): x{ratio:.1f} tokens/s "
              f"({app[n]['seconds']:.2f} s vs {other[n]['seconds']:.2f} s for the same {eng[n]['tokens']} tokens; "
              f"same text: {app[n]['texts'] == other[n]['texts']})")
        report["compare"] = {"engine": a.compare_engine, "ratio": ratio,
                             "runs": {k: {kk: vv for kk, vv in v.items() if kk != 'texts'} for k, v in other.items()}}
    if a.json:
        with open(a.json, "w") as f:
            json.dump(report, f, indent=1)
    return report


if __name__ == "__main__":
    main()
