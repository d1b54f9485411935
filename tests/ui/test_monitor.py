"""Monitor page data: with and without NVML (no GPU here), the metrics history and its CSV."""
from __future__ import annotations

import csv
import io
import re
import sys
import time
import types

import pytest

from engines import telemetry


def test_without_a_gpu_the_panel_shows_cpu_and_says_why(monkeypatch):
    gpus, why = telemetry.gpu_status()
    assert gpus == [] and why == "No NVIDIA GPU"    # this machine has none; said in words, no NVML jargon
    c = telemetry.cpu_status()
    assert c["cores"] >= 1 and c["rss"] > 0


def test_with_nvml_the_panel_reads_each_gpu(monkeypatch):
    """A stand-in for the NVML library only (the device it reports is what the test controls)."""
    class Mem:
        used, total, free = 3 * 2**30, 80 * 2**30, 77 * 2**30

    fake = types.SimpleNamespace(
        nvmlInit=lambda: None, nvmlDeviceGetCount=lambda: 2, nvmlDeviceGetHandleByIndex=lambda i: i,
        nvmlDeviceGetName=lambda h: b"NVIDIA H100", nvmlDeviceGetMemoryInfo=lambda h: Mem,
        nvmlDeviceGetUtilizationRates=lambda h: types.SimpleNamespace(gpu=42),
        nvmlDeviceGetTemperature=lambda h, k: 55, NVML_TEMPERATURE_GPU=0,
        nvmlDeviceGetPowerUsage=lambda h: 300000)
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    gpus, why = telemetry.gpu_status()
    assert why == "" and len(gpus) == 2
    assert gpus[1] == {"index": 1, "name": "NVIDIA H100", "used": 3 * 2**30, "total": 80 * 2**30,
                       "util": 42, "temp": 55, "power_w": 300.0}


def test_metrics_csv_parses_and_counts_tokens():
    log = telemetry.MetricsLog(maxlen=3)
    for i in range(5):
        log.add(telemetry.ReplyMetrics(time=i, session="s", backend="transformers", model="m", prompt_tokens=10,
                                       tokens=11, ttft=0.1, seconds=1.1, finish_reason="stop"))
    assert len(log.items()) == 3, "the history is bounded"
    rows = list(csv.DictReader(io.StringIO(telemetry.metrics_csv(log.items()))))
    assert len(rows) == 3 and rows[0]["tokens"] == "11"
    assert float(rows[0]["tokens_per_s"]) == pytest.approx(10 / 1.0)


@pytest.mark.slow
def test_monitor_panel_and_csv_through_the_app(app_server):
    c = app_server.client()
    c.predict([{"role": "user", "content": "Say hi."}], {"temperature": 0, "max_new_tokens": 6}, api_name="/chat")
    text = c.predict(api_name="/monitor_panel")
    assert "SmolLM2-135M-Instruct" in text and "No NVIDIA GPU: showing CPU and RAM" in text
    assert "NVML" not in text
    # the bandwidth meter has no figure on a CPU and says why, in a sentence (engines/bandwidth.py)
    assert BANDWIDTH_ON_CPU in text.replace("**", ""), text
    path = c.predict(api_name="/metrics_csv")
    rows = list(csv.DictReader(open(path)))
    done = [r for r in rows if r["finish_reason"] in ("stop", "length")]   # not stopped before a token
    assert done and all(int(r["tokens"]) >= 1 for r in done)
    assert all(int(r["prompt_tokens"]) > 5 for r in done), "the engine's prompt count is recorded"
    assert {"ttft", "tokens_per_s", "backend"} <= set(rows[0])


BANDWIDTH_ON_CPU = ("Memory bandwidth: not measured on the CPU: the meter compares the bytes a decoded token "
                    "reads (weights plus KV cache) with a GPU's datasheet memory bandwidth, and this model runs "
                    "without a GPU.")


@pytest.mark.slow
@pytest.mark.browser
def test_bandwidth_meter_says_why_it_has_no_figure_in_the_browser(app_server, browser):
    """On the Monitor page in Chromium, after a reply: the meter's line is the reason, not an empty box."""
    pytest.importorskip("playwright.sync_api")
    from tests.ui.browser import open_page, shot

    app_server.client().predict([{"role": "user", "content": "Say hi."}], {"temperature": 0, "max_new_tokens": 8},
                                api_name="/chat")
    pg = open_page(browser, app_server.url, width=1400)
    try:
        pg.wait_for_selector("#header", timeout=30000)
        pg.get_by_role("tab", name="Monitor").click()
        pg.wait_for_function("() => document.querySelector('#monitor-panel').innerText.includes('Memory bandwidth')",
                             timeout=20000)
        text = pg.inner_text("#monitor-panel")
        assert BANDWIDTH_ON_CPU in text, text       # bold markdown: the page shows the words, no asterisks
        assert pg.get_by_text("not measured on the CPU", exact=False).first.is_visible()
        shot(pg, "monitor-bandwidth")
    finally:
        pg.close()


@pytest.mark.slow
def test_load_test_through_the_app(app_server):
    import json

    c = app_server.client()
    text, jpath, cpath = c.predict(3, 4, 16, api_name="/load_test")
    data = json.load(open(jpath))
    s, rows = data["summary"], data["rows"]
    assert s["users"] == 3 and s["errors"] == 0 and s["requests"] == len(rows) >= 3
    assert s["tokens"] == sum(r["tokens"] for r in rows), "tokens counted equal tokens generated"
    assert all(1 <= r["tokens"] <= 16 for r in rows)
    assert s["ttft_samples"] == s["requests"] and 0 < s["ttft_p50"] <= s["ttft_max"] < 30
    assert s["itl_samples"] > 0 and 0 < s["itl_p50"] <= s["itl_max"]
    for key in ("ttft", "itl"):      # a p99 only where it rests on enough samples
        p99 = s[f"{key}_p99"]
        assert (p99 is None) == (s[f"{key}_samples"] < 100) and (p99 is None or s[f"{key}_p50"] <= p99)
    assert abs(s["tokens_per_s"] - s["tokens"] / s["seconds"]) < 0.1
    assert "tokens/s" in text and f"({s['requests']} replies" in text
    assert "too few for a p99" in text or "p99" in text
    assert len(list(csv.DictReader(open(cpath)))) == len(rows)


@pytest.mark.slow
def test_engine_comparison_through_the_app(app_server):
    import json

    c = app_server.client()
    table, plot, jpath, cpath = c.predict(["transformers", "turbomind"], "", 12, 2, 2, api_name="/compare_engines")
    rows = json.load(open(jpath))["rows"]
    hf = next(r for r in rows if r["engine"] == "transformers")
    assert hf["requests"] == 4 and hf["errors"] == 0 and hf["tokens_per_s"] > 0 and hf["words_per_s"] > 0
    assert hf["tokens"] <= 4 * 12
    tm = next(r for r in rows if r["engine"] == "turbomind")
    assert "CUDA" in tm["error"] or "LMDeploy" in tm["error"], "no GPU here: a clear reason, not a crash"
    assert len(list(csv.DictReader(open(cpath)))) == 2


@pytest.mark.slow
def test_kv_sweep_without_a_gpu_says_why_per_setting(app_server):
    c = app_server.client()
    table, plot = c.predict(0, 8, api_name="/kv_sweep")
    rows = [dict(zip(table["headers"], r)) for r in table["data"]]
    assert [(r["setting"], r["batch"]) for r in rows] == [("cache 0.8", 1), ("cache 0.8", 16), ("cache 0.5", 1),
                                                         ("cache 0.5", 16), ("cache 0.01", 1), ("cache 0.01", 16)]
    assert all("CUDA" in str(r.get("error")) or "LMDeploy" in str(r.get("error")) for r in rows)
    assert app_server.alive()


def test_memory_breakdown_splits_weights_cache_and_others():
    from engines.base import EngineInfo
    from ui.monitor import memory_breakdown

    G = 2**30
    info = EngineInfo(backend="turbomind", model="m", model_path="/m", device="cuda", dtype="bf16",
                      context_length=4096, extra={"weights_bytes": 13 * G, "tp": 1})
    g = {"index": 0, "used": 60 * G, "total": 80 * G}
    line = memory_breakdown(g, [{"pid": 10, "used": 50 * G}, {"pid": 99, "used": 8 * G}], {10}, info, 1)
    assert "this app 50.0 GiB" in line and "weights ~13.0 GiB" in line and "KV cache and workspace ~37.0 GiB" in line
    assert "other processes 8.0 GiB" in line and "driver and unattributed 2.0 GiB" in line
    hidden = memory_breakdown(g, [], {10}, info, 1)
    assert "not visible" in hidden and "13.0 GiB" in hidden
    tp2 = EngineInfo(**{**info.__dict__, "extra": {"weights_bytes": 13 * G, "tp": 2}})
    assert "weights ~6.5 GiB" in memory_breakdown(g, [{"pid": 10, "used": 50 * G}], {10}, tp2, 2)


@pytest.mark.slow
def test_running_requests_are_sampled_for_the_plot(app_server):
    import time

    c = app_server.client()
    job = c.submit([{"role": "user", "content": "Write a long story about a dragon."}],
                   {"temperature": 0.7, "max_new_tokens": 300}, api_name="/chat")
    deadline = time.time() + 60
    seen = 0
    while time.time() < deadline and not job.done():
        seen = max([r for _, r, _ in c.predict(api_name="/monitor_load")] + [0])
        if seen >= 1:
            break
        time.sleep(0.5)
    job.cancel()
    assert seen >= 1, "the 1 Hz sampler saw the running request"
    samples = c.predict(api_name="/monitor_load")
    assert len(samples) >= 2 and all(s[0] <= 0 for s in samples)


def test_percentiles_say_how_many_samples_they_rest_on():
    from engines.loadtest import P99_MIN_SAMPLES, RequestResult, summarize
    from ui.monitor import load_test_text

    few = [RequestResult(ttft=0.1 * (i + 1), seconds=1.0, tokens=5, words=3, gaps=[0.02] * 4) for i in range(2)]
    s = summarize(few, 2.0)
    assert s["ttft_samples"] == 2 and s["ttft_p99"] is None and s["ttft_max"] == pytest.approx(0.2)
    assert s["itl_samples"] == 8 and s["itl_p99"] is None
    text = load_test_text({**s, "users": 2, "cancelled": False})
    assert "max 200 ms (2 replies: too few for a p99)" in text and "(8 gaps: too few for a p99)" in text
    many = [RequestResult(ttft=0.001 * i, seconds=1.0, tokens=2, words=1, gaps=[0.01]) for i in range(P99_MIN_SAMPLES)]
    s = summarize(many, 2.0)
    assert s["ttft_samples"] == P99_MIN_SAMPLES and s["ttft_p99"] == pytest.approx(0.098)
    assert f"({P99_MIN_SAMPLES} replies)" in load_test_text({**s, "users": 1, "cancelled": False})


def test_load_test_progress_counts_replies_done_of_expected():
    from engines.loadtest import expected_replies, progress_line

    # before any reply ended there is no pace: nothing is made up, the replies under way are said
    assert expected_replies(0, 2, 2, 1.0, 3.0) is None
    frac, words = progress_line(0, None, 2, 1.0, 3.0)
    assert frac == 0.0 and words == "0 replies done, 2 under way · 1 of 3 s"
    # 3 done in 2 s by 2 users: ~1.3 s a reply, so ~2 more starts in the last second
    assert expected_replies(3, 2, 2, 2.0, 3.0) == 7
    assert progress_line(3, 7, 2, 2.0, 3.0)[1] == "3 of ~7 replies · 2 of 3 s"
    # time is up: exactly the done and the running ones, never 100% while replies still run
    assert expected_replies(5, 2, 2, 4.0, 3.0) == 7
    frac, words = progress_line(5, 7, 2, 4.0, 3.0)
    assert frac == pytest.approx(5 / 7) and words == "5 of 7 replies: time is up, the last 2 finishing"
    assert progress_line(7, 7, 0, 5.0, 3.0) == (1.0, "7 of 7 replies")


def test_load_test_reports_progress_in_replies():
    import threading

    from engines.base import Delta, GenParams
    from engines.loadtest import load_test

    class Sub:
        def __init__(self):
            time.sleep(0.05)

        def __iter__(self):
            yield Delta("hi ", 1)
            time.sleep(0.2)
            yield Delta("there", 2, finish_reason="stop")

        def abort(self):
            pass

    calls = []
    res = load_test(lambda req: Sub(), users=2, seconds=0.6, params=GenParams(max_new_tokens=2),
                    cancel=threading.Event(), progress=lambda f, m: calls.append((f, m)))
    assert res["requests"] >= 2 and res["errors"] == 0
    assert all(0.0 <= f <= 1.0 for f, _ in calls)
    assert all("replies" in m for _, m in calls) and not any("so far" in m for _, m in calls)
    done = [m for _, m in calls if "time is up" in m]
    assert not done or all(re.match(r"\d+ of \d+ replies", m) for m in done)


def test_engine_facts_in_human_units():
    from engines.telemetry import human_bytes
    from ui.engines import context_tokens, details

    assert human_bytes(538060032) == "513 MiB" and human_bytes(3 * 2**30) == "3.0 GiB"
    line = details({"weights_bytes": 538060032, "load_seconds": 1.43, "architecture": "LlamaForCausalLM",
                    "quant_policy": 8, "cache_max_entry_count": 0.5, "tp": 2})
    assert "weights 513 MiB" in line and "loaded in 1.4 s" in line and "KV cache int8" in line
    assert "50% of free GPU memory" in line and "on 2 GPUs" in line and "_" not in line
    # the bandwidth meter's inputs (a Transformers engine's extra, as the built-in model loads) are
    # not shown raw: "kv bytes per token 46080.0 · kv format 32-bit · weights unread bytes 0" was
    line = details({"batching": "continuous", "kv_bytes_per_token": 46080.0, "kv_format": "32-bit",
                    "weights_unread_bytes": 0, "moe_experts": 0, "weights_bytes": 538060032})
    assert line == "continuous batching · KV cache 45 KiB per token · weights 513 MiB", line
    assert context_tokens("") is None and context_tokens(None) is None and context_tokens("4096") == 4096
    with pytest.raises(ValueError, match="whole number"):
        context_tokens("abc")


def test_a_page_refusal_is_a_warning_and_the_page_stays(recwarn):
    """The page's own events (ui.engines.page_event): a refusal gives a warning, its reason in the
    page's notice line and every other output skipped (as it was); a fault stays an error; the
    API twin of the same function raises (tested through the app in test_ownership and test_app)."""
    import gradio as gr

    from ui.common import Refusal
    from ui.engines import page_event

    a, b, note = object(), object(), object()

    def refused():
        raise Refusal("Give the model the server should serve.", title="No model")

    run, every = page_event(refused, [a, b], notice=note)
    assert every == [a, b, note]
    out = run()
    assert out[0] == gr.skip() and out[1] == gr.skip() and out[2].startswith("⚠") and "Give the model" in out[2]

    def fault():
        raise gr.Error("Internal error (KeyError): 'x'")      # a fault: its traceback is logged

    with pytest.raises(gr.Error):
        page_event(fault, [a])[0]()
    run, every = page_event(lambda: ("x", "y"), [a, b], after=lambda got: ["then"], after_outputs=[note],
                            shape=lambda got: (got[0].upper(), got[1]))
    assert run() == ("X", "y", "then")
