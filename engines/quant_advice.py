"""Which quantization pays on this machine: per-GPU advice as data.

The Quantize page recommends a format and an engine from the GPU's architecture (``engines.gpus``:
compute capability -> "hopper", "ampere", ...), with the measured reason and the date of the
figures. The figures live in ``MEASURED`` (ours, from ``bench/bench_quantize.py``) and ``DOCUMENTED``
(LMDeploy's own documentation, marked as such); ``ADVICE`` says, per architecture, which of them to
recommend. A new measurement is a new row, not new prose in a handler.

Why per GPU: on the H200 W4A16 makes a 7B *slower* (0.66x bf16 on TurboMind, 0.61x on the PyTorch
engine; LMDeploy's maintainers say Hopper's int4 path is not optimized, lmdeploy#2416) while blocked
FP8 is 1.13x / 1.45x for one user through the app (2026-12-02; ~1.1x the best bf16 engine with 16 users); on Ampere and Ada W4A16 is LMDeploy's documented fast path (~2.4x fp16 on an
A100 or a 4090, the tutorial's figure). On a CPU, the dtype cast halves a float32 model; int8
weight-only (torchao) saves memory but decodes slower on the 2-core AVX2 machine it was measured on.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field

from .gpus import GpuSpec, local_gpus


@dataclass(frozen=True)
class Figure:
    """One measured (or documented) result: decode tokens/s of ``fmt`` on ``engine``.

    ``where``: the machine ("H200", "2-core AVX2 CPU"); ``model``: what ran; ``batch1``/``batch16``:
    decode tokens/s at batch 1 and 16 (None: not measured); ``vs``: the ratio to the reference
    (bf16 on the same engine, or float32 on a CPU) at batch 1; ``date``: when; ``source``: "ours"
    (a benchmark of this repo, named in ``note``) or "LMDeploy's docs"."""
    where: str
    engine: str          # turbomind | pytorch | transformers
    fmt: str             # bf16 | fp8 | w4a16 | float32 | bfloat16 | int8
    batch1: float | None
    batch16: float | None
    vs: float | None
    date: str
    source: str = "ours"
    model: str = ""
    note: str = ""


_H200 = dict(where="H200", date="2026-12-02", model="Llama-2-7B shape, 32k vocabulary, random weights, 256 new tokens",
             note="bench/bench_formats.py: through the app, each format's app loaded at once, medians of 5 "
                  "alternating rounds; batch 1 = one user's decode tok/s on /chat, batch 16 = 16 users on /v1 "
                  "(the engine's own token count); LMDeploy 0.18, its FP8 GEMM the Gluon kernel it picks on Hopper")
_H200_NOV = dict(where="H200", date="2026-11", model="Llama-2-7B shape, 32k vocabulary, random weights, 256 new tokens",
                 note="bench/bench_quantize.py, LMDeploy 0.18 (issue #17's table): the engine alone")
MEASURED: tuple[Figure, ...] = (      # today's rows first: ``_fig`` takes the first of a format and engine
    Figure(engine="turbomind", fmt="bf16", batch1=213.1, batch16=2934.9, vs=1.0, **_H200),
    Figure(engine="pytorch", fmt="bf16", batch1=233.9, batch16=2810.6, vs=1.0, **_H200),
    Figure(engine="turbomind", fmt="fp8", batch1=240.2, batch16=3275.3, vs=1.127, **_H200),
    Figure(engine="pytorch", fmt="fp8", batch1=338.2, batch16=3260.2, vs=1.446, **_H200),
    # W4A16 was measured against bf16 in November, the engine alone (not re-run: it does not pay here)
    Figure(engine="turbomind", fmt="bf16", batch1=212.8, batch16=3071, vs=1.0, **_H200_NOV),
    Figure(engine="pytorch", fmt="bf16", batch1=220.2, batch16=3018, vs=1.0, **_H200_NOV),
    Figure(engine="turbomind", fmt="w4a16", batch1=141.0, batch16=2150, vs=0.66, **_H200_NOV),
    Figure(engine="pytorch", fmt="w4a16", batch1=134.9, batch16=1993, vs=0.61, **_H200_NOV),
)
# The same run with LMDeploy's portable Triton FP8 GEMM (LMDEPLOY_BLOCKED_FP8_GEMM_BACKEND=triton): what the
# PyTorch engine falls back to on Hopper without DeepGEMM and without a Triton its Gluon kernel accepts
PYTORCH_FP8_TRITON = Figure(engine="pytorch", fmt="fp8", batch1=169.3, batch16=2131.3, vs=0.724,
                            **{**_H200, "note": _H200["note"] + "; LMDEPLOY_BLOCKED_FP8_GEMM_BACKEND=triton"})


def pytorch_fp8_gemm_fast() -> bool | None:
    """Whether LMDeploy's PyTorch engine would run blocked FP8 with a fast GEMM here: DeepGEMM, or its
    Gluon kernel, which LMDeploy 0.18 takes on Hopper with Triton >= 3.6 and < 3.8
    (``lmdeploy/pytorch/backends/cuda/blockedf8_modules.py``). Without either it uses a portable Triton
    kernel that made FP8 *slower* than bf16 on the H200 (``PYTORCH_FP8_TRITON``). None: LMDeploy is
    not installed (nothing to say). Read from package metadata, so nothing is imported. LMDeploy's own
    ``LMDEPLOY_BLOCKED_FP8_GEMM_BACKEND`` (a forced kernel) is not consulted: the engine layer reads no
    environment (settings.py does), and forcing a kernel is an expert's experiment, not a setup."""
    from importlib import metadata

    if importlib.util.find_spec("lmdeploy") is None:
        return None
    if importlib.util.find_spec("deep_gemm") is not None:
        return True
    try:
        major, minor = (int(x) for x in metadata.version("triton").split(".")[:2])
    except (metadata.PackageNotFoundError, ValueError):
        return False
    return (3, 6) <= (major, minor) < (3, 8)


# Measured here, on the CI machine (2 cores, AVX2, no AVX-512/VNNI), SmolLM2-135M-Instruct through the
# Quantize card on the Transformers engine (bench/bench_quantize.py --cpu; its JSON is in bench/results/
# 2026-12-02-cpu-quantize-smollm2.json), batch 1, 32 new tokens, a shared and busy machine (CPU_FIGURES_NOTE).
_CPU = dict(where="2-core AVX2 CPU", engine="transformers", date="2026-12-02", model="SmolLM2-135M-Instruct",
            note="bench/bench_quantize.py --cpu (the card on the Transformers engine, batch 1)")
CPU_MEASURED: tuple[Figure, ...] = (
    Figure(fmt="float32", batch1=4.4, batch16=None, vs=1.0, **_CPU),
    Figure(fmt="bfloat16", batch1=6.09, batch16=None, vs=1.38, **_CPU),
    Figure(fmt="int8", batch1=4.24, batch16=None, vs=0.96, **_CPU),
)
# the weights in memory (GiB) and held-out perplexity (2048 tokens) of the same run
CPU_MEMORY = {"float32": (0.501, 23.926), "bfloat16": (0.251, 23.946), "int8": (0.205, 23.994),
              "fp8": (0.251, 24.298)}
# (an earlier generate() run on the same busy machine had bfloat16 at 0.56x and int8 at 0.16x float32)
CPU_FIGURES_NOTE = "one run on a shared, busy machine: tokens/s vary between runs, memory and perplexity do not"
DOCUMENTED: tuple[Figure, ...] = (
    Figure(where="A100 / RTX 4090", engine="turbomind", fmt="w4a16", batch1=None, batch16=None, vs=2.4,
           date="LMDeploy's docs", source="LMDeploy's docs",
           note="the tutorial's W4A16 figure (~2.4x fp16 decode); LMDeploy supports W4A16 on V100 to Ada"),
)


@dataclass(frozen=True)
class Advice:
    """What the Quantize page recommends here.

    ``kind``: the job kind to preselect ("fp8", "awq", "cast"); ``engine``: the engine to load the
    result on ("pytorch", "turbomind", "transformers", "auto"); ``reason``: one sentence with the
    figures; ``date``: the figures' date; ``source``: "ours" or "LMDeploy's docs"; ``gpu``: the GPU
    it is for (None: a CPU); ``figures``: the rows it rests on; ``note``: what else to know (an
    engine that is not installed, an architecture not measured)."""
    kind: str
    engine: str
    reason: str
    date: str
    source: str
    gpu: str | None = None
    figures: tuple[Figure, ...] = field(default_factory=tuple)
    note: str = ""

    def markdown(self) -> str:
        """The advice as the page shows it: one bold line, the reason, the figures' date and source."""
        what = {"fp8": "FP8 (blocked e4m3)", "awq": "AWQ W4A16", "cast": "a dtype cast"}.get(self.kind, self.kind)
        engine = {"pytorch": "LMDeploy's PyTorch engine", "turbomind": "TurboMind", "transformers": "Transformers",
                  "auto": "the engine the app picks"}.get(self.engine, self.engine)
        where = self.gpu or "this CPU"
        text = f"**Recommended on {where}: {what} on {engine}.** {self.reason} ({self.source}, {self.date})"
        return text + (f" {self.note}" if self.note else "")


def _fig(fmt: str, engine: str, table=MEASURED) -> Figure | None:
    return next((f for f in table if f.fmt == fmt and f.engine == engine), None)


def available_backends() -> set[str]:
    """The engines installed here: Transformers always; TurboMind and LMDeploy's PyTorch engine
    where LMDeploy is installed (whether a GPU is there is ``local_gpus``' question)."""
    have = {"transformers"}
    if importlib.util.find_spec("lmdeploy") is not None:
        have |= {"turbomind", "pytorch"}
    return have


def _faster(fmt: str, backends: set[str], pytorch_fast: bool | None = True) -> Figure | None:
    """The measured figure of ``fmt`` on the fastest installed LMDeploy engine at batch 1 (for FP8 on
    the PyTorch engine without its fast GEMM, ``pytorch_fast`` False: the Triton kernel's figure)."""
    rows = [PYTORCH_FP8_TRITON if (fmt == "fp8" and f.engine == "pytorch" and pytorch_fast is False) else f
            for f in MEASURED if f.fmt == fmt and f.engine in backends and f.batch1]
    return max(rows, key=lambda f: f.batch1, default=None)


def advise(gpus: list[GpuSpec], backends: set[str] | None = None, pytorch_fast: bool | None = None) -> Advice:
    """The recommendation for this machine: ``gpus`` (``engines.gpus.local_gpus()``; [] on a CPU),
    ``backends`` (``available_backends()``; the engines installed) and ``pytorch_fast``
    (``pytorch_fp8_gemm_fast()`` when None: whether the PyTorch engine has its fast FP8 GEMM here)."""
    backends = available_backends() if backends is None else set(backends)
    if pytorch_fast is None:
        pytorch_fast = pytorch_fp8_gemm_fast()
    if not gpus:
        f32, bf16, int8 = (_fig(k, "transformers", CPU_MEASURED) for k in ("float32", "bfloat16", "int8"))
        return Advice(
            kind="cast", engine="transformers", gpu=None, date=f32.date, source="ours", figures=CPU_MEASURED,
            reason=(f"No CUDA GPU: Transformers runs the model. A float32 -> bfloat16 cast halves its size on disk "
                    f"and in memory; int8 weight-only (torchao, a load option) takes "
                    f"{CPU_MEMORY['int8'][0] / CPU_MEMORY['float32'][0]:.2f}x of float32's memory but decodes no "
                    f"faster on this kind of CPU: {f32.model} at batch 1, float32 {f32.batch1} tok/s, bfloat16 "
                    f"{bf16.batch1} ({bf16.vs:.2f}x), int8 {int8.batch1} ({int8.vs:.2f}x) on a {f32.where}; "
                    f"held-out perplexity {CPU_MEMORY['float32'][1]} / {CPU_MEMORY['bfloat16'][1]} / "
                    f"{CPU_MEMORY['int8'][1]}. FP8 and AWQ results load here too, dequantized."),
            note=f"Figures: {CPU_FIGURES_NOTE}.")
    gpu = gpus[0]
    label = gpu.name
    arch = gpu.arch
    lmdeploy = bool(backends & {"turbomind", "pytorch"})
    if arch in ("hopper", "blackwell"):
        best = _faster("fp8", backends, pytorch_fast) or _fig("fp8", "pytorch")
        bf16 = _fig("bf16", best.engine)
        top16 = max((f for f in MEASURED if f.fmt == "bf16" and f.date == best.date), key=lambda f: f.batch16)
        tm, pt = _fig("fp8", "turbomind"), _fig("fp8", "pytorch")
        w4 = _fig("w4a16", "turbomind")
        reason = (f"{best.where}: FP8 on {'the PyTorch engine' if best.engine == 'pytorch' else 'TurboMind'}, "
                  f"{best.vs:.2f}x bf16 for one user in our benchmark through the app ({best.batch1} vs "
                  f"{bf16.batch1} tok/s; TurboMind {tm.vs:.2f}x, PyTorch engine {pt.vs:.2f}x); with 16 users both "
                  f"FP8 engines make {min(tm.batch16, pt.batch16) / top16.batch16:.2f}-"
                  f"{max(tm.batch16, pt.batch16) / top16.batch16:.2f}x the best bf16 engine (TurboMind answers "
                  f"first sooner); W4A16 {w4.vs:.2f}x here (Hopper's int4 path is not optimized in LMDeploy), and "
                  f"FP8 halves the weights (0.52x on disk).")
        if pytorch_fast is False and "pytorch" in backends:
            reason += (f" The PyTorch engine would use LMDeploy's portable Triton FP8 kernel here (no DeepGEMM, and "
                       f"not a Triton its Hopper kernel takes: >= 3.6, < 3.8), {PYTORCH_FP8_TRITON.vs:.2f}x bf16 "
                       f"in the same run.")
        note = "" if arch == "hopper" else ("Measured on Hopper (H200); this Blackwell GPU has FP8 too but was "
                                            "not measured.")
        engine = best.engine
        if not lmdeploy:
            engine, note = "transformers", (note + " LMDeploy is not installed: the FP8 result loads on "
                                            "Transformers (pip install -r requirements-gpu.txt for the "
                                            "measured engines).").strip()
        return Advice(kind="fp8", engine=engine, reason=reason, date=best.date, source="ours", gpu=label,
                      figures=tuple(f for f in MEASURED if f.fmt in ("bf16", "fp8", "w4a16")), note=note)
    if arch in ("ampere", "ada", "turing", "volta"):
        doc = DOCUMENTED[0]
        note = ""
        if not lmdeploy:
            note = ("LMDeploy is not installed: AWQ runs LMDeploy's auto_awq and its result loads on TurboMind "
                    "(pip install -r requirements-gpu.txt).")
        if arch == "ada":
            note = (note + " Ada also has FP8 tensor cores: an FP8 job runs here too, but we have not measured it "
                    "on Ada.").strip()
        return Advice(kind="awq", engine="turbomind", gpu=label, date=doc.date, source=doc.source, figures=(doc,),
                      reason=(f"{label} ({arch.capitalize()}): W4A16 is LMDeploy's documented fast path on "
                              f"V100 to Ada, about {doc.vs}x fp16 decode on an A100 or RTX 4090 (the tutorial's "
                              "figure, not measured by us), at about 0.29x the weights on disk."), note=note)
    return Advice(kind="cast", engine="auto", gpu=label, date="", source="ours",
                  reason=(f"{label}: its architecture ({arch}) is not in our table, so no format is known to pay "
                          "here; a bfloat16/float16 cast of a float32 model halves its size."))


def engine_for(kind: str, gpus: list[GpuSpec], backends: set[str] | None = None) -> str | None:
    """The engine a result of ``kind`` should load on here: for FP8 on a GPU, the engine measured
    faster for one user (LMDeploy's PyTorch engine on Hopper, 1.45x bf16 against TurboMind's 1.13x,
    where its fast FP8 GEMM is there) among those installed; None where the app's own choice ("auto") is as good."""
    backends = available_backends() if backends is None else set(backends)
    if kind != "fp8" or not gpus or not backends & {"turbomind", "pytorch"}:
        return None
    best = _faster("fp8", backends, pytorch_fp8_gemm_fast())
    return best.engine if best else None


__all__ = ["Advice", "CPU_MEASURED", "DOCUMENTED", "Figure", "MEASURED", "PYTORCH_FP8_TRITON", "advise",
           "available_backends", "engine_for", "local_gpus", "pytorch_fp8_gemm_fast"]
