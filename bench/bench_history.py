"""Does keeping conversations slow streaming? The app's ``/chat`` with history on (every reply
appended to a stored conversation: the user's message at once, the reply from its first token and
every 0.5 s, then at its end) against history off (``--no-history``), side by side, on bench_web.py's
synthetic engine (a GPU engine's pace, in the app's process) and its load generator.

    python -m bench.bench_history --users 1,16,64 --rounds 3
    python -m bench.bench_history --store-cpu          # the store alone, in seconds: see below

Prints, per number of users: aggregate tokens/s and first-token p50 for each mode, and the ratios
on/off (1.00 = no cost; the issue asks for within 2%). Rounds alternate the modes; medians are
reported. The speed is not asserted anywhere: on a shared machine only ratios from one run mean much.

And per number of users, **server CPU ms per request** on and off: the app process's CPU time (user +
system, every thread: psutil), read before a round's requests and again once they ended (plus
``SETTLE_S`` for the store's last writes to land), less the idle server's CPU over the same time
(measured at start: the synthetic engine's clock ticks), summed over rounds and divided by the
requests. It depends much less than the ratios on what else the machine runs (not at all only on a
quiet one: under load every thread's CPU per unit of work grows): the figure to develop the store's
cost against on a shared machine (history's cost is the on - off difference). The store's writer
process (SQLite off the server's GIL) is a child of the server: its CPU is printed apart.

``--store-cpu``: the store's own work for one /chat request (its question, its reply created, two
partial rewrites and the final one with stats) done as /chat does it, N times in this process,
with the writes handed to the writer process (how the app runs) and, for comparison, run on the
writer thread in this process (how it ran before): CPU ms per request of *this* process (what the
server would pay under its GIL) and of the writer process. Single-threaded CPU work: the figure
that changes least with what else the machine runs.

Bench-only patch (in the server subprocess, like bench_web's synthetic engine): every caller is
one owner, ``bench``, so the load generator's REST calls (each its own Gradio session) can all
append to one conversation made at start-up; the storing path itself is the app's.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench import bench_app, bench_web  # noqa: E402
from engines.base import ChatMessage  # noqa: E402


def _serve(port: int, step_ms: float, history: bool, cache: str, cid_file: str) -> int:
    from engines import manager as m
    from ui import chat

    def load(self, model, engine="auto", progress=None, policy=None, **options):
        self._engine = bench_web.SyntheticEngine(step_ms)
        return self._engine.info

    m.EngineManager.load = load
    extra = []
    if history:
        from storage.conversations import ConversationStore

        chat.owner_key = lambda request, browser_id=None: "bench"
        store = ConversationStore.open(cache)
        with open(cid_file, "w") as f:
            f.write(store.create("bench"))
        store.close()
    else:
        extra.append("--no-history")
    import app

    return app.main(["--server-port", str(port), "--model", "synthetic", "--cache-dir", cache, *extra])


def _start(port: int, a, history: bool):
    import socket

    with socket.socket() as s:          # taken: another app would answer this bench's requests
        if s.connect_ex(("127.0.0.1", port)) == 0:
            raise RuntimeError(f"port {port} is taken: pick others with --port")
    cache = tempfile.mkdtemp(prefix=f"bench-history-{'on' if history else 'off'}-")
    cid_file = os.path.join(cache, "cid")
    proc = subprocess.Popen([sys.executable, "-m", "bench.bench_history", "--serve", str(port), "--step-ms",
                             str(a.step_ms), "--history", "on" if history else "off", "--cache", cache,
                             "--cid-file", cid_file], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/"
    for _ in range(600):
        if proc.poll() is not None:      # e.g. the port was taken: another app would answer there
            raise RuntimeError(f"the {'on' if history else 'off'} server exited ({proc.returncode}): is port "
                               f"{port} free?")
        try:
            urllib.request.urlopen(url + "gradio_api/info", timeout=2)
            if os.path.exists(cid_file) or not history:
                break
            time.sleep(0.2)
        except OSError:
            time.sleep(0.2)
    else:
        proc.kill()
        raise RuntimeError("the app did not start")
    cid = open(cid_file).read().strip() if history else None
    return proc, url, cid


SETTLE_S = 0.3   # after a round's last reply, for the writes handed to the store's writer to land


def _cpu_s(pid: int) -> float:
    """CPU seconds (user + system, every thread) the server process ``pid`` has used so far."""
    import psutil

    t = psutil.Process(pid).cpu_times()
    return t.user + t.system


def _children_cpu_s(pid: int) -> float:
    """CPU seconds its running child processes (the store's writer process) have used so far."""
    import psutil

    total = 0.0
    for ch in psutil.Process(pid).children(recursive=True):
        try:
            t = ch.cpu_times()
        except psutil.Error:
            continue
        total += t.user + t.system
    return total


def _idle_cpu_rate(pid: int, seconds: float = 3.0) -> float:
    """The idle server's CPU seconds per second (its engine's step clock, Gradio's housekeeping)."""
    c0, t0 = _cpu_s(pid), time.monotonic()
    time.sleep(seconds)
    return (_cpu_s(pid) - c0) / (time.monotonic() - t0)


def _run(url: str, cid: str | None, users: int, new_tokens: int, pid: int | None = None,
         idle: float = 0.0) -> dict:
    """One round of ``users`` simultaneous /chat requests; with ``pid``, the server's CPU seconds
    over it (less ``idle`` CPU seconds per second) as ``cpu_s``."""
    msgs = [ChatMessage("user", "Tell me a story.")]
    params = {"max_new_tokens": new_tokens, "temperature": 0}
    info = json.load(urllib.request.urlopen(url + "gradio_api/info", timeout=30))
    extra = [p.get("parameter_default") for p in info["named_endpoints"]["/chat"]["parameters"][2:]]
    bench_app._EXTRA_INPUTS[url] = [cid, *extra[1:]] if cid else extra      # conversation_id first
    bench_web.users_in_process(url, "chat", msgs, params, 1, time.time())  # warm
    time.sleep(SETTLE_S)
    t0 = time.time()
    c0, m0 = (_cpu_s(pid), time.monotonic()) if pid else (0.0, 0.0)
    k0 = _children_cpu_s(pid) if pid else 0.0
    res = bench_web.users_in_process(url, "chat", msgs, params, users, t0 + 0.2)
    cpu = kids = None
    if pid:
        time.sleep(SETTLE_S)
        cpu = _cpu_s(pid) - c0 - idle * (time.monotonic() - m0)
        kids = _children_cpu_s(pid) - k0
    wall = max(r["end"] for r in res) - min(r["start"] for r in res)
    errors = [r["error"] for r in res if r.get("error")]
    ttfts = sorted(r["ttft"] for r in res if r.get("ttft") is not None)
    return {"tokens_per_s": users * new_tokens / wall, "ttft_p50": statistics.median(ttfts) if ttfts else None,
            "errors": len(errors), "first_error": errors[0] if errors else None, "cpu_s": cpu, "children_cpu_s": kids,
            "requests": users}


def store_cpu(requests: int = 1000) -> dict:
    """The store's CPU per /chat request in the serving process: (``--store-cpu``, see above)."""
    import psutil
    from storage.conversations import ConversationStore, ReplyWriter, new_id

    meta = {"model": "synthetic", "backend": "synthetic", "device": "cpu", "dtype": "float32",
            "params": {"max_new_tokens": 256, "temperature": 0.0, "top_p": 1.0, "top_k": 0, "stop": []}}
    stats = {"ttft": 0.012, "tokens": 256, "tokens_per_s": 310.5, "seconds": 0.83, "finish_reason": "length"}
    out = {}
    for how in ("process", "thread"):
        store = ConversationStore.open(tempfile.mkdtemp(prefix=f"bench-history-store-{how}-"))
        store._use_process = how == "process"
        cid = store.create("bench")

        def one() -> None:
            store.known("bench", cid) or store.owns("bench", cid)
            uid = new_id()
            store.write("append", "bench", cid, "user", "Tell me a story.", mid=uid)
            w = ReplyWriter(store, "bench", cid, parent=uid, meta=meta, interval=0.0)
            text = ""
            for _ in range(3):
                text += " tok" * 85
                w.feed_later(text)
            w.finish_later(text, stats, wait=False)

        for _ in range(20):                       # warm (and the writer process started)
            one()
        store.settled()
        me = psutil.Process()
        kids = lambda: sum(c.cpu_times().user + c.cpu_times().system for c in me.children())  # noqa: E731
        t0, k0, w0 = time.process_time(), kids(), time.perf_counter()
        for _ in range(requests):
            one()
        store.settled()
        out[how] = {"server_ms": 1000 * (time.process_time() - t0) / requests,
                    "writer_process_ms": 1000 * (kids() - k0) / requests,
                    "wall_ms": 1000 * (time.perf_counter() - w0) / requests}
        store.close()
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--users", default="1,16,64", help="comma-separated numbers of simultaneous users")
    ap.add_argument("--new-tokens", type=int, default=256, help="tokens in every reply")
    ap.add_argument("--step-ms", type=float, default=3.0, help="the synthetic engine's decode step")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds; medians are reported")
    ap.add_argument("--port", type=int, default=7981, help="history on (off: the next port)")
    ap.add_argument("--store-cpu", type=int, nargs="?", const=1000, metavar="N",
                    help="only the store's CPU per request, N requests (default 1000): see above")
    ap.add_argument("--unstored", action="store_true",
                    help="a third mode: the history-on app's /chat without a conversation (tells the store's "
                         "cost from the cost of the app's history UI)")
    ap.add_argument("--history", choices=("on", "off"), help=argparse.SUPPRESS)
    ap.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--cache", help=argparse.SUPPRESS)
    ap.add_argument("--cid-file", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.serve:
        return _serve(a.serve, a.step_ms, a.history == "on", a.cache, a.cid_file)
    if a.store_cpu:
        r = store_cpu(a.store_cpu)
        print(f"the store's CPU per /chat request ({a.store_cpu} requests: question, reply, 2 rewrites, final):")
        for how, label in (("process", "writes handed to the writer process (the app)"),
                           ("thread", "writes on the writer thread in the server (before)")):
            print(f"  {label}: server {r[how]['server_ms']:.3f} ms, writer process "
                  f"{r[how]['writer_process_ms']:.3f} ms, wall {r[how]['wall_ms']:.3f} ms")
        print(f"load average: {' '.join(f'{x:.2f}' for x in os.getloadavg())} ({os.cpu_count()} cores)")
        return 0
    servers = {"on": _start(a.port, a, True), "off": _start(a.port + 1, a, False)}
    if a.unstored:      # the history-on app, its /chat called without a conversation: nothing stored
        servers["unstored"] = (servers["on"][0], servers["on"][1], None)
    modes = list(servers)
    try:
        idle = {mode: _idle_cpu_rate(proc.pid) for mode, (proc, _, _) in servers.items()}
        figures: dict = {}
        for rnd in range(a.rounds):
            for n in [int(x) for x in a.users.split(",")]:
                order = modes[rnd % len(modes):] + modes[:rnd % len(modes)]
                for mode in order:
                    proc, url, cid = servers[mode]
                    r = _run(url, cid, n, a.new_tokens, proc.pid, idle[mode])
                    figures.setdefault((n, mode), []).append(r)
                    if r["errors"]:
                        print(f"  {mode} {n} users: {r['errors']} errors, e.g. {r['first_error']}")
        print(f"history on vs off: /chat on the synthetic engine (step {a.step_ms} ms, {a.new_tokens} tokens), "
              f"medians of {a.rounds} rounds")
        for n in [int(x) for x in a.users.split(",")]:
            on = statistics.median(r["tokens_per_s"] for r in figures[(n, "on")])
            off = statistics.median(r["tokens_per_s"] for r in figures[(n, "off")])
            t_on = statistics.median(r["ttft_p50"] or 0 for r in figures[(n, "on")])
            t_off = statistics.median(r["ttft_p50"] or 0 for r in figures[(n, "off")])
            # each round's on/off pair ran back to back: the median of those ratios follows the
            # machine's drift (other work, clock) less than the ratio of the two medians
            paired = statistics.median(r_on["tokens_per_s"] / r_off["tokens_per_s"]
                                       for r_on, r_off in zip(figures[(n, "on")], figures[(n, "off")]))
            print(f"{n:4d} users: tokens/s on {on:8.1f} off {off:8.1f} ratio {on / off:.3f} (paired by round "
                  f"{paired:.3f}) · first token p50 on {t_on * 1000:.0f} ms off {t_off * 1000:.0f} ms ratio "
                  f"{t_on / t_off if t_off else 0:.3f}")
            if "unstored" in servers:
                un = statistics.median(r["tokens_per_s"] for r in figures[(n, "unstored")])
                print(f"{n:4d} users: the history-on app not storing {un:8.1f} tokens/s: on / unstored "
                      f"{on / un:.3f}, unstored / off {un / off:.3f} (the app's shape, not the store)")
        print(f"server CPU ms per request (psutil, user+system, idle {idle['on'] * 1000:.0f}/{idle['off'] * 1000:.0f} "
              f"ms/s on/off subtracted; rounds summed)")
        for n in [int(x) for x in a.users.split(",")]:
            per = {mode: 1000 * sum(r["cpu_s"] for r in figures[(n, mode)]) / sum(r["requests"] for r in figures[(n, mode)])
                   for mode in modes}
            kids = 1000 * sum(r["children_cpu_s"] for r in figures[(n, "on")]) / sum(r["requests"] for r in figures[(n, "on")])
            print(f"{n:4d} users: on {per['on']:6.2f} off {per['off']:6.2f} history costs {per['on'] - per['off']:+.2f} "
                  f"ms/request ({per['on'] / per['off']:.3f}x); the store's writer process (on) {kids:.2f} ms/request"
                  + (f"; the history-on app not storing {per['unstored']:6.2f}" if "unstored" in per else ""))
        print(f"load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())} "
              f"({os.cpu_count()} cores)")
    finally:
        for proc, _, _ in servers.values():
            proc.terminate()
            proc.wait(20)
    return 0


if __name__ == "__main__":
    sys.exit(main())
