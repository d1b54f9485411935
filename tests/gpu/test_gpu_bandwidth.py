"""The Monitor's bandwidth meter on TurboMind (marker ``gpu``; LMDeploy from ../shared/gpu-kit).

A random-weight Llama of the 1.8B shape (bench/models.py; ``TURBOSTUDIO_BW_SHAPE`` picks another, e.g.
``llama2-7b-32k``) in bfloat16 on TurboMind, one reply at batch 1, streamed through the manager (the
one request path). The meter's figure must match, within 5%, tokens/s measured here from the stream
times the bytes computed by hand from the shape (every weight but the untied input embedding, in
2 bytes, plus the KV cache of the context: layers x 2 x kv_heads x head_dim x bytes per element,
1 byte and a 16-bit scale and zero per token and head with KV int8).

Run on the GPU machine (see tests/README.md for the kit):
    python3 -m pytest -m gpu -p no:cacheprovider -s tests/gpu/test_gpu_bandwidth.py
"""
from __future__ import annotations

import os
import time

import pytest

from engines.base import ChatMessage, ChatRequest, GenParams

pytestmark = [pytest.mark.gpu, pytest.mark.slow]
SHAPE = os.environ.get("TURBOSTUDIO_BW_SHAPE", "1.8b")
NEW_TOKENS = 256
PROMPTS = ["Write a long story about a lighthouse keeper and a storm.",
           "List every country in Europe with its capital, one per line.",
           "Explain how a compiler works, step by step, in detail."]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from bench.models import build_llama

    return build_llama(str(tmp_path_factory.mktemp("bw") / f"{SHAPE}-bf16"), SHAPE, device="cuda",
                       dtype="bfloat16")


def by_hand(shape: str) -> tuple[int, int]:
    """(weights a decode step reads, all weights) in bytes for a bench/models.py Llama shape in bf16:
    per layer q, o (hidden^2 each), k, v (hidden x kv_heads x head_dim each), gate, up, down
    (3 x hidden x intermediate), two norms; the final norm; the head (vocab x hidden). The input
    embedding (vocab x hidden, untied) is held but not read."""
    from bench.models import SHAPES, VOCAB, VOCABS

    hidden, inter, layers, heads, kv = SHAPES[shape]
    vocab, head_dim = VOCABS.get(shape, VOCAB), hidden // heads
    layer = 2 * hidden * hidden + 2 * hidden * kv * head_dim + 3 * hidden * inter + 2 * hidden
    read = layers * layer + hidden + vocab * hidden
    return 2 * read, 2 * (read + vocab * hidden)


def kv_by_hand(shape: str, quant_policy: int) -> int:
    from bench.models import SHAPES

    hidden, _, layers, heads, kv = SHAPES[shape]
    head_dim = hidden // heads
    per_elem = {0: 2 * head_dim, 8: head_dim + 2 * 2}[quant_policy]     # int8: + 16-bit scale and zero
    return layers * 2 * kv * per_elem


def stream_once(mgr, prompt: str) -> tuple[int, float, int]:
    """One reply at batch 1: (tokens, decode tokens/s measured from the stream, prompt tokens as the
    engine's tokenizer counts them apart from the stream)."""
    msgs = (ChatMessage("user", prompt),)
    n_prompt = mgr.token_cost(list(msgs))
    sub = mgr.submit(ChatRequest(msgs, GenParams(temperature=0, max_new_tokens=NEW_TOKENS)))
    first = last = None
    for d in sub:
        if d.tokens and first is None:
            first = (time.perf_counter(), d.tokens)
        if d.tokens:
            last = (time.perf_counter(), d.tokens)
    if first is None or last[1] - first[1] < 32:
        return (last[1] if last else 0), 0.0, 0
    rate = (last[1] - first[1]) / (last[0] - first[0])
    return last[1], rate, n_prompt


@pytest.mark.parametrize("quant_policy", [0, 8])
def test_meter_matches_tokens_per_s_times_bytes_by_hand(model_dir, tmp_path, quant_policy):
    from engines import bandwidth
    from engines.manager import EngineManager

    mgr = EngineManager(str(tmp_path / "cache"), {"cache_max_entry_count": 0.2, "session_len": 4096,
                                                  "quant_policy": quant_policy})
    info = mgr.load(model_dir, "turbomind")
    try:
        read, held = by_hand(SHAPE)
        print(f"\n{SHAPE} bf16 on TurboMind, quant_policy {quant_policy}, GPU {info.extra.get('gpu_name')}")
        print(f"weights: engine {info.extra['weights_bytes']:,} B held, by hand {held:,}; read per step by hand {read:,}")
        assert abs(info.extra["weights_bytes"] - held) / held < 0.01, "the checkpoint as stored is the weights"
        assert info.extra["kv_bytes_per_token"] == kv_by_hand(SHAPE, quant_policy)
        assert info.extra.get("gpu_name"), "the engine records its GPU"
        stream_once(mgr, "Hello!")                                   # warm-up, not measured
        for prompt in PROMPTS:                                       # random weights may end early
            tokens, rate, prompt_tokens = stream_once(mgr, prompt)
            if rate:
                break
        assert rate, f"no reply of 33 tokens or more from the random model ({tokens} tokens)"
        hand = (read + kv_by_hand(SHAPE, quant_policy) * (prompt_tokens + tokens / 2)) * rate
        reading = bandwidth.meter_reading(mgr.info(), mgr.metrics.items(), mgr.live())
        text = bandwidth.meter_text(mgr.info(), mgr.metrics.items(), mgr.live())
        print(text)
        print(f"stream: {tokens} tokens at {rate:.1f} tok/s after a {prompt_tokens}-token prompt; "
              f"by hand {hand / 1e9:.1f} GB/s, meter {reading.bytes_per_s / 1e9:.1f} GB/s "
              f"({reading.bytes_per_s / hand - 1:+.2%}); share of peak {reading.share}")
        assert reading.batch == pytest.approx(1.0), "one stream: batch 1"
        assert abs(reading.bytes_per_s - hand) / hand < 0.05
        recorded = mgr.metrics.items()[-1].prompt_tokens
        assert abs(recorded - prompt_tokens) <= 2, f"TurboMind's prompt count reaches the metrics ({recorded})"
        assert "at batch 1:" in text and bandwidth.rate_text(reading.bytes_per_s) in text
        if reading.peak_tbs:                                         # a GPU in the table (H100, H200 ...)
            assert 0 < reading.share < 1.0 and f"({reading.share:.0%})" in text
        else:
            assert "No datasheet peak" in text
    finally:
        mgr.unload()
