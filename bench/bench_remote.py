"""The remote hop's cost: the app on a remote OpenAI-compatible server against the app with the same
engine in-process, one after the other in one run, same prompts, same users.

    python -m bench.bench_remote --model PATH --users 1,16 --new-tokens 256          # GPU: TurboMind
    python -m bench.bench_remote --server app --users 1,4 --new-tokens 48            # CPU smoke

``--server lmdeploy`` (default) starts ``lmdeploy serve api_server`` on TurboMind through the app's
own launcher (``engines.servers``); ``--server app`` starts a second TurboStudio with ``--api`` on
Transformers instead (no GPU needed). Users talk to the app over plain HTTP (``bench.bench_app``'s
load generator, several processes). Prints aggregate tokens/s of each and the ratio (target 0.9).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.bench_app import app_runs, launch, prompt_of  # noqa: E402
from engines.base import GenParams  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="model folder (default: the built-in SmolLM2)")
    ap.add_argument("--server", choices=["lmdeploy", "app"], default="lmdeploy")
    ap.add_argument("--users", default="1,16")
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--port", type=int, default=7881)
    ap.add_argument("--json")
    a = ap.parse_args(argv)
    from engines import models, servers

    users = [int(u) for u in a.users.split(",")]
    messages = prompt_of(32)
    params = GenParams(temperature=0, max_new_tokens=a.new_tokens)
    expected = {n: n * a.new_tokens for n in users}       # greedy, random weights: no early stop
    engine = "turbomind" if a.server == "lmdeploy" else "transformers"
    tm = ["--cache-max-entry-count", "0.5", "--session-len", "4096"] if engine == "turbomind" else []
    srv_port = a.port + 10
    results = {}
    launcher = servers.ServerManager(tempfile.mkdtemp(prefix="bench-remote-"))
    try:
        if a.server == "lmdeploy":
            path = models.resolve(a.model, os.path.expanduser("~/.cache/turbostudio")).path
            cmd = servers.api_server_command(path, srv_port, backend="turbomind", cache_max_entry_count=0.5,
                                             session_len=4096)
        else:
            cmd = [sys.executable, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                                "app.py"), "--server-port", str(srv_port), "--api",
                   "--max-queue", "256", *(["--model", a.model] if a.model else [])]
        launcher.start("server", cmd, f"http://127.0.0.1:{srv_port}", timeout=600)
        # the server alone, driven by the same load generator over its own OpenAI endpoint: where the
        # remote setup loses speed, this tells the server's share from the app's hop
        results["server"] = app_runs(f"http://127.0.0.1:{srv_port}/", messages, params, users, expected, "openai")
        proc, _ = launch(f"http://127.0.0.1:{srv_port}", "remote", a.port, [])
        try:
            results["remote"] = app_runs(f"http://127.0.0.1:{a.port}/", messages, params, users, expected, "http")
        finally:
            proc.terminate()
            proc.wait(30)
    finally:
        launcher.stop_all()
    proc, _ = launch(a.model, engine, a.port + 1, tm)
    try:
        results["in-process"] = app_runs(f"http://127.0.0.1:{a.port + 1}/", messages, params, users, expected,
                                         "http")
    finally:
        proc.terminate()
        proc.wait(30)
    report = {"server": a.server, "engine": engine, "users": {}}
    for n in users:
        r, i, s = results["remote"][n], results["in-process"][n], results["server"][n]
        ratio = i["seconds"] / r["seconds"]
        report["users"][n] = {"remote_tok_s": r["tokens"] / r["seconds"], "inproc_tok_s": i["tokens"] / i["seconds"],
                              "server_alone_tok_s": s["tokens"] / s["seconds"],
                              "ratio": ratio, "server_alone_ratio": i["seconds"] / s["seconds"],
                              "hop_ratio": s["seconds"] / r["seconds"],
                              "ttft_p50_remote": r["ttft_p50"], "ttft_p50_inproc": i["ttft_p50"],
                              "ttft_p50_server": s["ttft_p50"], "same_text": r["texts"] == i["texts"]}
        print(f"users {n:3d}: remote {r['tokens'] / r['seconds']:8.1f} tok/s (ttft p50 {r['ttft_p50'] * 1000:6.1f} ms)"
              f" | in-process {i['tokens'] / i['seconds']:8.1f} tok/s (ttft p50 {i['ttft_p50'] * 1000:6.1f} ms)"
              f" | remote/in-process x{ratio:.3f} (target 0.9) | same text: {r['texts'] == i['texts']}", flush=True)
        print(f"           server alone {s['tokens'] / s['seconds']:8.1f} tok/s (ttft p50 {s['ttft_p50'] * 1000:6.1f} ms)"
              f" | server alone/in-process x{i['seconds'] / s['seconds']:.3f} | app hop (remote/server alone) "
              f"x{s['seconds'] / r['seconds']:.3f}", flush=True)
    if a.json:
        json.dump(report, open(a.json, "w"), indent=1)
    return report


if __name__ == "__main__":
    main()
