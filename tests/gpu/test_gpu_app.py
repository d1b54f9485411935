"""The app on TurboMind (marker ``gpu``; needs the gpu-kit's engine and ui parts on the GPU machine):
concurrent users stream at once and get their own answers; stop frees the slot."""
from __future__ import annotations

import json
import threading
import time

import pytest

pytestmark = [pytest.mark.gpu, pytest.mark.slow]
pytest.importorskip("gradio_client")

from tests.clients import first_output, streaming_clients, wait_released  # noqa: E402
from tests.conftest import AppProcess  # noqa: E402
from tests.ui.test_app import poll  # noqa: E402


@pytest.fixture(scope="module")
def tm_app(tiny_llama, tmp_path_factory):
    app = AppProcess(["--model", tiny_llama.path, "--engine", "turbomind", "--cache-max-entry-count", "0.2",
                      "--session-len", "4096", "--cache-dir", str(tmp_path_factory.mktemp("c"))], timeout=300)
    yield app
    app.stop()


def test_turbomind_app_serves_concurrent_users(tm_app):
    assert tm_app.client().predict(api_name="/engine_info")["backend"] == "turbomind"
    prompts = [f"Tell me about topic number {i}." for i in range(8)]
    p = {"temperature": 0, "max_new_tokens": 2000}  # TurboMind makes hundreds of tokens faster than a poll
    solo = [tm_app.client().predict([{"role": "user", "content": q}], p, api_name="/chat") for q in prompts[:2]]
    clients = [tm_app.client() for _ in prompts]    # connected before the start: a client takes ~0.1 s
    start = threading.Barrier(len(prompts))
    results, firsts, ends = {}, {}, {}

    def run(i):
        start.wait()
        job = clients[i].submit([{"role": "user", "content": prompts[i]}], p, api_name="/chat")
        outs, firsts[i], ends[i] = poll(job)
        results[i] = outs[-1]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
    [t.start() for t in threads]
    [t.join(300) for t in threads]
    assert len(results) == 8 and all(results.values())
    assert results[0][:20] == solo[0][:20] and results[1][:20] == solo[1][:20]
    # a random-weight model ends some replies early (its end-of-text token); the long ones must all
    # still be streaming when the last user's first text arrives (one after another, they would not)
    longest = max(len(r) for r in results.values())
    long_ends = [ends[i] for i, r in results.items() if len(r) >= longest / 2]
    assert max(firsts.values()) < min(long_ends), "all eight stream at the same time"


def test_stop_frees_the_slot_on_turbomind(tm_app):
    c = tm_app.client()
    job = c.submit([{"role": "user", "content": "Go on forever."}], {"temperature": 0.8, "max_new_tokens": 3000},
                   api_name="/chat")
    first_output(job)
    job.cancel()
    wait_released(c, 30)
    assert c.predict(api_name="/engine_info")["running"] == 0
    t0 = time.perf_counter()
    assert c.predict([{"role": "user", "content": "Hi"}], {"temperature": 0, "max_new_tokens": 8}, api_name="/chat")
    assert time.perf_counter() - t0 < 10


def _speed(client, n=3) -> float:
    """Median decode tokens/s of ``n`` greedy replies, from the app's own per-reply metrics."""
    import csv
    import statistics

    t0 = time.time()
    for _ in range(n):
        client.predict([{"role": "user", "content": "Tell me a long story about a lighthouse."}],
                       {"temperature": 0, "max_new_tokens": 256}, api_name="/chat")
    rows = [r for r in csv.DictReader(open(client.predict(api_name="/metrics_csv")))
            if float(r["time"]) >= t0 and int(r["tokens"]) > 1]
    return statistics.median(float(r["tokens_per_s"]) for r in rows)


def test_cancel_storm_of_200_streams_leaves_turbomind_at_full_speed(tm_app):
    """Issue #7: 200 streams cancelled mid-way, 100 by stop and 100 by dropped connections (client
    processes killed): no stuck session (ours or TurboMind's), and the next user is served at the
    speed of before (LMDeploy users saw TurboMind stall after such storms)."""
    c = tm_app.client()
    before = _speed(c, 7)
    msgs = [{"role": "user", "content": "Write a very long story about the sea."}]
    p = {"temperature": 0.8, "max_new_tokens": 4000}
    # a random-weight model ends some replies early, so the storm comes in waves until 200 streams
    # have been cancelled while running (counted by the app, just before each wave's cancel)
    cancelled, waves = 0, 0
    while cancelled < 200 and waves < 8:
        waves += 1
        groups = 4 if waves == 1 else 2          # 200 streams at once first, then top-ups of 100
        gone = [streaming_clients(tm_app.url, 25, msgs, p, timeout=300) for _ in range(groups)]
        clients = [tm_app.client() for _ in range(groups)]
        jobs = [cl.submit(msgs, dict(p, seed=100 * waves + i), api_name="/chat") for cl in clients for i in range(25)]
        deadline = time.time() + 120
        while not all(any(j.outputs()) or j.done() for j in jobs) and time.time() < deadline:
            time.sleep(0.05)
        running = c.predict(api_name="/engine_info")["running"]
        cancelled += running
        print(f"wave {waves}: {running} of {50 * groups} streams running when cancelled (half by stop, "
              "half by a dropped connection)", flush=True)
        for j in jobs:
            j.cancel()
        for g in gone:
            g.kill()
        freed = wait_released(c, 60)
    assert cancelled >= 200, cancelled
    assert c.predict(api_name="/engine_info")["running"] == 0, "every cancelled stream must be released"
    time.sleep(2.5)           # the load sampler's next readings: TurboMind's own scheduler view
    load = c.predict(api_name="/monitor_load")
    assert load and load[-1][1] == 0, f"TurboMind still runs requests: {load[-3:]}"
    after = _speed(c, 7)
    time.sleep(15)
    held = c.predict(api_name="/engine_info").get("engine_requests")   # ours and LMDeploy's own sessions
    later = _speed(c, 7)
    print(f"cancel storm: {cancelled} running streams cancelled in {waves} waves, the last released in "
          f"{freed:.1f} s; decode {before:.0f} tok/s before, {after:.0f} after ({after / before:.3f}), "
          f"{later:.0f} 15 s later ({later / before:.3f}); requests the engine still holds: {held}", flush=True)
    assert held == 0, f"requests (or LMDeploy sessions) left behind in the engine: {held}"
    # full speed again: right after the storm or 15 s later. On this 4-layer model a reply decodes at
    # ~2400 tok/s, Python-bound, and a median of 3 replies varied by +-13% between identical fresh
    # starts (H100, 2026-11-26: "before" 2079-2695 tok/s in six runs; after/before 0.69-1.23 and 15 s
    # later 0.65-1.21, no run slow in both, no session left in any). Medians of 7 replies now, and
    # 0.85: a stall of the kind LMDeploy's users saw (requests hanging, not 10% slower) fails this
    assert max(after, later) >= 0.85 * before
    assert tm_app.alive()


def _hog(leave_bytes: int):
    """Another process that takes all free GPU memory but ``leave_bytes`` (what a second user's
    notebook does to a shared GPU); kill it to give the memory back."""
    import subprocess
    import sys

    code = ("import sys, torch; free = torch.cuda.mem_get_info()[0]; "
            f"x = torch.empty(max(0, free - {leave_bytes}), dtype=torch.uint8, device='cuda'); "
            "print('held', x.numel(), flush=True); sys.stdin.read()")
    p = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().startswith("held")
    return p


def _gpu_used_by(pid: int) -> int:
    """GPU memory NVML counts for process ``pid`` (bytes)."""
    from engines.telemetry import gpu_processes

    procs = gpu_processes() or {}
    return sum(p["used"] for ps in procs.values() for p in ps if p["pid"] == pid)


def test_out_of_memory_is_a_clear_message_and_the_app_keeps_serving(tmp_path_factory):
    """Issue #7: out of memory during generation (Transformers on CUDA, a 60k-token prompt while
    another process holds the GPU) and during a load (a 1.8B model that cannot fit): clear messages,
    another user's stream goes on, and the app serves again once memory is back."""
    from gradio_client.exceptions import AppError

    from bench.models import build_llama

    from tests.conftest import AppProcess

    small = build_llama(str(tmp_path_factory.mktemp("m") / "awq-small-128k"), "awq-small", device="cuda",
                        dtype="bfloat16", max_pos=131072)
    big = build_llama("/tmp/turbostudio-bench-1.8b", "1.8b", device="cuda", dtype="bfloat16")
    app = AppProcess(["--model", small, "--engine", "transformers", "--device", "cuda", "--session-len", "131072",
                      "--max-input-chars", "1000000", "--cache-dir", str(tmp_path_factory.mktemp("c"))], timeout=300)
    hog = None
    try:
        c = app.client()
        story = [{"role": "user", "content": "Tell me a story."}]
        greedy = {"temperature": 0, "max_new_tokens": 300}
        solo = c.predict(story, greedy, api_name="/chat")
        baseline = _gpu_used_by(app.proc.pid)
        huge = [{"role": "user", "content": "word " * 60000 + "\nSummarize."}]
        assert c.predict(huge, {"temperature": 0, "max_new_tokens": 4}, api_name="/chat") is not None
        hog = _hog(int(1.5 * 2**30))
        other = app.client().submit(story, greedy, api_name="/chat")
        first_output(other)
        with pytest.raises(AppError, match="[Oo]ut of memory"):
            c.predict(huge, {"temperature": 0, "max_new_tokens": 4}, api_name="/chat")
        assert other.result(timeout=120)[:40] == solo[:40], "the other user's reply went on unharmed"
        assert c.predict(story, greedy, api_name="/chat")[:40] == solo[:40]
        # the failed prompt's memory went back to the GPU (another process, or a load, may use it)
        held = _gpu_used_by(app.proc.pid)
        print(f"app GPU memory: {baseline / 2**30:.2f} GiB before the long prompts, "
              f"{held / 2**30:.2f} GiB after the out-of-memory", flush=True)
        assert held < baseline + 2**30, (baseline, held)
        # a load that cannot fit: refused with the figures, the previous model back and serving. The
        # hog is taken again now: the app's memory pool from the first long prompt went back to the
        # GPU with the out-of-memory, so what a load would find free is the hog's 1.5 GiB plus what
        # unloading the small model gives back, less than the 1.8B's 3.4 GiB of weights
        hog.kill()
        hog.wait()
        hog = _hog(int(1.5 * 2**30))
        with pytest.raises(AppError, match="Not enough GPU memory"):
            c.predict(big, "turbomind", "auto", "auto", "hf", 0, 0.5, None, 1, api_name="/load_model")
        info = c.predict(api_name="/engine_info")
        assert info["backend"] == "transformers" and info["loaded"], info
        assert c.predict(story, greedy, api_name="/chat")[:40] == solo[:40]
        hog.kill()
        hog.wait()
        hog = None
        assert c.predict(huge, {"temperature": 0, "max_new_tokens": 4}, api_name="/chat") is not None
        assert app.alive()
    finally:
        if hog is not None:
            hog.kill()
        app.stop()


def _table(df) -> list[dict]:
    if isinstance(df, dict):
        return [dict(zip(df["headers"], row)) for row in df["data"]]
    return df


def test_quantize_page_job_card_and_one_click_load(tmp_path_factory):
    """Issue #4 through the UI's API on the GPU: an AWQ job from the Quantize page, its progress in
    the job list, the comparison card (sizes, memory, speed, KV int8/int4 rows, both answers), and
    the one-click load on TurboMind (model_format awq), which then answers."""
    from bench.models import build_llama

    from tests.conftest import AppProcess

    src = build_llama(str(tmp_path_factory.mktemp("q") / "awq-small-fp16"), "awq-small", device="cuda",
                      dtype="float16")
    app = AppProcess(["--model", src, "--engine", "turbomind", "--cache-max-entry-count", "0.1",
                      "--session-len", "4096", "--cache-dir", str(tmp_path_factory.mktemp("c"))], timeout=300)
    try:
        c = app.client()
        _, jid = c.predict(src, "awq-small-w4a16", "awq", 8, 256, 128, "bfloat16", None, "",
                           api_name="/quantize_start")
        states = []
        deadline = time.time() + 600
        while time.time() < deadline:
            row = next(r for r in c.predict(api_name="/quantize_jobs") if r[0] == jid)
            states.append(row[4])
            if not row[4].startswith(("queued", "running")):
                break
            time.sleep(0.5)
        print("job states seen:", sorted(set(states))[:12])
        assert row[4] == "done", row
        assert any(s.startswith("running") and "%" in s and not s.startswith("running 0%") for s in states)
        card, answers = c.predict(jid, "Explain in two sentences why the sky is blue.", True,
                                  api_name="/quantize_compare")
        rows = {r["model"]: r for r in _table(card)}
        print(json.dumps(rows, indent=1, default=str), answers)
        assert set(rows) == {"source", "result", "result, KV int8", "result, KV int4"}, rows.keys()
        assert rows["result"]["size on disk (GiB)"] < 0.75 * rows["source"]["size on disk (GiB)"]
        assert rows["result, KV int8"]["KV cache tokens"] > 1.8 * rows["result"]["KV cache tokens"]
        assert answers.count("**") >= 8, "four answers side by side"
        msg = c.predict(jid, api_name="/quantize_load")
        assert "turbomind" in msg, msg
        info = c.predict(api_name="/engine_info")
        assert info["backend"] == "turbomind" and "w4a16" in info["model"], info
        assert c.predict([{"role": "user", "content": "Hi"}], {"temperature": 0, "max_new_tokens": 16},
                         api_name="/chat")
    finally:
        app.stop()
