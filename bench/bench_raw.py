"""The app against LMDeploy itself, side by side in one run (issue #19's "benchmarks first").

    python -m bench.bench_raw --model PATH --backend turbomind --users 1,16,64 --new-tokens 256 --rounds 3

Every side serves the same model with the same LMDeploy engine settings, all loaded at once, and is
timed on the same greedy request, round after round (the order rotates each round; medians reported):

* ``raw``      LMDeploy's ``pipeline.stream_infer`` in this process: one call over N prompts, what
               LMDeploy's own Python API streams at best (the reference every ratio divides by);
* ``adapter``  TurboStudio's engine layer alone in this process (``engines/lmdeploy.py``), N threads:
               what our adapter costs before any web layer;
* ``chat``     the app (``python app.py --api``, its engine in a process of its own: ``--engine-process
               on``, engines/core.py) through its public ``/chat`` endpoint, plain HTTP server-sent
               events (Gradio's REST protocol);
* ``v1``       the same app's ``/v1/chat/completions`` (OpenAI protocol, streaming);
* ``chat-inproc``, ``v1-inproc``  a second app with the engine in the web server's process
               (``--engine-process off``, as before issue #19's split): the split's before/after;
* ``server``   LMDeploy's own ``lmdeploy serve api_server`` (its OpenAI endpoint, streaming): the peer;
* ``adapter-spread``  the adapter with its N starts spread evenly over ``--spread-ms`` (as web
               clients arrive): what arrival spread costs (on the H200 with the PyTorch engine,
               2026-12-03: nothing measurable at 20 ms, 0.934 against 0.935 all at once);
* ``v1-NAME``, ``chat-NAME``  an app started with the environment of ``--variant NAME:K=V,...``
               (e.g. ``base:TURBOSTUDIO_CORE_PUSH=0``): a before/after in the same run.

Rounds are interleaved: within a round, each user count is run on every side one after another
(the order rotates each round), so a side's ratio is taken against the raw run seconds before it;
the lent GPU machines drift by tens of percent over minutes (other tenants, clocks), which
sequential blocks of rounds mixed into the ratios. The report gives each side's median ratio and
the middle half of its rounds (25th-75th percentile), the web sides' client start spread, and
every server's CPU time per generated token (its whole process tree: the app with its engine
process, api_server with its engine process; raw and adapter: this process; "web": the server's
own process without its children).

The web sides' users run in a pool of load-generator processes (8 users each, all warmed first), so
the client is never the bottleneck. Throughput compares wall times for the same work (greedy decoding
gives every side the same text; the report says when a side's text differed); first-token latency is
measured per user from the moment its request is sent. ``--json`` writes every figure.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.bench_app import (_users_in_process, _warm_worker, per_process, spawn_server,  # noqa: E402
                             streams_at_once, wait_server)
from bench.bench_engines import build_engine, one_stream, prompt_of  # noqa: E402
from engines import heap  # noqa: E402
from engines.base import GenParams  # noqa: E402

SIDES = ("raw", "adapter", "chat", "v1", "chat-inproc", "v1-inproc", "server")


APPS = {"chat": "on", "v1": "on", "chat-inproc": "off", "v1-inproc": "off"}   # side -> --engine-process
ADAPTER_SIDES = ("adapter", "adapter-spread")


def p99(xs):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(0.99 * (len(xs) - 1))))]


def raw_pipeline(model: str, backend: str, cache: float, session_len: int, model_format: str = "hf"):
    from lmdeploy import PytorchEngineConfig, TurbomindEngineConfig, pipeline

    if backend == "turbomind":
        cfg = TurbomindEngineConfig(cache_max_entry_count=cache, session_len=session_len,
                                    model_format=None if model_format == "hf" else model_format)
    else:   # the PyTorch engine reads a quantized folder's format from its config.json
        cfg = PytorchEngineConfig(cache_max_entry_count=cache, session_len=session_len)
    return pipeline(model, backend_config=cfg, log_level="ERROR")


def raw_run(pipe, messages: list[dict], new_tokens: int, n: int) -> dict:
    """``pipe.stream_infer`` over ``n`` copies of the prompt: wall time, per-prompt first token."""
    from lmdeploy import GenerationConfig

    gen = GenerationConfig(max_new_tokens=new_tokens, do_sample=False, top_k=1)
    t0 = time.perf_counter()
    ttft, texts, tokens = [None] * n, [""] * n, [0] * n
    for out in pipe.stream_infer([messages] * n, gen_config=gen):
        i = getattr(out, "index", 0) or 0
        piece = getattr(out, "text", None)
        if piece is None:
            piece = getattr(out, "response", "") or ""
        if piece and ttft[i] is None:
            ttft[i] = time.perf_counter() - t0
        texts[i] += piece
        tokens[i] = getattr(out, "generate_token_len", tokens[i]) or tokens[i]
    wall = time.perf_counter() - t0
    tt = [t for t in ttft if t is not None] or [wall]
    return {"seconds": wall, "tokens": sum(tokens), "ttft_p50": statistics.median(tt), "ttft_p99": p99(tt), "ttfts": tt,
            "texts": texts}


def adapter_run(eng, messages, params, n, spread_s: float = 0.0) -> dict:
    """The adapter alone, N threads; ``spread_s``: their starts spread evenly over that many seconds
    (the wall time counts from the first start)."""
    if not spread_s:
        r = streams_at_once(eng, messages, params, [n])[n]
        return {"seconds": r["seconds"], "tokens": r["tokens"], "ttft_p50": r["ttft_p50"], "ttft_p99": None,
                "texts": r["texts"]}
    import threading

    from bench.bench_engines import one_stream

    res = [None] * n
    t0 = time.perf_counter() + 0.05

    def one(i):
        time.sleep(max(0.0, t0 + spread_s * i / max(1, n - 1) - time.perf_counter()))
        res[i] = one_stream(eng, messages, params, f"s{i}")

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    tt = [r["ttft"] for r in res if r["ttft"] is not None]
    return {"seconds": time.perf_counter() - t0, "tokens": sum(r["tokens"] for r in res),
            "ttft_p50": statistics.median(tt), "ttft_p99": p99(tt), "ttfts": tt, "texts": [r["text"] for r in res]}


def tree_cpu(pids, children: bool = True) -> float:
    """CPU seconds (user + system) of these processes and (``children``) all their descendants, now."""
    import psutil

    total = 0.0
    for pid in pids:
        try:
            root = psutil.Process(pid)
            procs = [root] + (root.children(recursive=True) if children else [])
        except psutil.NoSuchProcess:
            continue
        for p in procs:
            try:
                t = p.cpu_times()
                total += t.user + t.system
            except psutil.NoSuchProcess:
                pass
    return total


def web_run(pool, url: str, kind: str, messages, params: dict, n: int) -> dict:
    per = per_process(n)
    start_at = time.time() + 0.5       # every load-generator process is warm and waiting
    futs = [pool.submit(_users_in_process, url, kind, messages, params, k, start_at) for k in per]
    res = [r for f in futs for r in f.result()]
    wall = max(r["end"] for r in res) - min(r["start"] for r in res)
    tt = [r["ttft"] for r in res if r["ttft"] is not None]
    return {"seconds": wall, "tokens": None, "ttft_p50": statistics.median(tt) if tt else None,
            "ttft_p99": p99(tt) if tt else None, "ttfts": tt, "texts": [r["text"] for r in res],
            "errors": sum(1 for r in res if r["ttft"] is None),
            "start_spread": max(r["start"] for r in res) - min(r["start"] for r in res)}


def together(runs: list[dict]) -> dict:
    """Runs one after another as one measurement: their seconds and tokens added, first tokens pooled."""
    if len(runs) == 1:
        return runs[0]
    p50s = [r["ttft_p50"] for r in runs if r.get("ttft_p50") is not None]
    p99s = [r["ttft_p99"] for r in runs if r.get("ttft_p99") is not None]
    return {"seconds": sum(r["seconds"] for r in runs),
            "tokens": sum(r["tokens"] for r in runs) if all(r.get("tokens") for r in runs) else None,
            "ttft_p50": statistics.median(p50s) if p50s else None, "ttft_p99": max(p99s) if p99s else None,
            "ttfts": [t for r in runs for t in r.get("ttfts") or []],
            "texts": runs[0]["texts"], "errors": sum(r.get("errors", 0) for r in runs),
            "cpu": sum(r.get("cpu") or 0 for r in runs), "cpu_top": sum(r.get("cpu_top") or 0 for r in runs),
            "start_spread": max((r.get("start_spread") or 0) for r in runs),
            **({"gc_longest": max(r["gc_longest"] for r in runs), "gc_over_50ms": sum(r["gc_over_50ms"] for r in runs)}
               if all("gc_longest" in r for r in runs) else {})}


def launch_app(model, backend, port, cache, session_len, model_format="hf", engine_process="auto", env=None):
    """The app, started (not yet waited for: ``wait_server``)."""
    args = [sys.executable, os.path.join(ROOT, "app.py"), "--server-port", str(port), "--engine", backend,
            "--model", model, "--api", "--model-format", model_format, "--engine-process", engine_process]
    if backend != "transformers":
        args += ["--cache-max-entry-count", str(cache), "--session-len", str(session_len)]
    return spawn_server(args, port, name=f"app-{port}", env=env)


def launch_api_server(model, backend, port, cache, session_len, model_format="hf"):
    """LMDeploy's api_server, started (not yet waited for)."""
    code = "import sys; from lmdeploy.cli.entrypoint import run; sys.argv[0] = 'lmdeploy'; run()"
    args = [sys.executable, "-c", code, "serve", "api_server", model, "--backend", backend,
            "--server-port", str(port), "--cache-max-entry-count", str(cache), "--session-len",
            str(session_len), "--log-level", "ERROR"]
    if backend == "turbomind" and model_format != "hf":
        args += ["--model-format", model_format]
    return spawn_server(args, port, probe="v1/models", name="api-server")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="model folder")
    ap.add_argument("--backend", default="turbomind", choices=["turbomind", "pytorch", "transformers"],
                    help="transformers: only the adapter, chat and v1 sides (a CPU smoke run of the bench)")
    ap.add_argument("--users", default="1,16,64")
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--prompt-words", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--repeat-one", type=int, default=2,
                    help="at 1 user, this many replies one after another make one timing")
    ap.add_argument("--sides", default=",".join(SIDES), help=f"a subset of {','.join(SIDES)}, "
                    "adapter-spread, and v1-NAME / chat-NAME of each --variant")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME:K=V,...",
                    help="one more app (engine in its own process) with these environment variables")
    ap.add_argument("--spread-ms", type=float, default=20.0, help="adapter-spread: starts spread over this")
    ap.add_argument("--cache", type=float, default=0.1, help="LMDeploy cache_max_entry_count of EACH side "
                    "(the sides load side by side: each takes this share of the memory free as it loads)")
    ap.add_argument("--session-len", type=int, default=4096)
    ap.add_argument("--model-format", default="hf", choices=["hf", "awq", "fp8"],
                    help="the model's weight format (fp8: a blocked-FP8 folder from the Quantize page; "
                         "every side loads it as such)")
    ap.add_argument("--port", type=int, default=7881)
    ap.add_argument("--json")
    a = ap.parse_args(argv)
    from concurrent.futures import ProcessPoolExecutor
    import multiprocessing as mp

    from engines import models

    users = [int(u) for u in a.users.split(",")]
    sides = [s for s in a.sides.split(",") if s]
    variants = {}
    for v in a.variant:
        name, _, kvs = v.partition(":")
        variants[name] = dict(kv.split("=", 1) for kv in kvs.split(",") if kv)
    apps = {s: (mode, None) for s, mode in APPS.items()}      # side -> (engine process, environment)
    for name, env in variants.items():
        apps[f"chat-{name}"] = apps[f"v1-{name}"] = ("on", env)
    unknown = [s for s in sides if s not in SIDES and s not in ADAPTER_SIDES and s not in apps]
    if unknown:
        raise SystemExit(f"unknown side(s): {', '.join(unknown)}")
    msgs = prompt_of(a.prompt_words)
    dicts = [m.to_dict() for m in msgs]
    params = GenParams(temperature=0, max_new_tokens=a.new_tokens)
    web_params = {"temperature": 0, "top_k": 1, "max_new_tokens": a.new_tokens}
    resolved = models.resolve(a.model, os.path.join(os.path.expanduser("~"), ".cache", "turbostudio"))
    procs, ready, spawned, urls, pids = [], {}, {}, {}, {}
    pipe = eng = None
    try:
        # the servers load side by side with the in-process engines (each fresh PyTorch engine
        # takes ~40 s of CUDA-graph capture): started first, waited for after
        groups = {}
        for side in sides:
            if side in apps:
                groups.setdefault(apps[side][0] + repr(sorted((apps[side][1] or {}).items())), []).append(side)
        for k, (key, mine) in enumerate(groups.items()):
            mode, env = apps[mine[0]]
            port = a.port + 2 + k
            spawned[f"app-{port}"] = launch_app(a.model, a.backend, port, a.cache, a.session_len, a.model_format,
                                                mode, env)
            urls.update({s: f"http://127.0.0.1:{port}/" for s in mine})
        if "server" in sides:
            spawned["server"] = launch_api_server(a.model, a.backend, a.port + 1, a.cache, a.session_len,
                                                  a.model_format)
            urls["server"] = f"http://127.0.0.1:{a.port + 1}/"
        procs = [sp[0] for sp in spawned.values()]
        if "raw" in sides:
            t0 = time.perf_counter()
            pipe = raw_pipeline(a.model, a.backend, a.cache, a.session_len, a.model_format)
            raw_run(pipe, dicts, 8, 1)
            ready["raw"] = time.perf_counter() - t0
        if any(s in ADAPTER_SIDES for s in sides):
            t0 = time.perf_counter()
            eng = build_engine(resolved, a.backend, {} if a.backend == "transformers" else
                               {"cache_max_entry_count": a.cache, "session_len": a.session_len,
                                "model_format": a.model_format})
            one_stream(eng, msgs, params.replace(max_new_tokens=8), "warm")
            ready["adapter"] = time.perf_counter() - t0
        for name, sp in spawned.items():
            proc, ready[name] = wait_server(sp)
            pids[name] = proc.pid
        side_pids = {s: [pids["server"]] if s == "server" else
                     [pids[f"app-{urls[s].rsplit(':', 1)[1].strip('/')}"]] for s in urls}
        print("ready (s): " + ", ".join(f"{k} {v:.1f}" for k, v in ready.items()), flush=True)
        kinds = {s: ("http" if s.startswith("chat") else "openai") for s in urls}
        workers = max(1, (max(users) + 7) // 8)
        rounds = []
        with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn")) as pool:
            for side in urls:       # every load-generator process warmed on every server
                start_at = time.time() + 5.0
                fs = [pool.submit(_warm_worker, urls[side], kinds[side], msgs, {**web_params, "max_new_tokens": 8},
                                  8, start_at) for _ in range(workers)]
                [f.result() for f in fs]

            # Python's collections in this process (raw and the adapter run here), timed: raw
            # LMDeploy's first-token p99 on the H200 spread 89-402 ms between runs (session 12),
            # and a full collection of a process holding torch and LMDeploy stops it that long
            # (engines/heap.py); each run says the longest it met and how many took over 50 ms
            gct = heap.watch(0.05)

            def run(side, n, tokens=a.new_tokens):
                # raw and the adapter: this process alone (its children are the servers and clients)
                mine, tree = side_pids.get(side, [os.getpid()]), side in side_pids
                cpu0, top0 = tree_cpu(mine, tree), tree_cpu(mine, False)
                gct.reset()
                if side == "raw":
                    r = raw_run(pipe, dicts, tokens, n)
                elif side in ADAPTER_SIDES:
                    spread = 0.0 if side == "adapter" else a.spread_ms / 1000
                    r = adapter_run(eng, msgs, params.replace(max_new_tokens=tokens), n, spread)
                else:
                    r = web_run(pool, urls[side], kinds[side], msgs, {**web_params, "max_new_tokens": tokens}, n)
                r["cpu"] = tree_cpu(mine, tree) - cpu0
                r["cpu_top"] = tree_cpu(mine, False) - top0     # the server process itself (not its engine's)
                if not tree:                                    # collections met in this process
                    r["gc_longest"], r["gc_over_50ms"] = gct.longest, gct.slow
                return r

            # every side's engine meets each batch size once before the clock runs: the first steps at
            # a new size pay one-off costs (seen on the H200: the first 64-user round ran at 0.55-0.76
            # of the next on the sides that had not met 64 yet)
            for side in sides:
                for n in users:
                    run(side, n, 32)
            for r in range(a.rounds):
                order = sides[r % len(sides):] + sides[:r % len(sides)]
                res = {side: {} for side in sides}
                for n in users:
                    # interleaved: every side at this user count, one after another
                    for side in order:
                        # one user: one reply is ~0.5 s, less than the noise of a single timing, so
                        # --repeat-one replies one after another are timed together
                        k = a.repeat_one if n == 1 else 1
                        res[side][n] = together([run(side, n) for _ in range(k)])
                line = []
                for n in users:
                    base = res.get("raw", res[sides[0]])[n]["seconds"]
                    line.append(f"{n} users " + " ".join(f"{s} {base / res[s][n]['seconds']:.3f}" for s in sides))
                print(f"round {r + 1} (order {','.join(order)}): " + " | ".join(line), flush=True)
                rounds.append(res)
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        if eng is not None:
            eng.close()
        if pipe is not None:
            pipe.close()

    ref = "raw" if "raw" in sides else sides[0]
    report = {"model": a.model, "model_format": a.model_format, "backend": a.backend, "new_tokens": a.new_tokens,
              "rounds": a.rounds, "ready_s": ready, "variants": variants, "spread_ms": a.spread_ms,
              "sides": {}}
    print(f"\n{a.backend}, {a.model}, {a.new_tokens} new tokens, {a.rounds} interleaved rounds (ratio = {ref} "
          f"wall time / side wall time for the same requests, median [25th-75th percentile of rounds]; "
          f"cpu = the side's process tree's CPU ms per generated token):")
    for n in users:
        ref_tokens = rounds[0][ref][n]["tokens"]
        parts = []
        for s in sides:
            ratios = [rd[ref][n]["seconds"] / rd[s][n]["seconds"] for rd in rounds]
            q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
            ttft50 = statistics.median(rd[s][n]["ttft_p50"] for rd in rounds if rd[s][n]["ttft_p50"] is not None)
            p99s = [rd[s][n]["ttft_p99"] for rd in rounds if rd[s][n].get("ttft_p99") is not None]
            # the p99 of every first token of every round together (the worst round's p99 is kept too)
            pooled = [t for rd in rounds for t in rd[s][n].get("ttfts") or []]
            same = all(rd[s][n]["texts"] == rounds[0][ref][n]["texts"] for rd in rounds)
            errors = sum(rd[s][n].get("errors", 0) for rd in rounds)
            tok_s = ref_tokens / statistics.median(rd[s][n]["seconds"] for rd in rounds) if ref_tokens else None
            cpu_ms = (statistics.median(rd[s][n]["cpu"] for rd in rounds) * 1000 / ref_tokens) if ref_tokens else None
            top_ms = (statistics.median(rd[s][n]["cpu_top"] for rd in rounds) * 1000 / ref_tokens) if ref_tokens else None
            gcs = [rd[s][n] for rd in rounds if "gc_longest" in rd[s][n]]
            gc_ms = max(g["gc_longest"] for g in gcs) * 1000 if gcs else None
            gc_slow = sum(g["gc_over_50ms"] for g in gcs) if gcs else None
            spreads = [rd[s][n].get("start_spread") for rd in rounds if rd[s][n].get("start_spread") is not None]
            spread = statistics.median(spreads) * 1000 if spreads else None
            report["sides"].setdefault(s, {})[n] = {
                "ratio_median": statistics.median(ratios), "ratio_q1": q[0], "ratio_q3": q[2], "ratios": ratios,
                "ttft_p50_ms": ttft50 * 1000, "ttft_p99_ms": p99(pooled) * 1000 if pooled and p99s else None,
                "ttft_p99_worst_round_ms": max(p99s) * 1000 if p99s else None, "tok_s": tok_s,
                "same_text": same, "errors": errors, "cpu_ms_per_token": cpu_ms, "cpu_ms_per_token_top": top_ms,
                "start_spread_ms": spread, "gc_longest_ms": gc_ms, "gc_over_50ms": gc_slow}
            parts.append(f"{s} x{statistics.median(ratios):.3f} [{q[0]:.2f}-{q[2]:.2f}] ttft {ttft50 * 1000:.0f}"
                         + (f"/p99 {p99(pooled) * 1000:.0f} (worst round {max(p99s) * 1000:.0f})"
                            if p99s and pooled else "") + " ms"
                         + (f" cpu {cpu_ms:.3f}" if cpu_ms is not None else "")
                         + (f" (web {top_ms:.3f})" if s in side_pids and top_ms is not None else "")
                         + (f" spread {spread:.0f} ms" if spread is not None else "")
                         + (f" gc longest {gc_ms:.0f} ms, {gc_slow} over 50" if gc_ms is not None else "")
                         + ("" if same else " (text differs)") + (f" ERRORS {errors}" if errors else ""))
        print(f"users {n:3d} ({ref_tokens} tokens):\n  " + "\n  ".join(parts), flush=True)
    # each app's collections over 100 ms, as its log said (engines/heap.watch), over the whole run
    report["apps_slow_collections"] = {}
    for name, sp in spawned.items():
        try:
            with open(sp[2], errors="replace") as f:
                report["apps_slow_collections"][name] = sum(heap.SLOW_LOG in line for line in f)
        except OSError:
            pass
    if report["apps_slow_collections"]:
        print("collections over 100 ms logged by each server: " +
              ", ".join(f"{k} {v}" for k, v in report["apps_slow_collections"].items()), flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(report, f, indent=1)
    return report


if __name__ == "__main__":
    main()
