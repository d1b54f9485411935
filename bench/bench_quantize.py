"""What W4A16 and KV-cache quantization buy on TurboMind, measured side by side in one run.

    python -m bench.bench_quantize --shape llama2-7b --json q.json          # H100, ~8 min
    python -m bench.bench_quantize --shape awq-small --samples 8 --seqlen 256  # quick check

1. A random-weight model of ``--shape`` in fp16 (``bench.models``; weights do not change speed or
   memory), quantized to W4A16 by the app's own job runner (``engines.quantize.JobRunner``: LMDeploy's
   ``auto_awq`` in a subprocess, calibrated offline on the shipped text). The job's time is printed.
2. The tutorial's experiment: each model loaded on TurboMind with cache_max_entry_count 0.01; the
   GPU memory each load takes (NVML), and the size of the weights on disk.
3. Speed: each model with a cache large enough for batch 16 (``--cache``), tokens/s at batch 1 and
   16 (greedy, ``--new-tokens`` each).
4. KV cache: the fp16 model with quant_policy 0, 8 (int8) and 4 (int4) at the same ``--cache``: the
   tokens the cache holds (TurboMind's own block count) and tokens/s at batch 16.

Prints a table and the ratios (targets: W4A16 >= 2x tokens/s at batch 1, <= 0.3x weight memory;
KV int8 2x and int4 4x the tokens). Every row goes to ``--json`` as soon as it is measured.

``--fp8`` (issue #17; H100/H200, one command, ~6 min on an H200):

    python -m bench.bench_quantize --fp8 --shape llama2-7b-32k --json fp8.json

builds the shape in bf16, runs the app's FP8 job on it (blocked e4m3, the job runner's subprocess on
the GPU), then loads bf16 and FP8 on TurboMind and on LMDeploy's PyTorch engine and measures decode
tokens/s at batch 1 and 16 (``--new-tokens``) and the held-out perplexity (``--ppl-tokens``; random
weights: only the FP8/bf16 ratio means something). Prints FP8/bf16 on the same engine, against the
best bf16 engine, the weights' size ratio, and the targets: the recommended Hopper format (FP8 on
the engine ``engines.quant_advice`` names) >= 1.3x bf16 at batch 1, weights <= 0.55x. Each step
is guarded: a failure is a row with its error, and the rest still runs.

``--cpu`` (no GPU): the built-in SmolLM2-135M through the same card on Transformers: the source
(float32), its bfloat16 cast and its FP8 result (both made by the app's job runner; FP8 dequantized
to bfloat16 on the CPU), and the source with int8 weights (torchao, at load): size, weights in
memory, tokens/s at batch 1 and the held-out perplexity:

    python -m bench.bench_quantize --cpu --json cpu.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

PROMPT = "Explain in two sentences why the sky is blue."


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="llama2-7b")
    ap.add_argument("--work", default="/tmp/turbostudio-quant-bench")
    ap.add_argument("--samples", type=int, default=16, help="AWQ calibration samples")
    ap.add_argument("--seqlen", type=int, default=512, help="AWQ calibration sequence length")
    ap.add_argument("--cache", type=float, default=0.5, help="cache_max_entry_count for the speed runs")
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--skip", default="", help="comma list of steps to skip: memory,speed,kv")
    ap.add_argument("--speed-models", default="fp16,w4a16", help="which models the speed step loads")
    ap.add_argument("--tag", default="", help="appended to each row's label (e.g. the TM_GEMM_* settings "
                                                "of a kernel-tuning experiment, set in the environment)")
    ap.add_argument("--json")
    ap.add_argument("--fp8", action="store_true", help="the FP8 comparison (issue #17) instead of AWQ")
    ap.add_argument("--cpu", action="store_true", help="the built-in model on the CPU: cast, FP8, int8 (issue #17)")
    ap.add_argument("--engines", default="turbomind,pytorch", help="--fp8: the engines to compare on")
    ap.add_argument("--ppl-tokens", type=int, default=2048, help="--fp8: held-out tokens for the perplexity")
    a = ap.parse_args(argv)
    if a.fp8:
        return main_fp8(a)
    if a.cpu:
        return main_cpu(a)
    from bench.models import build_llama
    from engines.quantize import JobRunner, measure_model

    skip = set(filter(None, a.skip.split(",")))
    os.makedirs(a.work, exist_ok=True)
    out = {"shape": a.shape, "args": vars(a), "rows": [],
           "env": {k: v for k, v in os.environ.items() if k.startswith("TM_")}}

    def save(row=None):
        if row is not None:
            out["rows"].append(row)
            print(json.dumps(row), flush=True)
        if a.json:
            with open(a.json, "w") as f:
                json.dump(out, f, indent=1)

    t0 = time.perf_counter()
    src = build_llama(os.path.join(a.work, f"{a.shape}-fp16"), a.shape, device="cuda", dtype="float16")
    out["build_s"] = round(time.perf_counter() - t0, 1)
    dst = os.path.join(a.work, "models", f"{a.shape}-w4a16")
    if not os.path.isdir(dst):
        runner = JobRunner(a.work)
        t0 = time.perf_counter()
        job = runner.submit("awq", src, dst, {"samples": a.samples, "seqlen": a.seqlen, "group_size": 128})
        job = runner.wait(job.id, timeout=1800)
        out["awq_job"] = {"state": job.state, "seconds": round(time.perf_counter() - t0, 1), "error": job.error,
                          "samples": a.samples, "seqlen": a.seqlen}
        runner.close()
        print(f"AWQ job: {job.state} in {out['awq_job']['seconds']} s {job.error}", flush=True)
        if job.state != "done":
            print(runner.read_log(job.id)[-4000:])
            save()
            return out
    save()
    cache_dir = os.path.join(a.work, "cache")
    kw = dict(cache_dir=cache_dir, new_tokens=a.new_tokens, engine="turbomind")
    if "speed" not in skip:
        for label, path, fmt in (("fp16", src, "hf"), ("w4a16", dst, "awq")):
            if label not in a.speed_models.split(","):
                continue
            save(measure_model(path, label=label + a.tag, model_format=fmt, cache_max_entry_count=a.cache,
                               batches=(1, 16), kv_capacity=True, prompt=PROMPT, **kw) | {"step": "speed"})
    if "kv" not in skip:
        for qp in (8, 4):
            save(measure_model(src, label=f"fp16 kv int{qp}", quant_policy=qp, cache_max_entry_count=a.cache,
                               batches=(16,), kv_capacity=True, **kw) | {"step": "kv"})
    if "memory" not in skip:       # load only: at 0.01 a 7B leaves TurboMind a handful of blocks
        for label, path, fmt in (("fp16", src, "hf"), ("w4a16", dst, "awq")):
            save(measure_model(path, label=f"{label} @0.01", model_format=fmt, cache_max_entry_count=0.01,
                               batches=(), **kw) | {"step": "memory"})
    report(out)
    save()
    return out


def main_fp8(a) -> dict:
    """bf16 against FP8 on each LMDeploy engine (see the module's docstring)."""
    import traceback

    from bench.models import build_llama
    from engines.quantize import JobRunner, measure_model

    os.makedirs(a.work, exist_ok=True)
    out = {"shape": a.shape, "args": vars(a), "rows": [], "date": time.strftime("%Y-%m-%d")}

    def save(row=None):
        if row is not None:
            out["rows"].append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "answer"}), flush=True)
        if a.json:
            with open(a.json, "w") as f:
                json.dump(out, f, indent=1)

    try:
        import torch

        out["gpu"] = torch.cuda.get_device_name(0)
    except Exception as e:  # noqa: BLE001
        out["gpu"] = f"? ({e})"
    t0 = time.perf_counter()
    src = build_llama(os.path.join(a.work, f"{a.shape}-bf16"), a.shape, device="cuda", dtype="bfloat16")
    out["build_s"] = round(time.perf_counter() - t0, 1)
    dst = os.path.join(a.work, "models", f"{a.shape}-fp8")
    if not os.path.isdir(dst):
        runner = JobRunner(a.work)
        t0 = time.perf_counter()
        job = runner.wait(runner.submit("fp8", src, dst, {}).id, timeout=1200)
        out["fp8_job"] = {"state": job.state, "seconds": round(time.perf_counter() - t0, 1), "error": job.error}
        print(runner.read_log(job.id)[-1500:], flush=True)
        runner.close()
        if job.state != "done":
            save()
            return out
    save()
    kw = dict(cache_dir=os.path.join(a.work, "cache"), new_tokens=a.new_tokens, cache_max_entry_count=a.cache,
              batches=(1, 16), prompt=PROMPT, perplexity_tokens=a.ppl_tokens)
    for engine in a.engines.split(","):
        for label, path, fmt in (("bf16", src, "hf"), ("fp8", dst, "fp8")):
            t0 = time.perf_counter()
            try:
                row = measure_model(path, label=f"{label} {engine}", model_format=fmt, engine=engine, **kw)
            except Exception as e:  # noqa: BLE001 - one engine's failure must not cost the others' figures
                traceback.print_exc()
                row = {"model": f"{label} {engine}", "backend": engine, "error": f"{type(e).__name__}: {e}"[:500],
                       "seconds": round(time.perf_counter() - t0, 1)}
            save(row | {"step": "fp8", "format": label, "engine": engine})
    report_fp8(out)
    save()
    return out


def main_cpu(a) -> dict:
    """The built-in model on the CPU, every CPU-runnable format through the card (module docstring)."""
    from engines import models
    from engines.quantize import JobRunner, measure_model

    work = a.work + "-cpu"
    src = models.resolve(None, os.path.join(work, "cache")).path
    runner = JobRunner(work)
    out = {"model": "SmolLM2-135M-Instruct", "date": time.strftime("%Y-%m-%d"), "rows": [],
           "load average": os.getloadavg(), "cpus": os.cpu_count()}
    made = {}
    for kind, params, name in (("cast", {"dtype": "bfloat16"}, "smollm2-bf16"), ("fp8", {}, "smollm2-fp8")):
        dst = os.path.join(work, "models", name)
        if not os.path.isdir(dst):
            t0 = time.perf_counter()
            job = runner.wait(runner.submit(kind, src, dst, params).id, timeout=600)
            out[f"{kind} job"] = {"state": job.state, "seconds": round(time.perf_counter() - t0, 1), "error": job.error}
        made[kind] = dst
    runner.close()
    kw = dict(cache_dir=os.path.join(work, "cache"), device="cpu", engine="transformers", batches=(1,),
              new_tokens=a.new_tokens, prompt=PROMPT, perplexity_tokens=a.ppl_tokens)
    for label, path, extra in (("float32 (source)", src, {}), ("bfloat16 cast", made["cast"], {}),
                               ("fp8 (dequantized to bf16)", made["fp8"], {}),
                               ("int8 weights (torchao)", src, {"weight_quant": "int8"})):
        try:
            row = measure_model(path, label=label, **kw, **extra)
        except Exception as e:  # noqa: BLE001
            row = {"model": label, "error": f"{type(e).__name__}: {e}"[:300]}
        out["rows"].append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "answer"}), flush=True)
    out["load average after"] = os.getloadavg()
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)
    print(f"\n{'model':28s} {'disk GiB':>9s} {'mem GiB':>8s} {'b1 tok/s':>9s} {'ppl':>8s} tokens")
    for r in out["rows"]:
        print(f"{r['model']:28s} {r.get('size on disk (GiB)', 0):9.3f} {r.get('weights in memory (GiB)') or 0:8.3f} "
              f"{str(r.get('tok/s batch 1', '')):>9s} {str(r.get('perplexity (held-out)', '')):>8s} "
              f"{r.get('perplexity tokens', '')} {r.get('error', '')}")
    print(f"load average before/after: {out['load average']} / {out['load average after']}")
    return out


def report_fp8(out: dict) -> None:
    from engines.gpus import gpu_spec
    from engines.quant_advice import engine_for

    rows = {r["model"]: r for r in out["rows"]}
    print(f"\n{out.get('gpu')}, {out['shape']}, {out.get('date')}")
    print(f"{'model':18s} {'disk GiB':>9s} {'b1 tok/s':>9s} {'b16 tok/s':>10s} {'ppl':>9s} error")
    for r in out["rows"]:
        print(f"{r['model']:18s} {r.get('size on disk (GiB)', 0) or 0:9.2f} {str(r.get('tok/s batch 1', '')):>9s} "
              f"{str(r.get('tok/s batch 16', '')):>10s} {str(r.get('perplexity (held-out)', '')):>9s} "
              f"{r.get('error', '')[:120]}")
    ratios = {}

    def ratio(name, num, den):
        if num and den:
            ratios[name] = round(num / den, 3)

    engines = sorted({r.get("engine") for r in out["rows"] if r.get("engine")})
    best_bf16 = max((rows.get(f"bf16 {e}", {}).get("tok/s batch 1") or 0 for e in engines), default=0)
    for e in engines:
        b, q = rows.get(f"bf16 {e}", {}), rows.get(f"fp8 {e}", {})
        for batch in (1, 16):
            ratio(f"fp8/bf16 {e} tok/s batch {batch}", q.get(f"tok/s batch {batch}"), b.get(f"tok/s batch {batch}"))
        ratio(f"fp8 {e}/best bf16 tok/s batch 1", q.get("tok/s batch 1"), best_bf16)
        ratio(f"fp8/bf16 {e} perplexity", q.get("perplexity (held-out)"), b.get("perplexity (held-out)"))
        ratio("fp8/bf16 weights on disk", q.get("size on disk (GiB)"), b.get("size on disk (GiB)"))
    out["ratios"] = ratios
    print("\nratios:")
    for k, v in ratios.items():
        print(f"  {k}: {v}")
    gpu = gpu_spec(out.get("gpu") or "", (9, 0) if "H1" in (out.get("gpu") or "") or "H2" in (out.get("gpu") or "")
                   else None)
    rec = engine_for("fp8", [gpu], {"turbomind", "pytorch"}) or "pytorch"
    speed = ratios.get(f"fp8/bf16 {rec} tok/s batch 1")
    size = ratios.get("fp8/bf16 weights on disk")
    out["targets"] = {"recommended engine": rec, "speed >= 1.3x": speed is not None and speed >= 1.3,
                      "weights <= 0.55x": size is not None and size <= 0.55}
    print(f"\ntargets (recommended Hopper format: FP8 on {rec}):")
    print(f"  FP8/bf16 at batch 1 on {rec} >= 1.3x: {speed} -> {'MET' if speed and speed >= 1.3 else 'NOT MET'}")
    print(f"  weights <= 0.55x bf16: {size} -> {'MET' if size and size <= 0.55 else 'NOT MET'}")


def report(out: dict) -> None:
    rows = {r["model"]: r for r in out["rows"]}
    print(f"\n{'model':22s} {'disk GiB':>9s} {'mem GiB':>8s} {'KV tokens':>10s} {'b1 tok/s':>9s} {'b16 tok/s':>10s}")
    for r in out["rows"]:
        print(f"{r['model']:22s} {r.get('size on disk (GiB)', 0):9.2f} {r.get('memory at load (GiB)', 0):8.2f} "
              f"{str(r.get('KV cache tokens', '')):>10s} {str(r.get('tok/s batch 1', '')):>9s} "
              f"{str(r.get('tok/s batch 16', '')):>10s}")
    ratios = {}

    def ratio(name, num, den):
        if num and den:
            ratios[name] = round(num / den, 3)

    f, q = rows.get("fp16 @0.01", {}), rows.get("w4a16 @0.01", {})
    ratio("w4a16/fp16 weights on disk", q.get("size on disk (GiB)"), f.get("size on disk (GiB)"))
    ratio("w4a16/fp16 GPU memory at cache 0.01", q.get("memory at load (GiB)"), f.get("memory at load (GiB)"))
    f, q = rows.get("fp16", {}), rows.get("w4a16", {})
    ratio("w4a16/fp16 tok/s batch 1", q.get("tok/s batch 1"), f.get("tok/s batch 1"))
    ratio("w4a16/fp16 tok/s batch 16", q.get("tok/s batch 16"), f.get("tok/s batch 16"))
    for qp in (8, 4):
        k = rows.get(f"fp16 kv int{qp}", {})
        ratio(f"kv int{qp}/fp16 cache tokens", k.get("KV cache tokens"), f.get("KV cache tokens"))
        ratio(f"kv int{qp}/fp16 tok/s batch 16", k.get("tok/s batch 16"), f.get("tok/s batch 16"))
    out["ratios"] = ratios
    print("\nratios:")
    for k, v in ratios.items():
        print(f"  {k}: {v}")


if __name__ == "__main__":
    main()
