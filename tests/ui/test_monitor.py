"""Monitor page data: with and without NVML (no GPU here), the metrics history and its CSV."""
from __future__ import annotations

import csv
import io
import sys
import types

import pytest

from engines import telemetry


def test_without_a_gpu_the_panel_shows_cpu_and_says_why(monkeypatch):
    gpus, why = telemetry.gpu_status()
    assert gpus == [] and "no GPU" in why          # this machine has none
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
    assert "SmolLM2-135M-Instruct" in text and "no GPU found" in text and "RAM" in text
    path = c.predict(api_name="/metrics_csv")
    rows = list(csv.DictReader(open(path)))
    done = [r for r in rows if r["finish_reason"] in ("stop", "length")]   # not stopped before a token
    assert done and all(int(r["tokens"]) >= 1 for r in done)
    assert {"ttft", "tokens_per_s", "backend"} <= set(rows[0])


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
    assert 0 < s["ttft_p50"] <= s["ttft_p99"] < 30 and 0 < s["itl_p50"] <= s["itl_p99"]
    assert abs(s["tokens_per_s"] - s["tokens"] / s["seconds"]) < 0.1
    assert "tokens/s" in text and "p99" in text
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
