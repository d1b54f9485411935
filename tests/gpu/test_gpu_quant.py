"""Quantization on the GPU (marker ``gpu``; LMDeploy from ../shared/gpu-kit): the app's AWQ job end to
end (LMDeploy's auto_awq in the job runner's subprocess), the result on TurboMind against its fp16
source, and KV-cache int8/int4 holding more tokens."""
from __future__ import annotations

import json
import os

import pytest

pytestmark = [pytest.mark.gpu, pytest.mark.slow]


@pytest.fixture(scope="module")
def fp16_model(tmp_path_factory):
    from bench.models import build_llama

    return build_llama(str(tmp_path_factory.mktemp("q") / "awq-small-fp16"), "awq-small", device="cuda",
                       dtype="float16")


def test_awq_job_end_to_end_then_turbomind(fp16_model, tmp_path):
    from engines.quantize import JobRunner, measure_model

    runner = JobRunner(str(tmp_path / "data"))
    out = str(tmp_path / "data" / "models" / "awq-small-w4a16")
    seen = []
    try:
        job = runner.submit("awq", fp16_model, out, {"samples": 8, "seqlen": 256, "group_size": 128})
        import time

        deadline = time.time() + 600
        while runner.get(job.id).state not in ("done", "failed", "cancelled") and time.time() < deadline:
            j = runner.get(job.id)
            if j.total:
                seen.append((j.done, j.total, j.stage))
            time.sleep(0.2)
        job = runner.get(job.id)
        print(runner.read_log(job.id)[-3000:])
        assert job.state == "done", job.error
    finally:
        runner.close()
    assert seen and any(s[2] == "quantizing linears" for s in seen), "progress came per layer and linear"
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert cfg["quantization_config"]["quant_method"] == "awq" and cfg["quantization_config"]["bits"] == 4
    assert not os.path.exists(out + ".partial")
    prompt = "Explain in two sentences why the sky is blue."
    src = measure_model(fp16_model, label="fp16", cache_dir=str(tmp_path / "c"), prompt=prompt, batches=(1,),
                        new_tokens=64, engine="turbomind")
    q = measure_model(out, label="w4a16", cache_dir=str(tmp_path / "c"), model_format="awq", prompt=prompt,
                      batches=(1,), new_tokens=64, engine="turbomind")
    print(json.dumps([src, q], indent=1))
    assert q["backend"] == "turbomind" and q["answer"], "the W4A16 model loads on TurboMind and answers"
    assert q["size on disk (GiB)"] < 0.75 * src["size on disk (GiB)"]
    # GPU memory is compared on the 7B shape by bench/bench_quantize.py: on a model this small the
    # embeddings and TurboMind's workspace outweigh the linear layers (seen: 1.61 vs 0.87 GiB)
    assert q["tok/s batch 1"] > 0 and src["tok/s batch 1"] > 0


def test_kv_int8_and_int4_hold_more_tokens(fp16_model, tmp_path):
    from engines.quantize import measure_model

    rows = {qp: measure_model(fp16_model, label=f"qp{qp}", cache_dir=str(tmp_path / "c"), quant_policy=qp,
                              cache_max_entry_count=0.05, prompt="Say something.", batches=(4,), new_tokens=32,
                              kv_capacity=True, engine="turbomind") for qp in (0, 8, 4)}
    print(json.dumps(rows, indent=1))
    t = {qp: r["KV cache tokens"] for qp, r in rows.items()}
    assert all(t.values()), t
    assert t[8] / t[0] > 1.8 and t[4] / t[0] > 3.4, t
    assert all(r["tok/s batch 4"] > 0 and r["answer"] for r in rows.values())


def _expected_fp8_gib(src: str) -> float:
    """The FP8 result's size from the source's tensors: each 2-D decoder linear weight
    (``*_proj.weight``) at one byte per element plus a float32 scale per 128x128 block, every other
    tensor as it is (bf16)."""
    import glob
    import math

    from safetensors import safe_open

    total = 0
    for f in glob.glob(os.path.join(src, "*.safetensors")):
        with safe_open(f, "pt") as st:
            for k in st.keys():
                t = st.get_slice(k)
                shape, item = t.get_shape(), 2
                n = math.prod(shape)
                if k.endswith("proj.weight") and len(shape) == 2:
                    total += n + 4 * math.ceil(shape[0] / 128) * math.ceil(shape[1] / 128)
                else:
                    total += n * item
    return total / 2**30


def test_fp8_job_loads_on_turbomind_and_the_pytorch_engine(tmp_path):
    """Issue #17: the FP8 job (blocked e4m3, the runner's subprocess on the GPU) on a bf16 model
    whose widths are whole 128-blocks, then the result on both LMDeploy engines: it answers, it is
    about half the size, its held-out perplexity is close to the source's (random weights: the
    figure is near the vocabulary size for both, so only their ratio means something), and
    FP8 KV (quant_policy 16) runs on the PyTorch engine."""
    import time

    from bench.models import build_llama
    from engines.quantize import JobRunner, measure_model

    src = build_llama(str(tmp_path / "awq-small-bf16"), "awq-small", device="cuda", dtype="bfloat16")
    runner = JobRunner(str(tmp_path / "data"))
    out = str(tmp_path / "data" / "models" / "awq-small-fp8")
    try:
        job = runner.wait(runner.submit("fp8", src, out, {}).id, 600)
        print(runner.read_log(job.id)[-2000:])
        assert job.state == "done", job.error
        assert "quantizing on cuda" in runner.read_log(job.id)
    finally:
        runner.close()
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert cfg["quantization_config"]["quant_method"] == "fp8"
    fp8_size = _expected_fp8_gib(src)
    prompt = "Explain in two sentences why the sky is blue."
    rows = {}
    for engine in ("turbomind", "pytorch"):
        kw = dict(cache_dir=str(tmp_path / "c"), prompt=prompt, batches=(1,), new_tokens=32, engine=engine,
                  perplexity_tokens=1024, cache_max_entry_count=0.2)
        rows[f"bf16 {engine}"] = measure_model(src, label=f"bf16 {engine}", **kw)
        try:
            rows[f"fp8 {engine}"] = measure_model(out, label=f"fp8 {engine}", model_format="fp8", **kw)
        except Exception as e:  # noqa: BLE001 - record which engine refused, then fail below with both
            rows[f"fp8 {engine}"] = {"error": f"{type(e).__name__}: {e}"}
    try:
        rows["fp8 pytorch kv fp8"] = measure_model(out, label="fp8 pytorch kv fp8", model_format="fp8", quant_policy=16,
                                                   cache_dir=str(tmp_path / "c"), prompt=prompt, batches=(4,),
                                                   new_tokens=32, engine="pytorch", cache_max_entry_count=0.2,
                                                   kv_capacity=True)
    except Exception as e:  # noqa: BLE001
        rows["fp8 pytorch kv fp8"] = {"error": f"{type(e).__name__}: {e}"}
    print(json.dumps(rows, indent=1))
    for engine in ("turbomind", "pytorch"):
        q, b = rows[f"fp8 {engine}"], rows[f"bf16 {engine}"]
        assert "error" not in q and q["backend"] == engine and q["answer"], q
        # only the decoder's linear weights become FP8 (1 byte + a float32 scale per 128x128 block);
        # embeddings, head and norms stay bf16: on this small shape they are a third of the model
        # (0.382 -> 0.287 GiB on the H200, 2026-12-02), on the 7B shape the result is 0.52x (bench)
        assert abs(q["size on disk (GiB)"] - fp8_size) < 0.02 * b["size on disk (GiB)"], (q, fp8_size)
        assert q["tok/s batch 1"] > 0
        if q.get("perplexity (held-out)") and b.get("perplexity (held-out)"):
            assert 0.9 < q["perplexity (held-out)"] / b["perplexity (held-out)"] < 1.1, (q, b)
    kv = rows["fp8 pytorch kv fp8"]
    assert "error" not in kv and kv["tok/s batch 4"] > 0, kv
    assert kv.get("KV cache tokens"), kv     # the PyTorch engine's own block count (session 7: was None)
