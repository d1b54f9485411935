"""Where the adapter loses to raw LMDeploy at N users, on ONE LMDeploy pipeline in one process
(issue #19's open question: the adapter alone was 0.92-0.935 of ``stream_infer`` at 16 users on the
PyTorch engine, LMDeploy's own api_server 0.90-0.94, the app with them).

    python -m bench.probe_pytorch_gap --model DIR --backend pytorch --users 16 --rounds 8

Every variant runs the same N greedy requests on the same pipeline, round after round (order
rotating), and is timed against the raw run of its round:

* ``raw``         ``pipeline.stream_infer`` over N prompts: one call, all N created in one pass of
                  LMDeploy's loop, read through one queue by one thread;
* ``pull``        the adapter's ``stream()``, N threads each reading its own queue (the bench's
                  "adapter alone");
* ``push``        the adapter's ``start()`` from one thread, sinks that only append: no reading
                  thread at all (the engine process's path);
* ``push-batch``  the same N coroutines created in one pass of LMDeploy's loop, as ``stream_infer``
                  does (one hop to the loop instead of N);
* ``raw-nodetok``, ``push-nodetok``  raw and push with LMDeploy's incremental detokenization stubbed
                  out (``tokenizer.detokenize_incrementally`` returns one character and advances the
                  offsets): what turning ids into text costs on LMDeploy's loop thread, which a design
                  that detokenizes in another process (vLLM V1's front end) would take off it;
* ``raw-threads`` LMDeploy's own per-request path: N threads, each its own ``stream_infer`` over one
                  prompt (what a server that takes requests one by one does with the pipeline: if this
                  side shows the gap too, it is LMDeploy's cost of N separate requests, not the adapter's).

Besides the wall-time ratio it reports the CPU that LMDeploy's loop thread and the whole process
spent per generated token (each thread's own CPU clock, ``pthread_getcpuclockid``), so a variant
that makes the loop do more per token shows apart from one that only wakes other threads.

Run on the H200 on 2026-12-03 (session 12, ``bench/gpu_calls/s12a.sh``; figures in
``bench/gpu_session.md`` and the README): the push path ran at raw's speed or above; the pull path's
reading threads and LMDeploy's own per-request path lost 3-6%; detokenization stubbed out gained 3-9%."""
from __future__ import annotations

import argparse
import asyncio
import ctypes
import os
import statistics
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.bench_engines import build_engine, prompt_of  # noqa: E402
from bench.bench_raw import adapter_run, raw_run  # noqa: E402
from engines.base import ChatRequest, GenParams  # noqa: E402

VARIANTS = ("raw", "pull", "push", "push-batch", "raw-threads", "raw-nodetok", "push-nodetok")


def thread_cpu_clock(thread: threading.Thread):
    """A function giving ``thread``'s own CPU seconds (Linux: its pthread CPU clock)."""
    lib = ctypes.CDLL(None)
    clock = ctypes.c_int()
    if lib.pthread_getcpuclockid(ctypes.c_ulong(thread.ident), ctypes.byref(clock)) != 0:
        return lambda: 0.0
    cid = clock.value
    return lambda: time.clock_gettime(cid)


def push_run(eng, messages, params, n: int, batch: bool) -> dict:
    """N requests on the push path; sinks append and count the ends. ``batch``: all N coroutines
    created in one pass of LMDeploy's loop (what ``stream_infer`` does) instead of one hop each."""
    from engines.lmdeploy import _Call, _Push

    done = threading.Event()
    left = [n]
    lock = threading.Lock()
    texts = [[] for _ in range(n)]
    tokens = [0] * n
    first = [None] * n

    def sink_for(i):
        def sink(d):
            if d is None:
                with lock:
                    left[0] -= 1
                    if left[0] == 0:
                        done.set()
                return
            if first[i] is None and d.text:
                first[i] = time.perf_counter() - t0
            texts[i].append(d.text)
            tokens[i] = d.tokens
        return sink

    reqs = [ChatRequest(tuple(messages), params, session=f"p{i}", source="bench") for i in range(n)]
    t0 = time.perf_counter()
    if not batch:
        for i, r in enumerate(reqs):
            eng.start(r, sink_for(i))
    else:
        prompt, gen = eng._messages(list(messages)), eng._gen_config(params)
        calls = []
        for i, r in enumerate(reqs):
            call = _Call(r.request_id, push=_Push(eng, sink_for(i)))
            with eng._lock:
                eng._calls[r.request_id] = call
            calls.append(call)

        async def all_at_once():
            for call in calls:
                call.future = asyncio.ensure_future(eng._generate(call, prompt, gen))

        asyncio.run_coroutine_threadsafe(all_at_once(), eng._loop()).result()
    done.wait(600)
    return {"seconds": time.perf_counter() - t0, "tokens": sum(tokens), "texts": ["".join(t) for t in texts],
            "ttft_p50": statistics.median(f for f in first if f is not None)}


class no_detokenize:
    """Within the block, LMDeploy's incremental detokenization does nothing but advance its offsets
    (each output's text is one character): an instance attribute over the tokenizer's method."""

    def __init__(self, pipe):
        self.tok = pipe.async_engine.tokenizer

    def __enter__(self):
        from lmdeploy.tokenizer import DetokenizeState

        def detokenize_incrementally(all_input_ids, state, **kw):
            return "x", DetokenizeState(len(all_input_ids), None, 0, 0)

        self.tok.detokenize_incrementally = detokenize_incrementally

    def __exit__(self, *exc):
        del self.tok.detokenize_incrementally


def raw_threads_run(pipe, messages: list[dict], new_tokens: int, n: int) -> dict:
    """N threads, each one ``stream_infer`` over one prompt, all started together."""
    res = [None] * n
    go = threading.Barrier(n + 1)

    def one(i):
        go.wait()
        res[i] = raw_run(pipe, messages, new_tokens, 1)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    [t.start() for t in threads]
    go.wait()
    t0 = time.perf_counter()
    [t.join() for t in threads]
    return {"seconds": time.perf_counter() - t0, "tokens": sum(r["tokens"] for r in res),
            "texts": [r["texts"][0] for r in res], "ttft_p50": statistics.median(r["ttft_p50"] for r in res)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--backend", default="pytorch", choices=["pytorch", "turbomind"])
    ap.add_argument("--users", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--cache", type=float, default=0.2)
    a = ap.parse_args(argv)
    from engines import models

    resolved = models.resolve(a.model, os.path.join(os.path.expanduser("~"), ".cache", "turbostudio"))
    eng = build_engine(resolved, a.backend, {"cache_max_entry_count": a.cache, "session_len": 4096})
    try:
        msgs = prompt_of(32)
        dicts = [m.to_dict() for m in msgs]
        params = GenParams(temperature=0, max_new_tokens=a.new_tokens)
        loop_cpu = thread_cpu_clock(eng.pipe.internal_thread.thread)

        def run(v, tokens=a.new_tokens):
            p = params.replace(max_new_tokens=tokens)
            c0, l0 = time.process_time(), loop_cpu()
            if v == "raw-nodetok":
                with no_detokenize(eng.pipe):
                    r = raw_run(eng.pipe, dicts, tokens, a.users)
            elif v == "push-nodetok":
                with no_detokenize(eng.pipe):
                    r = push_run(eng, msgs, p, a.users, False)
            elif v == "raw":
                r = raw_run(eng.pipe, dicts, tokens, a.users)
            elif v == "raw-threads":
                r = raw_threads_run(eng.pipe, dicts, tokens, a.users)
            elif v == "pull":
                r = adapter_run(eng, msgs, p, a.users)
            else:
                r = push_run(eng, msgs, p, a.users, v == "push-batch")
            r["cpu"], r["loop_cpu"] = time.process_time() - c0, loop_cpu() - l0
            return r

        for v in VARIANTS:          # each path once at this size before the clock runs
            run(v, 32)
        rows = {v: [] for v in VARIANTS}
        for k in range(a.rounds):
            order = VARIANTS[k % len(VARIANTS):] + VARIANTS[:k % len(VARIANTS)]
            res = {v: run(v) for v in order}
            for v in VARIANTS:
                rows[v].append((res["raw"]["seconds"] / res[v]["seconds"], res[v]))
                differ = sum(a != b for a, b in zip(res[v]["texts"], res["raw"]["texts"]))
                if differ and "nodetok" not in v:
                    print(f"  ({v}: {differ} of {a.users} texts differ from raw's)", flush=True)
            print(f"round {k + 1}: " + " ".join(f"{v} {res['raw']['seconds'] / res[v]['seconds']:.3f}"
                                                for v in VARIANTS), flush=True)
        tokens = a.users * a.new_tokens
        print(f"\n{a.backend}, {a.users} users, {a.new_tokens} tokens, {a.rounds} interleaved rounds "
              "(ratio = raw wall / variant wall; CPU ms per generated token: LMDeploy's loop thread / process):")
        for v in VARIANTS:
            ratios = [r for r, _ in rows[v]]
            q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
            loop = statistics.median(x["loop_cpu"] for _, x in rows[v]) * 1000 / tokens
            cpu = statistics.median(x["cpu"] for _, x in rows[v]) * 1000 / tokens
            toks = statistics.median(x["tokens"] for _, x in rows[v])
            ttft = statistics.median(x["ttft_p50"] for _, x in rows[v]) * 1000
            print(f"  {v:11s} x{statistics.median(ratios):.3f} [{q[0]:.2f}-{q[2]:.2f}]  loop {loop:.4f}  "
                  f"process {cpu:.4f}  tokens {toks}  first token p50 {ttft:.0f} ms", flush=True)
    finally:
        eng.close()


if __name__ == "__main__":
    main()
