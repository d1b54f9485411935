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


def _mb(n: int) -> str:
    return f"{n / 1e6:,.1f} MB"


def run_cast(job: dict, out: str) -> None:
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    src, name = job["source"], job["params"].get("dtype", "bfloat16")
    dtype = getattr(torch, name)
    files = sorted(f for f in os.listdir(src) if f.endswith(".safetensors"))
    if not files:
        raise SystemExit(f"{src} has no .safetensors files")
    names = []
    for f in files:
        try:
            with safe_open(os.path.join(src, f), "pt") as st:
                names += [(f, k) for k in st.keys()]
        except Exception as e:  # noqa: BLE001 - a damaged or foreign file: say which, in a line
            raise SystemExit(f"error: {f} is not a readable safetensors file ({str(e).splitlines()[0]})") from None
    size = sum(os.path.getsize(os.path.join(src, f)) for f in files)
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
    text = "" if dataset else open(p["calib_file"], encoding="utf-8", errors="replace").read()

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
    {"cast": run_cast, "awq": run_awq}[job["kind"]](job, out)
    os.replace(out, job["output"])
    print(f"saved as {job['output']}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
