"""Engine against engine, side by side in one run: tokens/s at batch 1 and N, first-token latency.

    python -m bench.bench_engines --shape 1.8b --backends turbomind,transformers --batch 1,16
    python -m bench.bench_engines --model PATH --backends transformers --batch 1,4      # CPU

Each backend is loaded through TurboStudio's own engine layer (the code the app runs), warmed up,
then timed; batch N means N concurrent streams (the engine batches them). Prints a table and the
ratios against the last backend listed. ``--json`` writes the numbers.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engines.base import ChatMessage, ChatRequest, GenParams  # noqa: E402


def prompt_of(n_words: int) -> list[ChatMessage]:
    words = "the quick brown fox jumps over a lazy dog while seven wizards quietly judge boxing".split()
    text = " ".join(words[i % len(words)] for i in range(n_words))
    return [ChatMessage("user", "Continue this text for as long as you can: " + text)]


def build_engine(resolved, backend: str, opts: dict):
    """The backend alone (the engine layer the app's manager drives): config, pre-check, create. In
    this process (``engine_process`` off unless ``opts`` asks): "the engine alone" is the reference
    the app, whose engine runs in a process of its own, is measured against."""
    from engines import configs, registry

    config = configs.config_for(backend, {"engine_process": "off", **opts})[0]
    registry.precheck(resolved, config)
    return registry.create(resolved, config)


def one_stream(engine, messages, params, sid):
    t0 = time.perf_counter()
    ttft, tokens, text = None, 0, ""
    for d in engine.stream(ChatRequest(tuple(messages), params, session=sid, source="bench")):
        if ttft is None and (d.text or d.tokens):
            ttft = time.perf_counter() - t0
        tokens = d.tokens
        text += d.text
    return {"ttft": ttft, "tokens": tokens, "seconds": time.perf_counter() - t0, "text": text}


def run_batch(engine, messages, params, n):
    results = [None] * n

    def work(i):
        results[i] = one_stream(engine, messages, params.replace(seed=i) if not params.greedy else params,
                                f"bench-{n}-{i}")

    t0 = time.perf_counter()
    threads = [threading.Thread(target=work, args=(i,)) for i in range(n)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    wall = time.perf_counter() - t0
    tokens = sum(r["tokens"] for r in results)
    return {"batch": n, "tokens": tokens, "seconds": wall, "tok_s": tokens / wall,
            "ttft_p50": statistics.median(r["ttft"] for r in results),
            "words_s": sum(len(r["text"].split()) for r in results) / wall}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", help="model folder (default: build --shape with random weights)")
    ap.add_argument("--shape", default="1.8b")
    ap.add_argument("--backends", default="turbomind,transformers")
    ap.add_argument("--batch", default="1,16")
    ap.add_argument("--prompt-words", type=int, default=48)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--json", help="write results here")
    a = ap.parse_args(argv)
    from engines import models, telemetry

    path = a.model
    if not path:
        from bench.models import build_llama

        import torch
        dev = "cuda" if torch.cuda.is_available() else "cpu"
        path = build_llama(f"/tmp/turbostudio-bench-{a.shape}", a.shape, device=dev,
                           dtype="bfloat16" if dev == "cuda" else "float32")
    resolved = models.resolve(path, "/tmp/turbostudio-bench-cache")
    messages = prompt_of(a.prompt_words)
    params = GenParams(temperature=0, max_new_tokens=a.new_tokens)
    batches = [int(b) for b in a.batch.split(",")]
    results = {}
    for backend in a.backends.split(","):
        opts = {"device": a.device} if backend == "transformers" else {"cache_max_entry_count": 0.5,
                                                                        "session_len": 4096}
        base = telemetry.snapshot()["gpu_used"]
        t0 = time.perf_counter()
        eng = build_engine(resolved, backend, opts)
        load_s = time.perf_counter() - t0
        one_stream(eng, messages, params.replace(max_new_tokens=8), "warmup")
        rows = []
        for n in batches:
            runs = [run_batch(eng, messages, params, n) for _ in range(a.repeat)]
            best = max(runs, key=lambda r: r["tok_s"])
            rows.append(best)
            print(f"{backend:12s} batch {n:3d}: {best['tok_s']:9.1f} tok/s  {best['words_s']:8.1f} words/s  "
                  f"ttft p50 {best['ttft_p50'] * 1000:7.1f} ms  ({best['tokens']} tokens in {best['seconds']:.2f} s)",
                  flush=True)
        peak = telemetry.snapshot()["gpu_used"] - base
        results[backend] = {"load_s": load_s, "gpu_mem_bytes": peak, "rows": rows, "info": eng.info.to_dict()}
        eng.close()
    names = list(results)
    if len(names) > 1:
        ref = names[-1]
        print(f"\nratios against {ref}:")
        for name in names[:-1]:
            for r, rr in zip(results[name]["rows"], results[ref]["rows"]):
                print(f"  {name}/{ref} batch {r['batch']}: tokens/s x{r['tok_s'] / rr['tok_s']:.1f}, "
                      f"first token x{rr['ttft_p50'] / r['ttft_p50']:.1f} faster")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"model": path, "args": vars(a), "results": results}, f, indent=1, default=str)
    return results


if __name__ == "__main__":
    main()
