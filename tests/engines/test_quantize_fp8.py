"""Issue #17 on the CPU: the blocked-FP8 checkpoint (round trip within e4m3's rounding, the layout
LMDeploy reads), the FP8 job through the real JobRunner, the held-out split of the calibration
text, per-GPU advice as data, and the card's perplexity on the built-in model."""
from __future__ import annotations

import json
import os

import pytest

from engines import quantize_worker as worker
from engines.gpus import gpu_spec
from engines.quant_advice import CPU_MEASURED, MEASURED, advise, engine_for
from engines.quantize import (CALIB_SHARE, DEFAULT_CALIB, Job, JobError, JobRunner, calibration_text,
                              heldout_text, result_engine, result_load_options, validate)


def _e4m3_bound(w, scale):
    """The largest error e4m3 rounding may leave on each element, in the source's units: half a
    unit in the last place of a 3-bit mantissa (|x| * 2^-4) for normal numbers, half the subnormal
    step (2^-10) below 2^-6, all times the block's scale."""
    import torch

    s = scale.float().repeat_interleave(128, 0).repeat_interleave(128, 1)[: w.shape[0], : w.shape[1]]
    x = (w.float() / s).abs()
    return torch.maximum(x * 2.0 ** -4, torch.full_like(x, 2.0 ** -10)) * s * 1.0001


@pytest.mark.parametrize("shape", [(256, 688), (688, 256), (300, 130), (128, 128)])
def test_blocked_fp8_round_trip_is_within_e4m3_rounding(shape):
    """Ragged sides (688 = 5.4 blocks, 130) pad to whole blocks for the maximum only: the last,
    partial block gets the scale of its own values."""
    import torch

    torch.manual_seed(0)
    w = torch.randn(*shape) * torch.logspace(-3, 1, shape[1])      # columns of very different sizes
    q, scale = worker.quantize_fp8_blocked(w)
    assert q.dtype == torch.float8_e4m3fn and q.shape == w.shape
    assert scale.dtype == torch.float32 and scale.shape == (-(-shape[0] // 128), -(-shape[1] // 128))
    back = worker.dequantize_fp8_blocked(q, scale)
    err = (back - w).abs()
    assert (err <= _e4m3_bound(w, scale)).all(), float((err / _e4m3_bound(w, scale)).max())
    # each block's largest value maps to e4m3's largest (448): the scale is the block's own
    assert q.float().abs().max() == 448.0
    # a scale applied to the wrong block (the grid's columns reversed) would not pass: the bound is per block
    if scale.shape[1] > 1:
        wrong = worker.dequantize_fp8_blocked(q, scale.flip(1).contiguous())
        assert not ((wrong - w).abs() <= _e4m3_bound(w, scale)).all()


def test_a_block_of_zeros_gets_scale_one():
    import torch

    w = torch.zeros(130, 256)
    w[:, 128:] = 1.0
    q, scale = worker.quantize_fp8_blocked(w)
    assert scale[0, 0] == 1.0 and torch.equal(worker.dequantize_fp8_blocked(q, scale), w)


def test_fp8_targets_only_the_decoder_linears():
    import torch

    w2, w1 = torch.zeros(4, 4), torch.zeros(4)
    yes = ["model.layers.0.self_attn.q_proj.weight", "model.layers.11.mlp.down_proj.weight",
           "model.language_model.layers.3.mlp.gate_proj.weight", "model.layers.0.attention.wqkv.weight"]
    no = ["model.embed_tokens.weight", "lm_head.weight", "model.norm.weight",
          "model.layers.0.input_layernorm.weight", "model.vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight",
          "model.visual.layers.0.attn.q_proj.weight", "model.layers.0.self_attn.q_proj.bias"]
    assert all(worker.fp8_target(n, w2) for n in yes)
    assert not any(worker.fp8_target(n, w2) for n in no)
    assert not worker.fp8_target("model.layers.0.input_layernorm.q_proj.weight", w1), "1-D: not a linear"


def test_fp8_checkpoint_layout(tiny_llama, tmp_path):
    """What LMDeploy 0.18 reads: float8_e4m3fn weights and float32 ``weight_scale_inv`` of
    (ceil(out/128), ceil(in/128)) for every decoder linear (TurboMind's FP8Format.accepts checks that
    shape), the embeddings/head/norms in bfloat16 (a float32 source), and the quantization_config."""
    import torch
    from safetensors.torch import load_file

    out = str(tmp_path / "fp8")
    worker.run_fp8({"source": tiny_llama.path, "params": {"device": "cpu"}}, out)
    src, dst = load_file(os.path.join(tiny_llama.path, "model.safetensors")), load_file(os.path.join(out, "model.safetensors"))
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert cfg["quantization_config"] == {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                         "weight_block_size": [128, 128]}
    assert cfg["torch_dtype"] == "bfloat16"
    linears = [k for k in src if worker.fp8_target(k, src[k])]
    assert len(linears) == 4 * 7
    for k in linears:
        q, s = dst[k], dst[k + "_scale_inv"]
        assert q.dtype == torch.float8_e4m3fn and s.dtype == torch.float32
        assert s.shape == (-(-q.shape[0] // 128), -(-q.shape[1] // 128))
        err = (worker.dequantize_fp8_blocked(q, s) - src[k]).abs()
        assert (err <= _e4m3_bound(src[k], s)).all(), k
    for k in set(src) - set(linears):
        assert dst[k].dtype == torch.bfloat16 and torch.equal(dst[k], src[k].to(torch.bfloat16)), k
    assert set(dst) == set(src) | {k + "_scale_inv" for k in linears}
    assert os.path.isfile(os.path.join(out, "tokenizer.json"))
    size = lambda p: os.path.getsize(os.path.join(p, "model.safetensors"))
    # the tiny model is mostly embedding (49k x 256); its linears go from 4 bytes to 1
    assert size(out) < 0.5 * size(tiny_llama.path)


def test_fp8_requests_are_checked(tiny_llama, tmp_path):
    data = str(tmp_path / "data")
    q = tmp_path / "already"
    q.mkdir()
    (q / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"],
                                               "quantization_config": {"quant_method": "awq"}}))
    with pytest.raises(JobError, match="already quantized"):
        validate("fp8", str(q), os.path.join(data, "models", "x"), {}, data, free_gpu_bytes=None)
    with pytest.raises(JobError, match="one of cast, fp8, awq"):
        validate("int3", tiny_llama.path, os.path.join(data, "models", "x"), {}, data, free_gpu_bytes=None)
    # no GPU needed: validated on a machine without one
    validate("fp8", tiny_llama.path, os.path.join(data, "models", "x"), {}, data, free_gpu_bytes=None)


def test_fp8_result_loads_as_fp8_on_the_gpu_and_bfloat16_on_a_cpu():
    job = Job(id="f", kind="fp8", source="s", output="o", params={})
    assert result_load_options(job, gpu=True) == {"model_format": "fp8"}
    assert result_load_options(job, gpu=False) == {"dtype": "bfloat16"}
    h200 = [gpu_spec("NVIDIA H200", (9, 0))]
    assert result_engine(job, h200, {"transformers", "turbomind", "pytorch"}) == "pytorch"
    assert result_engine(job, h200, {"transformers", "turbomind"}) == "turbomind"
    assert result_engine(job, [], {"transformers"}) == "auto"
    assert result_engine(Job(id="c", kind="cast", source="s", output="o", params={}), h200) == "auto"


def test_the_calibration_text_is_split_and_the_parts_do_not_overlap():
    text = open(DEFAULT_CALIB, encoding="utf-8", errors="replace").read()
    calib, held = calibration_text(), heldout_text()
    assert calib + held == text, "the two parts are the whole file, once"
    assert calib.endswith("\n"), "cut at a line boundary"
    assert abs(len(calib) / len(text) - CALIB_SHARE) < 0.01
    assert len(held) > 40_000, "enough held-out text for a few thousand tokens"
    # the standard library repeats a few docstrings (turtle's): fewer than 1% of the held-out lines
    # also occur in the calibration part
    seen = {ln.strip() for ln in calib.splitlines() if len(ln.strip()) > 40}
    lines = [ln.strip() for ln in held.splitlines() if len(ln.strip()) > 40]
    assert len(lines) > 500 and sum(ln in seen for ln in lines) < 0.01 * len(lines)
    assert calibration_text(DEFAULT_CALIB) == calib


def test_a_users_own_calibration_file_is_read_whole(tmp_path):
    own = tmp_path / "own.txt"
    own.write_text("line one\nline two\n" * 100)
    assert calibration_text(str(own)) == own.read_text()


def test_the_awq_worker_calibrates_on_the_calibration_part_only():
    src = open(os.path.join(os.path.dirname(worker.__file__), "quantize_worker.py")).read()
    assert "calibration_text(p[\"calib_file\"])" in src


# --------------------------------------------------------------------------- advice
ALL = {"transformers", "turbomind", "pytorch"}


def test_hopper_gets_fp8_on_the_engine_measured_faster():
    a = advise([gpu_spec("NVIDIA H200", (9, 0))], ALL)
    assert (a.kind, a.engine) == ("fp8", "pytorch")
    assert "1.45x bf16 for one user" in a.reason and "W4A16 0.66x" in a.reason and a.date == "2026-12-02"
    assert "with 16 users both FP8 engines make 1.11-1.12x the best bf16 engine" in a.reason, a.reason
    assert "H200" in a.markdown() and "LMDeploy's PyTorch engine" in a.markdown()
    # only TurboMind installed: the faster of what is there
    assert advise([gpu_spec("NVIDIA H100 80GB HBM3", (9, 0))], {"transformers", "turbomind"}).engine == "turbomind"
    # no LMDeploy: FP8 still, loaded on Transformers, and the page says why
    a = advise([gpu_spec("NVIDIA H100 80GB HBM3", (9, 0))], {"transformers"})
    assert a.engine == "transformers" and "LMDeploy is not installed" in a.note
    assert engine_for("fp8", [gpu_spec("NVIDIA H200", (9, 0))], ALL) == "pytorch"


def test_hopper_without_the_pytorch_engines_fast_fp8_gemm_gets_turbomind():
    """Where LMDeploy's PyTorch engine would fall back to its portable Triton FP8 kernel (measured
    0.72x bf16 on the H200), the advice is TurboMind, and says why."""
    a = advise([gpu_spec("NVIDIA H200", (9, 0))], ALL, pytorch_fast=False)
    assert (a.kind, a.engine) == ("fp8", "turbomind")
    assert "1.13x bf16 for one user" in a.reason and "portable Triton FP8 kernel" in a.reason and "0.72x" in a.reason


def test_which_fp8_gemm_the_pytorch_engine_would_take(monkeypatch):
    import importlib.util
    from importlib import metadata

    import engines.quant_advice as qa

    real_find = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: object() if name == "lmdeploy" else (None if name == "deep_gemm" else real_find(name, *a)))
    for version, fast in (("3.6.0", True), ("3.7.1", True), ("3.5.1", False), ("3.8.0", False)):
        monkeypatch.setattr(metadata, "version", lambda name, v=version: v)
        assert qa.pytorch_fp8_gemm_fast() is fast, version


@pytest.mark.parametrize("name, cap, arch", [("NVIDIA A100-SXM4-80GB", (8, 0), "Ampere"),
                                             ("NVIDIA GeForce RTX 4090", (8, 9), "Ada"),
                                             ("Tesla V100-SXM2-32GB", (7, 0), "Volta")])
def test_ampere_and_ada_get_w4a16_from_lmdeploys_docs(name, cap, arch):
    a = advise([gpu_spec(name, cap)], ALL)
    assert (a.kind, a.engine, a.source) == ("awq", "turbomind", "LMDeploy's docs")
    assert arch in a.reason and "2.4x" in a.reason and "not measured by us" in a.reason


def test_a_cpu_gets_the_cast_with_the_int8_figures_and_an_unknown_gpu_says_so():
    a = advise([], {"transformers"})
    assert (a.kind, a.engine, a.gpu) == ("cast", "transformers", None)
    assert "int8" in a.reason and "no faster" in a.reason and "0.41x" in a.reason and "this CPU" in a.markdown()
    u = advise([gpu_spec("Some Future GPU", (15, 0))], ALL)
    assert u.kind == "cast" and "not in our table" in u.reason


def test_the_advice_table_is_data_with_dates():
    assert all(f.date and f.source in ("ours", "LMDeploy's docs") for f in MEASURED + CPU_MEASURED)
    by = {(f.engine, f.fmt, f.date): f for f in MEASURED}
    for key, f in by.items():       # each ratio against bf16 on the same engine in the same run
        engine, fmt, date = key
        if fmt != "bf16":
            assert f.vs == pytest.approx(f.batch1 / by[(engine, "bf16", date)].batch1, abs=0.006), key


# --------------------------------------------------------------------------- the built-in model (slow)
@pytest.mark.slow
def test_fp8_job_on_the_builtin_model_then_the_card_with_perplexity(smollm2, tmp_path):
    """The FP8 job through the real JobRunner (worker subprocess, progress, .partial then rename) on
    SmolLM2-135M, then the card: the source (float32) and the FP8 result (dequantized to bfloat16 by
    the Transformers engine on this CPU) on the held-out text, with the token count."""
    import time

    from engines.manager import EngineManager
    from engines.quantize import measure_model

    data = str(tmp_path / "data")
    runner = JobRunner(data)
    out = os.path.join(data, "models", "smol-fp8")
    try:
        job = runner.submit("fp8", smollm2.path, out, {})
        seen = set()
        while (j := runner.get(job.id)).state not in ("done", "failed", "cancelled"):
            if j.state == "running" and j.total:
                seen.add(j.stage)
            time.sleep(0.05)
        log = runner.read_log(job.id)
        assert j.state == "done", log
        assert j.done == j.total == 272 and "quantizing tensors" in seen | {j.stage}
        for step in ("quantizing on cpu", "210 linear weights in float8_e4m3fn", "config.json: quantization_config",
                     "done in"):
            assert step in log, (step, log)
        assert not os.path.exists(out + ".partial")
    finally:
        runner.close()
    app = EngineManager(data)
    kw = dict(cache_dir=data, prompt="What is the capital of France?", batches=(), new_tokens=12, device="cpu",
              engine="transformers", manager=app, perplexity_tokens=1024)
    src = measure_model(smollm2.path, label="source", **kw)
    fp8 = measure_model(out, label="fp8", **{**kw, "dtype": "bfloat16"})
    print(json.dumps([src, fp8], indent=1))
    assert src["perplexity tokens"] == fp8["perplexity tokens"] == 1024
    assert 1 < src["perplexity (held-out)"] < 60, src
    # FP8 costs a little quality, not a broken model (e4m3 with block scales)
    assert src["perplexity (held-out)"] * 0.97 < fp8["perplexity (held-out)"] < src["perplexity (held-out)"] * 1.15, fp8
    assert "Paris" in fp8["answer"] and fp8["dtype"] == "bfloat16"
    assert fp8["size on disk (GiB)"] < 0.4 * src["size on disk (GiB)"]


@pytest.mark.slow
def test_int8_weights_at_load_on_the_builtin_model(smollm2, tmp_path):
    """The CPU option for the Transformers engine (torchao int8 weight-only of the decoder's
    linears): it still answers, its weights take about half of float32's (the tied 49k x 576
    embedding stays float32), and the card's perplexity stays close to the source's."""
    pytest.importorskip("torchao")       # requirements-test.txt
    from engines.manager import EngineManager
    from engines.quantize import measure_model

    kw = dict(cache_dir=str(tmp_path), prompt="What is the capital of France?", batches=(), new_tokens=8,
              device="cpu", engine="transformers", manager=EngineManager(str(tmp_path)), perplexity_tokens=512)
    src = measure_model(smollm2.path, label="source", **kw)
    q = measure_model(smollm2.path, label="int8", weight_quant="int8", **kw)
    print(json.dumps([src, q], indent=1))
    assert "Paris" in q["answer"]
    assert 0.35 < q["weights in memory (GiB)"] / src["weights in memory (GiB)"] < 0.6, (q, src)
    assert q["perplexity (held-out)"] < 1.05 * src["perplexity (held-out)"]
    with pytest.raises(ValueError, match="weight_quant must be one of none, int8"):
        from engines.configs import TransformersConfig
        TransformersConfig(weight_quant="int4")
