"""The bandwidth meter's arithmetic (engines/bandwidth.py) against hand computations, and the figures
the engines report for it. Pure logic except the one Transformers test (slow: it loads a model)."""
from __future__ import annotations

import pytest

from engines import bandwidth as bw
from engines.base import EngineInfo
from engines.telemetry import ReplyMetrics

# Llama-2-7B with its own 32 000-token vocabulary (bench/models.py "llama2-7b-32k"), as config.json has it
LLAMA2_7B = {"architectures": ["LlamaForCausalLM"], "hidden_size": 4096, "intermediate_size": 11008,
             "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
             "vocab_size": 32000, "tie_word_embeddings": False, "torch_dtype": "bfloat16"}

# by hand: per layer q,k,v,o 4 x 4096^2 + gate,up,down 3 x 4096 x 11008 + two norms 2 x 4096
LAYER = 4 * 4096 * 4096 + 3 * 4096 * 11008 + 2 * 4096          # 202 383 360
EMBED = 32000 * 4096                                           # 131 072 000 (input table; the head the same)
PARAMS = EMBED + 32 * LAYER + 4096 + EMBED                     # 6 738 415 616
BF16_BYTES = 2 * PARAMS                                        # 13 476 831 232 = 13.5 GB
KV_BF16 = 32 * 2 * 32 * 128 * 2                                # layers x (K, V) x heads x head_dim x 2 bytes


def reply(end, *, tokens, rate, ttft=0.05, prompt=40, model="llama", backend="turbomind", source="api",
          finish="length"):
    """A finished reply whose decode ran at ``rate`` tokens/s (tokens after the first)."""
    return ReplyMetrics(time=end, session="s", backend=backend, model=model, prompt_tokens=prompt, tokens=tokens,
                        ttft=ttft, seconds=ttft + (tokens - 1) / rate, finish_reason=finish, source=source)


def gpu_info(extra=None, **kw) -> EngineInfo:
    facts = {"weights_bytes": BF16_BYTES, "tp": 1, **bw.lmdeploy_facts(LLAMA2_7B, 0, "hf"),
             "gpu_name": "NVIDIA H200", "gpu_capability": (9, 0)}
    return EngineInfo(**{"backend": "turbomind", "model": "llama", "device": "cuda", "dtype": "bfloat16",
                         "extra": {**facts, **(extra or {})}, **kw})


def test_issue_example_13_5_gb_x_212_8_tok_s_is_60_percent_of_the_h200():
    """The issue's figure, weights as stored and nothing else: 13.5 GB x 212.8 tok/s = 2.87 TB/s."""
    model = bw.ModelBytes(weights=int(13.5e9), kv_per_token=0)
    r = bw.measure(model, [bw.Stream(0.0, 1.0, 212, 100)], gpu_name="NVIDIA H200", now=1.0)
    r = bw.Reading(**{**r.__dict__, "steps_per_s": 212.8})
    assert r.bytes_per_s == pytest.approx(13.5e9 * 212.8)
    assert r.share == pytest.approx(13.5e9 * 212.8 / 4.8e12)          # 0.5985
    assert "(60%)" in r.text() and "13.5 GB per token × 212.8 tok/s (H200 SXM 141 GB)" in r.text()


def test_llama2_7b_bf16_on_the_h200_by_hand():
    """One reply at batch 1: 257 tokens (256 decoded) at 212.8 tok/s after a 40-token prompt."""
    assert BF16_BYTES == 13_476_831_232
    facts = bw.lmdeploy_facts(LLAMA2_7B, 0, "hf")
    assert facts["kv_bytes_per_token"] == KV_BF16 == 524_288
    assert facts["weights_unread_bytes"] == 2 * EMBED          # the input table: one row per token is read
    assert facts["weights_format"] == "bfloat16" and facts["kv_format"] == "16-bit"
    r = reply(100.0, tokens=257, rate=212.8)
    text = bw.meter_text(gpu_info(), [r], now=103.0)
    weights = BF16_BYTES - 2 * EMBED                            # 13 214 687 232
    kv = KV_BF16 * (40 + 257 / 2)                               # mean context over the reply
    expect = (weights + kv) * 212.8                             # bytes/s
    reading = bw.measure(bw.ModelBytes.from_extra(gpu_info().extra), [bw.stream_of_reply(r)],
                         gpu_name="NVIDIA H200", capability=(9, 0), now=103.0)
    assert reading.steps_per_s == pytest.approx(212.8)
    assert reading.bytes_per_s == pytest.approx(expect)
    assert reading.share == pytest.approx(expect / 4.8e12) and 0.58 < reading.share < 0.60
    assert text.startswith("**Memory bandwidth** at batch 1: 2.83 TB/s of 4.80 TB/s peak (59%)")
    assert "13.3 GB per token × 212.8 tok/s (H200 SXM 141 GB)" in text
    assert ("weights 13.2 GB (bfloat16; 13.5 GB held less 262.1 MB a step does not read: the input embedding "
            "table) + KV cache 88.3 MB (16-bit, 168 tokens of context)") in text
    assert "3 s ago" in text


def test_awq_int4_weights_by_hand():
    """AWQ W4A16, group 128: int4 weights, a 16-bit scale and a packed int4 zero per 128 inputs of
    each output; norms, embedding and head stay 16-bit. 0.29x the bf16 bytes, as the issue measured."""
    linear = 4 * 4096 * 4096 + 3 * 4096 * 11008
    per_layer = linear // 2 + linear // 128 * 2 + linear // 128 // 2 + 2 * 4096 * 2
    awq = 32 * per_layer + 2 * EMBED * 2 + 4096 * 2
    assert awq == 3_889_307_648 and round(awq / BF16_BYTES, 2) == 0.29
    info = gpu_info({"weights_bytes": awq, **bw.lmdeploy_facts({**LLAMA2_7B, "quantization_config":
                                                                 {"quant_method": "awq"}}, 0, "awq")})
    r = reply(50.0, tokens=257, rate=141.0, prompt=0)
    reading = bw.measure(bw.ModelBytes.from_extra(info.extra), [bw.stream_of_reply(r)], gpu_name="NVIDIA H200")
    expect = (awq - 2 * EMBED + KV_BF16 * 257 / 2) * 141.0
    assert reading.bytes_per_s == pytest.approx(expect)
    assert reading.share == pytest.approx(expect / 4.8e12)      # ~0.11: W4A16 is far from the limit on Hopper
    assert "weights 3.6 GB (awq; 3.9 GB held less 262.1 MB" in bw.meter_text(info, [r], now=51.0)


def test_kv_bytes_per_token_by_quant_policy():
    """int8 / int4 KV: 1 or 0.5 bytes an element, plus a 16-bit scale and zero per token and head."""
    assert bw.kv_bytes_per_token(32, 32, 128, 0) == 32 * 2 * 32 * 128 * 2 == 524_288
    assert bw.kv_bytes_per_token(32, 32, 128, 8) == 32 * 2 * 32 * (128 * 1 + 2 * 2) == 270_336
    assert bw.kv_bytes_per_token(32, 32, 128, 4) == 32 * 2 * 32 * (128 // 2 + 2 * 2) == 139_264
    assert bw.kv_bytes_per_token(32, 32, 128, 16) == 32 * 2 * 32 * 128 == 262_144        # fp8: no per-token params
    assert bw.kv_bytes_per_token(32, 32, 128, 42) == 32 * 32 * (64 + 4 + 32 + 2) == 104_448  # K 4-bit, V 2-bit
    assert bw.kv_bytes_per_token(4, 2, 64, 0, elem_bytes=4) == 4 * 2 * 2 * 64 * 4   # a float32 model
    # Llama-3-8B: grouped-query attention, 8 KV heads
    assert bw.kv_bytes_from_config({"num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
                                    "hidden_size": 4096}) == 131_072
    assert bw.kv_bytes_from_config({"num_hidden_layers": 2, "num_attention_heads": 4, "head_dim": 96,
                                    "hidden_size": 256}) == 2 * 2 * 4 * 96 * 2        # head_dim given apart
    assert bw.kv_bytes_from_config({"kv_lora_rank": 512, "num_hidden_layers": 2, "num_attention_heads": 4}) is None
    with pytest.raises(ValueError, match="quant_policy"):
        bw.kv_bytes_per_token(32, 32, 128, 3)


def test_int8_kv_in_the_meter_at_a_long_context():
    """At 8k tokens of context the 7B's KV is a third of the weights in 16-bit; int8 roughly halves it."""
    r = reply(10.0, tokens=101, rate=180.0, prompt=8000)
    ctx = 8000 + 101 / 2
    for qp, per_token in ((0, KV_BF16), (8, 270_336)):
        info = gpu_info(bw.lmdeploy_facts(LLAMA2_7B, qp))
        reading = bw.measure(bw.ModelBytes.from_extra(info.extra), [bw.stream_of_reply(r)], gpu_name="NVIDIA H200")
        assert reading.kv_read == pytest.approx(per_token * ctx)
        assert reading.bytes_per_s == pytest.approx((BF16_BYTES - 2 * EMBED + per_token * ctx) * 180.0)
    text = bw.meter_text(gpu_info(bw.lmdeploy_facts(LLAMA2_7B, 8)), [r], now=10.0)
    assert "KV cache 2.2 GB (int8, 8,050 tokens of context)" in text and "just now" in text


def test_batch_above_one_reads_the_weights_once_per_step():
    """Three streams: the measured one (10-12 s, 200 tokens: 100 steps/s), one beside it the whole
    time, one that joined half way. Batch 2.5; bytes per step = weights + the KV of all of them."""
    model = bw.ModelBytes(weights=10 * 10**9, kv_per_token=1_000_000, unread=0)
    last = bw.Stream(10.0, 12.0, 200, 500)
    beside = bw.Stream(10.0, 11.9, 190, 300)
    joined = bw.Stream(11.0, 13.0, 50, 100)          # still running: ends "now"
    far = bw.Stream(0.0, 5.0, 100, 9999)              # before: no overlap, not in the batch
    r = bw.measure(model, [far, beside, last], [joined], gpu_name="NVIDIA H100 80GB HBM3", now=13.0)
    assert r.steps_per_s == pytest.approx(100.0)
    assert r.batch == pytest.approx(1 + 0.95 + 0.5)
    ctx = 500 + 0.95 * 300 + 0.5 * 100
    assert r.kv_read == pytest.approx(1e6 * ctx)
    assert r.bytes_per_s == pytest.approx((10e9 + 1e6 * ctx) * 100.0)
    assert r.share == pytest.approx(r.bytes_per_s / 3.35e12)
    text = r.text()
    assert text.startswith("**Memory bandwidth** at batch 2.5:") and "per step × 100.0 steps/s (H100 SXM)" in text
    assert "read once for all 2.5 streams" in text and "245.0 tokens/s in all" in text


def test_tensor_parallel_adds_the_gpus_peaks():
    model = bw.ModelBytes(weights=int(140e9), kv_per_token=0, tp=2)
    r = bw.measure(model, [bw.Stream(0, 1, 30, 10)], gpu_name="NVIDIA H200", now=1)
    assert r.peak_bytes_per_s == 2 * 4.8e12 and r.share == pytest.approx(140e9 * 30 / 9.6e12)
    assert "of 9.60 TB/s peak" in r.text() and "(2 × H200 SXM 141 GB)" in r.text()


def test_an_unknown_gpu_gets_gb_per_s_and_the_reason():
    model = bw.ModelBytes(weights=int(1e9), kv_per_token=0)
    r = bw.measure(model, [bw.Stream(0, 1, 100, 10)], gpu_name="Acme Tensor 9000", now=1)
    assert r.share is None and r.peak_bytes_per_s is None
    text = r.text()
    assert "100 GB/s" in text and "%" not in text
    assert "No datasheet peak for Acme Tensor 9000 (not in the studio's GPU table), so no share of it" in text


def test_which_replies_the_meter_measures():
    """The most recent reply of the loaded model and backend, long enough, not an error, not a scratch
    engine's (comparison, Quantize card, KV probe); none in the window: it says what it waits for."""
    info = gpu_info()
    good = reply(100.0, tokens=65, rate=200.0)
    later = [reply(101.0, tokens=65, rate=50.0, model="other"),
             reply(101.5, tokens=65, rate=50.0, backend="pytorch"),
             reply(102.0, tokens=65, rate=50.0, source="compare"),
             reply(102.5, tokens=65, rate=50.0, source="quantize"),
             reply(103.0, tokens=bw.MIN_TOKENS - 1, rate=50.0),
             reply(103.5, tokens=65, rate=50.0, finish="error")]
    text = bw.meter_text(info, [good, *later], now=104.0)
    assert "× 200.0 tok/s" in text and "at batch 1:" in text     # none of the later ones overlapped it
    empty = bw.meter_text(info, later, now=104.0)
    assert empty.startswith("**Memory bandwidth:** no reply of 8 tokens or more in the last 10 minutes")
    assert bw.meter_text(info, [good], now=100.0 + bw.WINDOW_S + 1) == bw.meter_text(info, [], now=0)


def test_without_a_figure_the_meter_says_why():
    cpu = EngineInfo(backend="transformers", model="m", device="cpu", extra={"weights_bytes": 10**8,
                                                                             "kv_bytes_per_token": 1000})
    assert bw.meter_text(cpu, [reply(1, tokens=50, rate=20, backend="transformers", model="m")], now=2) == (
        "**Memory bandwidth:** not measured on the CPU: the meter compares the bytes a decoded token reads "
        "(weights plus KV cache) with a GPU's datasheet memory bandwidth, and this model runs without a GPU.")
    remote = EngineInfo(backend="remote", model="http://h:23333", device="remote", extra={"server": "http://h:23333"})
    text = bw.meter_text(remote, [], now=0)
    assert "remote engine" in text and "another server" in text and "h:23333" not in text
    assert bw.meter_text(None, []) == "**Memory bandwidth:** no model is loaded."
    bare = gpu_info()
    del bare.extra["kv_bytes_per_token"]
    assert "did not report the size of its weights and KV cache" in bw.meter_text(bare, [])


def test_facts_from_configs():
    tied = bw.lmdeploy_facts({**LLAMA2_7B, "tie_word_embeddings": True})
    assert tied["weights_unread_bytes"] == 0              # the tied table is read in full, as the head
    vlm = {"architectures": ["LlavaForConditionalGeneration"], "text_config": {**LLAMA2_7B}}
    assert bw.lmdeploy_facts(vlm)["kv_bytes_per_token"] == KV_BF16
    assert bw.lmdeploy_facts({**LLAMA2_7B, "quantization_config": {"quant_method": "fp8"}})["weights_format"] == "fp8"
    assert bw.lmdeploy_facts({**LLAMA2_7B, "torch_dtype": "float32"})["weights_format"] == "16-bit, from float32"
    moe = bw.lmdeploy_facts({**LLAMA2_7B, "num_local_experts": 8, "num_experts_per_tok": 2})
    assert moe["moe_experts"] == (2, 8)
    info = gpu_info(moe)
    text = bw.meter_text(info, [reply(5, tokens=20, rate=100)], now=5)
    assert "a token reads 2 of 8, so this is an upper bound" in text
    assert bw.lmdeploy_facts(None) == {}
    assert "kv_bytes_per_token" not in bw.lmdeploy_facts({"num_hidden_layers": 2})      # no heads: unknown
    assert bw.lmdeploy_facts({"num_hidden_layers": "x", "num_attention_heads": 4, "hidden_size": 256}) == {}


def test_gpu_table_tells_gh200_from_h200():
    from engines.gpus import gpu_spec

    assert gpu_spec("NVIDIA H200").peak_bandwidth_tbs == 4.8
    assert gpu_spec("NVIDIA GH200 144G HBM3e").peak_bandwidth_tbs == 4.9


@pytest.mark.slow
def test_transformers_reports_its_bytes_and_the_prompt(tiny_llama, tmp_path):
    """The tiny Llama (float32 on the CPU) through the manager: the KV bytes per token and the unread
    input embedding match a hand computation, the reply's prompt tokens reach the metrics, and the
    meter says why it has no figure on a CPU."""
    from engines.base import ChatMessage, ChatRequest, GenParams
    from engines.manager import EngineManager

    mgr = EngineManager(str(tmp_path / "cache"))
    info = mgr.load(tiny_llama.path, "transformers", device="cpu", dtype="float32")
    try:
        # bench/models.py "tiny": hidden 256, 4 layers, 4 heads, 2 KV heads, 49 152 vocabulary, untied
        assert info.extra["kv_bytes_per_token"] == 4 * 2 * 2 * (256 // 4) * 4
        assert info.extra["weights_unread_bytes"] == 49152 * 256 * 4
        assert info.extra["kv_format"] == "32-bit" and "gpu_name" not in info.extra
        n = mgr.token_cost([ChatMessage("user", "Count to ten.")])
        sub = mgr.submit(ChatRequest((ChatMessage("user", "Count to ten."),),
                                     GenParams(temperature=0, max_new_tokens=12)))
        sub.text()
        m = mgr.metrics.items()[-1]
        assert m.prompt_tokens == n > 0, "the engine's prompt count reaches the metrics"
        assert "not measured on the CPU" in bw.meter_text(info, mgr.metrics.items(), mgr.live())
    finally:
        mgr.unload()
