"""A quantization/conversion job, run in its own process by ``engines.quantize.JobRunner``.

    python -m engines.quantize_worker JOB.json

It writes the result into ``<output>.partial`` and renames it to ``<output>`` only at the very end,
so a crash, an out-of-memory kill or a cancel never leaves a half-written model where a model is
expected. Progress goes to stdout as ``PROGRESS <done> <total> <stage>`` lines; everything else
printed is the job's log.

Kinds:
* ``awq``   — LMDeploy's ``auto_awq`` (W4A16), calibrated offline from a text file (the shipped
  ``assets/calib`` text by default) instead of a hub dataset; progress per layer and per linear.
* ``cast``  — rewrite a model's weights in another dtype (e.g. float32 -> bfloat16), tensor by tensor.
* ``fp8``   — blocked FP8 (``fp8_blocked``): the decoder's linear weights in float8_e4m3fn with one
  float32 scale per 128x128 block (``<name>.weight_scale_inv``), the layout LMDeploy 0.18 loads as
  ``model_format="fp8"`` (TurboMind and its PyTorch engine) and Transformers as FineGrainedFP8. No
  calibration: a cast with scales, tensor by tensor, on the GPU where there is one, else the CPU.
"""
from __future__ import annotations

import json
import os
import shutil
import sys

COPY_EXTS = (".json", ".jinja", ".model", ".txt", ".py", ".tiktoken")


def progress(done: int, total: int, stage: str) -> None:
    print(f"PROGRESS {done} {total} {stage}", flush=True)


def copy_side_files(src: str, dst: str) -> list[str]:
    """Copy the tokenizer, configs and templates beside the weights; the names copied."""
    copied = []
    for name in os.listdir(src):
        p = os.path.join(src, name)
        if os.path.isfile(p) and name.endswith(COPY_EXTS) and not name.endswith(".safetensors.index.json"):
            shutil.copy(p, os.path.join(dst, name))
            copied.append(name)
    return copied


def _tensor_index(src: str) -> tuple[list[str], list[tuple[str, str]], int]:
    """The source's safetensors files, every (file, tensor name) in them, and their bytes; a folder
    without them, or a damaged or foreign file, ends the job with a line saying which."""
    from safetensors import safe_open

    files = sorted(f for f in os.listdir(src) if f.endswith(".safetensors"))
    if not files:
        raise SystemExit(f"error: {src} has no .safetensors files")
    names = []
    for f in files:
        try:
            with safe_open(os.path.join(src, f), "pt") as st:
                names += [(f, k) for k in st.keys()]
        except Exception as e:  # noqa: BLE001 - a damaged or foreign file: say which, in a line
            raise SystemExit(f"error: {f} is not a readable safetensors file ({str(e).splitlines()[0]})") from None
    return files, names, sum(os.path.getsize(os.path.join(src, f)) for f in files)


def _mb(n: int) -> str:
    return f"{n / 1e6:,.1f} MB"


# --- blocked FP8 ---------------------------------------------------------------------------------
# The block LMDeploy and Transformers read (TurboMind's FP8Format: block_in 128, block_out 128;
# the PyTorch engine's blocked_fp8 linear and Transformers' FineGrainedFP8 take weight_block_size).
FP8_BLOCK = 128
FP8_MAX = 448.0          # torch.finfo(torch.float8_e4m3fn).max
# The linear layers of a decoder block, by the last part of their module name: Llama/Qwen/Mistral
# (q/k/v/o, gate/up/down), fused variants (qkv_proj, gate_up_proj) and InternLM2 (wqkv, wo, w1-3).
# Embeddings, lm_head, norms, routers and vision towers are not linear layers of the decoder and
# keep their dtype: LMDeploy builds them unquantized whatever the config says.
FP8_LINEARS = frozenset({"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                         "qkv_proj", "gate_up_proj", "wqkv", "wo", "w1", "w2", "w3"})
FP8_QUANT_CONFIG = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                    "weight_block_size": [FP8_BLOCK, FP8_BLOCK]}


def fp8_target(name: str, tensor) -> bool:
    """Whether the checkpoint tensor ``name`` is a decoder linear weight that the FP8 job quantizes:
    a 2-D floating-point ``...layers.N.<...>.<linear>.weight`` outside any vision part."""
    parts = name.split(".")
    return (len(parts) >= 4 and parts[-1] == "weight" and parts[-2] in FP8_LINEARS and "layers" in parts
            and not any("vision" in p or "visual" in p for p in parts)
            and tensor.dim() == 2 and tensor.is_floating_point())


def quantize_fp8_blocked(w, block: int = FP8_BLOCK):
    """(float8_e4m3fn weight of ``w``'s shape, float32 scales of shape (ceil(rows/block),
    ceil(cols/block))) such that ``weight * scale`` of each block gives ``w`` back within e4m3's
    rounding. Ragged edges are zero-padded to whole blocks for the maximum, so a partial block gets
    the scale of its own values only; the padding is never stored. A block of zeros gets scale 1.
    (LMDeploy's ``lite.quantization.weight.quant_utils.quant_blocked_fp8`` does the same on the GPU;
    LMDeploy is not installed on CPU machines, hence this copy in plain torch.)"""
    import torch

    rows, cols = w.shape
    br, bc = -(-rows // block), -(-cols // block)
    padded = torch.zeros(br * block, bc * block, dtype=torch.float32, device=w.device)
    padded[:rows, :cols] = w.float()
    blocks = padded.view(br, block, bc, block)
    amax = blocks.abs().amax(dim=(1, 3))                       # (br, bc)
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    q = (blocks / scale[:, None, :, None]).clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q.view(br * block, bc * block)[:rows, :cols].contiguous(), scale.contiguous()


def dequantize_fp8_blocked(q, scale, dtype=None, block: int = FP8_BLOCK):
    """The inverse of ``quantize_fp8_blocked``: ``q * scale`` block by block (float32, or ``dtype``)."""
    import torch

    rows, cols = q.shape
    s = scale.float().repeat_interleave(block, 0).repeat_interleave(block, 1)[:rows, :cols]
    out = q.float() * s
    return out.to(dtype) if dtype is not None else out


def dequantized_state_dict(path: str, dtype=None) -> dict:
    """The tensors of the checkpoint in ``path`` with every FP8 weight that has a
    ``weight_scale_inv`` dequantized (``dequantize_fp8_blocked``) to ``dtype`` (default bfloat16),
    the scales dropped, the rest cast to ``dtype``: what the Transformers engine loads an FP8
    result from on a CPU."""
    import torch
    from safetensors import safe_open

    dtype = dtype or torch.bfloat16
    out, scales = {}, {}
    for f in sorted(x for x in os.listdir(path) if x.endswith(".safetensors")):
        with safe_open(os.path.join(path, f), "pt") as st:
            for k in st.keys():
                (scales if k.endswith(".weight_scale_inv") else out)[k] = st.get_tensor(k)
    for k, scale in scales.items():
        w = k[: -len("_scale_inv")]
        out[w] = dequantize_fp8_blocked(out[w], scale, dtype)
    return {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in out.items()}


def run_fp8(job: dict, out: str) -> None:
    """Write the blocked-FP8 checkpoint of ``job["source"]`` into ``out``, one safetensors file per
    source file (only one file's tensors are in memory at a time: a 7B's 5 GB shard, not the model).
    Tensors that stay unquantized keep the source dtype, except float32, which becomes bfloat16:
    LMDeploy runs FP8 models with 16-bit activations and would load float32 tensors as 16-bit
    anyway, bfloat16 keeps float32's range (float16 would overflow on large embeddings), and a
    float32 embedding would otherwise be as large as all the FP8 linears of a small model."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    src = job["source"]
    device = job["params"].get("device") or ("cuda" if torch.cuda.is_available() else "cpu")
    files, names, size = _tensor_index(src)
    print(f"reading {len(files)} file{'s' if len(files) > 1 else ''} ({_mb(size)}, {len(names)} tensors); "
          f"quantizing on {device}", flush=True)
    os.makedirs(out, exist_ok=True)
    total, done, quantized, kept_dtype, weight_map = len(names), 0, 0, {}, {}
    progress(0, total, "quantizing tensors")
    for f in files:
        tensors = {}
        with safe_open(os.path.join(src, f), "pt") as st:
            for k in st.keys():
                t = st.get_tensor(k)
                if fp8_target(k, t):
                    q, scale = quantize_fp8_blocked(t.to(device))
                    tensors[k], tensors[k + "_scale_inv"] = q.cpu(), scale.cpu()
                    quantized += 1
                else:
                    if t.dtype == torch.float32:
                        t = t.to(torch.bfloat16)
                    tensors[k] = t
                    kept_dtype[str(t.dtype).replace("torch.", "")] = kept_dtype.get(
                        str(t.dtype).replace("torch.", ""), 0) + 1
                done += 1
                progress(done, total, "quantizing tensors")
        save_file(tensors, os.path.join(out, f), metadata={"format": "pt"})
        weight_map.update({k: f for k in tensors})
        print(f"wrote {f} ({_mb(os.path.getsize(os.path.join(out, f)))})", flush=True)
        del tensors
    if not quantized:
        raise SystemExit("error: no decoder linear layer found to quantize (names like "
                         "model.layers.0.self_attn.q_proj.weight); is this a decoder-only model?")
    kept = ", ".join(f"{n} in {d}" for d, n in sorted(kept_dtype.items()))
    print(f"{quantized} linear weights in float8_e4m3fn with a float32 scale per {FP8_BLOCK}x{FP8_BLOCK} "
          f"block; {kept} kept (embeddings, head, norms)", flush=True)
    copied = copy_side_files(src, out)
    if len(files) > 1 or os.path.exists(os.path.join(src, "model.safetensors.index.json")):
        index = {"metadata": {"total_size": sum(os.path.getsize(os.path.join(out, f)) for f in files)},
                 "weight_map": dict(sorted(weight_map.items()))}
        json.dump(index, open(os.path.join(out, "model.safetensors.index.json"), "w"), indent=2)
        copied.append("model.safetensors.index.json (new: with the scales)")
    print(f"copied {', '.join(sorted(copied))}", flush=True)
    cfg_path = os.path.join(out, "config.json")
    cfg = json.load(open(cfg_path))
    if (cfg.get("torch_dtype") or cfg.get("dtype")) in ("float32", None):
        cfg["torch_dtype"] = cfg["dtype"] = "bfloat16"
    cfg["quantization_config"] = dict(FP8_QUANT_CONFIG)
    json.dump(cfg, open(cfg_path, "w"), indent=2)
    print(f"config.json: quantization_config {json.dumps(FP8_QUANT_CONFIG)}, dtype {cfg.get('torch_dtype')}",
          flush=True)


def run_cast(job: dict, out: str) -> None:
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    src, name = job["source"], job["params"].get("dtype", "bfloat16")
    dtype = getattr(torch, name)
    files, names, size = _tensor_index(src)
    print(f"reading {len(files)} file{'s' if len(files) > 1 else ''} ({_mb(size)}, {len(names)} tensors)",
          flush=True)
    total, done, kept, stored = len(names), 0, 0, {}
    os.makedirs(out, exist_ok=True)
    progress(0, total, "casting tensors")
    for f in files:
        tensors = {}
        with safe_open(os.path.join(src, f), "pt") as st:
            for k in st.keys():
                t = st.get_tensor(k)
                stored[str(t.dtype).replace("torch.", "")] = stored.get(str(t.dtype).replace("torch.", ""), 0) + 1
                if t.is_floating_point():
                    tensors[k] = t.to(dtype)
                else:
                    tensors[k] = t
                    kept += 1
                done += 1
                progress(done, total, "casting tensors")
        save_file(tensors, os.path.join(out, f), metadata={"format": "pt"})
        print(f"wrote {f} ({_mb(os.path.getsize(os.path.join(out, f)))})", flush=True)
    was = ", ".join(f"{n} {d}" for d, n in sorted(stored.items()))
    print(f"cast {total - kept} floating-point tensors to {name} (the source had {was})"
          + (f"; {kept} integer tensors kept as they were" if kept else ""), flush=True)
    copied = copy_side_files(src, out)
    if os.path.exists(os.path.join(src, "model.safetensors.index.json")):
        shutil.copy(os.path.join(src, "model.safetensors.index.json"), out)
        copied.append("model.safetensors.index.json")
    print(f"copied {', '.join(sorted(copied))}", flush=True)
    cfg_path = os.path.join(out, "config.json")
    cfg = json.load(open(cfg_path))
    before = cfg.get("torch_dtype") or cfg.get("dtype") or "unset"
    cfg["torch_dtype"] = cfg["dtype"] = name
    json.dump(cfg, open(cfg_path, "w"), indent=2)
    print(f"config.json: dtype {before} -> {name}", flush=True)


class _Counting(dict):
    """A dict whose items() reports progress as a loop walks it (to follow LMDeploy's loops)."""

    def __init__(self, d, stage, offset, total):
        super().__init__(d)
        self.stage, self.offset, self.total = stage, offset, total

    def items(self):
        for i, kv in enumerate(super().items()):
            yield kv
            progress(self.offset + i + 1, self.total, self.stage)


def run_awq(job: dict, out: str) -> None:
    import torch

    from lmdeploy.lite.apis import auto_awq as awq_mod
    from lmdeploy.lite.apis import calibrate as cal_mod

    p = job["params"]
    dataset = p.get("dataset") or ""      # a hub dataset by name, or "" for a calibration text file
    # of the shipped text only its calibration part: the rest is held out for the card's perplexity
    from engines.quantize import calibration_text

    text = "" if dataset else calibration_text(p["calib_file"])

    def offline_loaders(name, tokenizer, nsamples=128, seed=0, seqlen=2048):
        ids = tokenizer(text, return_tensors="pt").input_ids
        g = torch.Generator().manual_seed(seed)
        if ids.shape[1] <= seqlen:
            raise SystemExit(f"the calibration text has {ids.shape[1]} tokens; need more than {seqlen}")
        starts = torch.randint(0, ids.shape[1] - seqlen - 1, (nsamples,), generator=g).tolist()
        print(f"calibration: {nsamples} samples of {seqlen} tokens from {p['calib_file']}", flush=True)
        return [ids[:, s:s + seqlen] for s in starts]

    if not dataset:                 # offline: the shipped text or the user's file
        cal_mod.get_calib_loaders = offline_loaders
    state = {"layers": 0}

    def wrap(fn, stage):
        def inner(layers_or_model, fcs_or_more, *a, **k):
            if isinstance(layers_or_model, dict):   # smooth_layers / awq_layers(layers, ...)
                n = len(layers_or_model)
                state["layers"] = n
                progress(0, n, stage)              # the step begins (its pace is measured from here)
                return fn(_Counting(layers_or_model, stage, 0, n), fcs_or_more, *a, **k)
            n = len(fcs_or_more)                   # quant_weights(model, fcs, ...)
            progress(0, n, stage)
            return fn(layers_or_model, _Counting(fcs_or_more, stage, 0, n), *a, **k)
        return inner

    awq_mod.smooth_layers = wrap(awq_mod.smooth_layers, "smoothing layers")
    awq_mod.awq_layers = wrap(awq_mod.awq_layers, "searching scales")
    awq_mod.quant_weights = wrap(awq_mod.quant_weights, "quantizing linears")
    print(f"loading {job['source']} and calibrating: {p['samples']} samples of {p['seqlen']} tokens "
          "through every layer (no progress is reported inside this step)", flush=True)
    progress(0, 1, "calibrating")
    # calibrate() asserts the dataset is one of its hub names; offline, our loader above replaces the
    # hub loader, so any listed name will do
    awq_mod.auto_awq(job["source"], work_dir=out, calib_dataset=dataset or "wikitext2", calib_samples=p["samples"],
                     calib_seqlen=p["seqlen"], w_bits=p.get("bits", 4), w_group_size=p["group_size"],
                     batch_size=p.get("batch_size", 1), dtype=p.get("dtype", "auto"))


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    job = json.load(open(argv[0]))
    out = job["output"] + ".partial"
    shutil.rmtree(out, ignore_errors=True)
    {"cast": run_cast, "awq": run_awq, "fp8": run_fp8}[job["kind"]](job, out)
    os.replace(out, job["output"])
    print(f"saved as {job['output']}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
