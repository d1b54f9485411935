"""Bursts of simultaneous requests: how late the slowest first tokens of each burst come, side by side.

``bench_web`` reports medians over a few rounds, which hide the one burst in five that a pause of the
server held back; issue #19's 64-user target is a p99 of the first token, which such a burst decides.
Here the same burst (N users at once, 1-token replies unless ``--new-tokens``, plain HTTP clients
from N/8 processes) is sent many times to each side in turn (the sides are ``bench_web``'s: this
checkout and ``--variant``s, each its own ``app.py`` in front of the synthetic engine), and each
side's bursts are reported: the first token's p50 and max per burst, how many bursts had a first
token later than ``--late-ms``, the server's CPU per request, and the collections the server logged
as slow (``engines/heap.watch``: over 100 ms).

    TURBOSTUDIO_ENGINE_PROCESS=on python -m bench.probe_bursts --users 64 --bursts 30 \\
        --variant nofreeze=env:TURBOSTUDIO_GC_FREEZE=0
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import time
from concurrent.futures import ProcessPoolExecutor

from bench.bench_app import per_process
from bench.bench_web import _cpu_s, _load, _machine, _start, _tree, _variants, users_in_process
from engines import heap
from engines.base import ChatMessage


def _burst(pool, url, path, msgs, params, n) -> list[float]:
    per = per_process(n)
    start_at = time.time() + 0.5
    futs = [pool.submit(users_in_process, url, path, msgs, params, k, start_at) for k in per]
    res = [r for f in futs for r in f.result()]
    errors = [r["error"] for r in res if r.get("error")]
    if errors:
        raise SystemExit(f"{len(errors)} of {n} users failed through /{path}: {errors[0]}")
    return sorted(r["ttft"] for r in res)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--users", type=int, default=64, help="users in every burst")
    ap.add_argument("--bursts", type=int, default=30, help="bursts per side and path")
    ap.add_argument("--path", default="v1,chat", help="comma-separated: chat, v1")
    ap.add_argument("--new-tokens", type=int, default=1, help="tokens in every reply")
    ap.add_argument("--late-ms", type=float, default=200.0, help="a burst whose last first token is later is late")
    ap.add_argument("--step-ms", type=float, default=3.0, help="the synthetic engine's decode step")
    ap.add_argument("--variant", action="append", default=[], help="as bench_web's")
    ap.add_argument("--port", type=int, default=7897)
    ap.add_argument("--app-args", default="")
    ap.add_argument("--client-nice", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--json", help="write every burst's figures to this file")
    a = ap.parse_args(argv)
    paths = [p for p in a.path.split(",") if p]
    a.path = ",".join(paths)       # _start adds --api when v1 is asked for
    msgs = [ChatMessage("user", "Tell me a story.")]
    params = {"temperature": 0, "max_new_tokens": a.new_tokens}
    variants = _variants(a.variant)
    print(f"probe_bursts: {_machine()}; {_load()}; {a.users} users a burst, {a.new_tokens} token(s) a reply",
          flush=True)
    procs = {}
    out: dict = {"args": vars(a), "machine": _machine(), "sides": {}}
    try:
        for i, v in enumerate(variants):
            procs[v["label"]] = (_start(v, a.port + i, a), f"http://127.0.0.1:{a.port + i}/", a.port + i)
        time.sleep(2.0)
        workers = max(1, (a.users + 7) // 8)
        with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn")) as pool:
            for lab, (pr, url, _) in procs.items():           # every worker warm on every side and path
                for path in paths:
                    _burst(pool, url, path, msgs, {**params, "max_new_tokens": 4}, workers * 8)
            logs0 = {lab: os.path.getsize(f"/tmp/bench-web-{port}.log") for lab, (_, _, port) in procs.items()}
            figures = {(lab, path): [] for lab in procs for path in paths}
            cpu = {k: 0.0 for k in figures}
            for b in range(a.bursts):                         # sides and paths take turns, burst by burst
                for lab, (pr, url, _) in procs.items():
                    for path in paths:
                        tree = _tree(pr.pid)
                        c0 = _cpu_s(tree)
                        t = _burst(pool, url, path, msgs, params, a.users)
                        cpu[(lab, path)] += _cpu_s(tree) - c0
                        figures[(lab, path)].append((t[len(t) // 2], t[-1]))
    finally:
        for pr, _, _ in procs.values():
            pr.terminate()
        for pr, _, _ in procs.values():
            pr.wait(20)
    for lab, (_, _, port) in procs.items():
        with open(f"/tmp/bench-web-{port}.log", errors="replace") as f:
            f.seek(logs0[lab])
            slow_gc = sum(heap.SLOW_LOG in line for line in f)
        for path in paths:
            rows = figures[(lab, path)]
            late = sum(mx * 1000 > a.late_ms for _, mx in rows)
            p50 = statistics.median(r[0] for r in rows) * 1000
            mx = sorted(r[1] for r in rows)
            side = {"bursts": len(rows), "late": late, "median_p50_ms": round(p50, 1),
                    "median_max_ms": round(statistics.median(mx) * 1000, 1), "worst_max_ms": round(mx[-1] * 1000, 1),
                    "server_cpu_ms_per_request": round(cpu[(lab, path)] * 1000 / (len(rows) * a.users), 2),
                    "slow_collections_logged": slow_gc,
                    "per_burst_p50_max_ms": [[round(x * 1000), round(y * 1000)] for x, y in rows]}
            out["sides"][f"{lab}/{path}"] = side
            print(f"{lab:>9s} /{path:4s}: first token per burst p50 {side['median_p50_ms']:6.1f} ms, max "
                  f"{side['median_max_ms']:6.1f} ms (worst {side['worst_max_ms']:6.1f}); late (> {a.late_ms:.0f} ms) "
                  f"{late} of {len(rows)}; server CPU {side['server_cpu_ms_per_request']:.2f} ms a request; "
                  f"collections logged slow (whole side) {slow_gc}", flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
