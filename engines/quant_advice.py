"""Which quantization pays on this machine: per-GPU advice as data.

The Quantize page recommends a format and an engine from the GPU's architecture (``engines.gpus``:
compute capability -> "hopper", "ampere", ...), with the measured reason and the date of the
figures. The figures live in ``MEASURED`` (ours, from ``bench/bench_quantize.py``) and ``DOCUMENTED``
(LMDeploy's own documentation, marked as such); ``ADVICE`` says, per architecture, which of them to
recommend. A new measurement is a new row, not new prose in a handler.

Why per GPU: on the H200 W4A16 makes a 7B *slower* (0.66x bf16 on TurboMind, 0.61x on the PyTorch
engine; LMDeploy's maintainers say Hopper's int4 path is not optimized, lmdeploy#2416) while blocked
FP8 is 1.16x / 1.33x; on Ampere and Ada W4A16 is LMDeploy's documented fast path (~2.4x fp16 on an
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


_H200 = dict(where="H200", date="2026-11", model="Llama-2-7B shape, 32k vocabulary, random weights, 256 new tokens",
             note="bench/bench_quantize.py, LMDeploy 0.18 (issue #17's table)")
MEASURED: tuple[Figure, ...] = (
    Figure(engine="turbomind", fmt="bf16", batch1=212.8, batch16=3071, vs=1.0, **_H200),
    Figure(engine="pytorch", fmt="bf16", batch1=220.2, batch16=3018, vs=1.0, **_H200),
    Figure(engine="turbomind", fmt="fp8", batch1=246.8, batch16=3542, vs=1.16, **_H200),
    Figure(engine="pytorch", fmt="fp8", batch1=293.6, batch16=3831, vs=1.33, **_H200),
    Figure(engine="turbomind", fmt="w4a16", batch1=141.0, batch16=2150, vs=0.66, **_H200),
    Figure(engine="pytorch", fmt="w4a16", batch1=134.9, batch16=1993, vs=0.61, **_H200),
)
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


def _faster(fmt: str, backends: set[str]) -> Figure | None:
    """The measured figure of ``fmt`` on the fastest installed LMDeploy engine at batch 1."""
    rows = [f for f in MEASURED if f.fmt == fmt and f.engine in backends and f.batch1]
    return max(rows, key=lambda f: f.batch1, default=None)


def advise(gpus: list[GpuSpec], backends: set[str] | None = None) -> Advice:
    """The recommendation for this machine: ``gpus`` (``engines.gpus.local_gpus()``; [] on a CPU)
    and ``backends`` (``available_backends()``; the engines installed)."""
    backends = available_backends() if backends is None else set(backends)
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
        best = _faster("fp8", backends) or _fig("fp8", "pytorch")
        bf16 = _fig("bf16", best.engine)
        tm, pt = _fig("fp8", "turbomind"), _fig("fp8", "pytorch")
        w4 = _fig("w4a16", "turbomind")
        reason = (f"{best.where}: FP8 on {'the PyTorch engine' if best.engine == 'pytorch' else 'TurboMind'}, "
                  f"{best.vs:.2f}x bf16 at batch 1 in our benchmark ({best.batch1} vs {bf16.batch1} tok/s; "
                  f"TurboMind {tm.vs:.2f}x, PyTorch engine {pt.vs:.2f}x); W4A16 {w4.vs:.2f}x here "
                  f"(Hopper's int4 path is not optimized in LMDeploy), and FP8 halves the weights (0.52x on disk).")
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
    faster (LMDeploy's PyTorch engine on Hopper, 1.33x against TurboMind's 1.16x) among those
    installed; None where the app's own choice ("auto") is as good."""
    backends = available_backends() if backends is None else set(backends)
    if kind != "fp8" or not gpus or not backends & {"turbomind", "pytorch"}:
        return None
    best = _faster("fp8", backends)
    return best.engine if best else None


__all__ = ["Advice", "CPU_MEASURED", "DOCUMENTED", "Figure", "MEASURED", "advise", "available_backends",
           "engine_for", "local_gpus"]
