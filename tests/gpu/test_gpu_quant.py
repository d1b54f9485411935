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
