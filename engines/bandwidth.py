"""The Monitor's memory-bandwidth meter: how close decoding runs to the GPU's memory bandwidth.

Decoding at small batch is memory bound: each step (one new token for every stream in the batch)
reads every weight a token passes through once, shared by all streams, and each stream's whole KV
cache at its context. So

    bytes per step = weights read per step + sum over the streams in the step of
                     (KV bytes per token x that stream's context tokens)
    bandwidth      = bytes per step x steps per second
    share          = bandwidth / (datasheet peak per GPU x GPUs)           (engines/gpus.py)

At batch 1 a step is a token, so this is the issue's "bytes per token x tokens/s" (Llama-2-7B bf16
on TurboMind: 13.2 GB x 212.8 tok/s = 2.81 TB/s, 59% of the H200's 4.8 TB/s).

**Weights read per step** are the weights as the engine holds them (``EngineInfo.extra
["weights_bytes"]``: bf16, FP8 with its block scales, AWQ int4 with its scales and zeros ...) less
the tensors a decode step does not read (``extra["weights_unread_bytes"]``): the input embedding
table when it is not tied to the output head (a token reads one row of it, 4096 x 2 bytes of the
7B's 262 MB), and a vision tower (it runs only when an image is prefilled).

**KV bytes per token** (``extra["kv_bytes_per_token"]``): layers x 2 (K and V) x kv_heads x
head_dim x bytes per element, by LMDeploy's ``quant_policy``: 16-bit (0), int8 (8) and int4 (4) with
a 16-bit scale and zero per token and head for K and for V (LMDeploy's cache layout:
``get_quant_cache_descs`` in the PyTorch engine, ``k_param``/``v_param`` in TurboMind's blocks),
FP8 (16, 17: one scale per tensor, nothing per token), TurboQuant (42: K 4-bit with 2 params, V 2-bit
with 1). A stream's context over its reply grows from its prompt to prompt + reply, so a finished
reply counts its mean context: prompt + reply tokens / 2.

**Live tokens/s** is the decode rate of the most recent finished reply on the loaded model (tokens
after the first over the time after the first, ``ReplyMetrics.tokens_per_s``, from the manager's
metrics log), updated as each reply ends. At batch > 1 the streams share steps: a stream gets one
token per step while it runs, so its own token rate *is* the step rate, and the batch is the
replies whose decode overlapped it (each weighted by the share of its decode they overlapped;
streams still running count with the tokens they have so far, their prompt not yet known). The meter
then gives bytes per step = weights + the KV of those streams, x steps/s. Replies of scratch engines
(engine comparison, KV sweep, the Quantize card) and of another model are left out.

What it does not see: prefill (a long prompt's first step reads more), MoE models (the figure counts
every expert's weights; a token reads only its top-k, so it is an upper bound), padding in a
batch-padded cache, activations, and a VLM's vision tower on LMDeploy's engines (counted as read;
the Transformers backend leaves it out). The arithmetic here is pure (no torch): tests check it against
hand computations.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterable, Sequence

from .gpus import gpu_spec, local_gpus

GB = 1e9      # decimal, as datasheets state bandwidth (TB/s = 10**12 bytes/s)

# LMDeploy's quant_policy -> (name, K bits, V bits, 16-bit params per token and head for K, for V)
KV_FORMATS: dict[int, tuple[str, int, int, int, int]] = {
    0: ("16-bit", 16, 16, 0, 0),
    8: ("int8", 8, 8, 2, 2),
    4: ("int4", 4, 4, 2, 2),
    16: ("fp8 e4m3", 8, 8, 0, 0),
    17: ("fp8 e5m2", 8, 8, 0, 0),
    42: ("TurboQuant K4/V2", 4, 2, 2, 1),
}

# sources whose replies come from a scratch engine beside the loaded one (loadtest.py, quantize.py,
# lmdeploy.measure_kv_capacity): the same model may run there with another cache setting
SCRATCH_SOURCES = frozenset({"compare", "quantize", "kv-probe"})
MIN_TOKENS = 8          # a reply shorter than this gives too few gaps for a decode rate
WINDOW_S = 600          # the most recent reply within the last ten minutes (the Monitor's window)


def kv_bytes_per_token(layers: int, kv_heads: int, head_dim: int, quant_policy: int = 0,
                       elem_bytes: int = 2) -> float:
    """Bytes of KV cache one token of context takes, all layers, K and V.

    ``quant_policy``: LMDeploy's KV quantization (``KV_FORMATS``); ``elem_bytes``: bytes of an
    unquantized element (2 for bf16/fp16, 4 for a float32 Transformers model), which is also the
    size of an int8/int4 scale or zero. ValueError for a policy not in ``KV_FORMATS``."""
    if quant_policy not in KV_FORMATS:
        raise ValueError(f"quant_policy must be one of {sorted(KV_FORMATS)}, got {quant_policy!r}")
    _, k_bits, v_bits, k_params, v_params = KV_FORMATS[quant_policy]
    if quant_policy == 0:
        k_bits = v_bits = 8 * elem_bytes
    per_head = head_dim * (k_bits + v_bits) / 8 + (k_params + v_params) * elem_bytes
    return layers * kv_heads * per_head


def kv_format(quant_policy: int = 0, elem_bytes: int = 2) -> str:
    """The KV element format in words: "16-bit", "int8", "32-bit" ..."""
    if quant_policy == 0:
        return f"{8 * elem_bytes}-bit"
    return KV_FORMATS.get(quant_policy, (f"quant_policy {quant_policy}",))[0]


def _text_config(cfg: dict) -> dict:
    return cfg.get("text_config") or cfg.get("llm_config") or cfg


def kv_bytes_from_config(cfg: dict, quant_policy: int = 0, elem_bytes: int = 2) -> float | None:
    """``kv_bytes_per_token`` from a model's ``config.json`` (its text part for a VLM); None where
    the shape is not the standard one (MLA's compressed cache, no layer count)."""
    text = _text_config(cfg or {})
    if text.get("kv_lora_rank"):          # DeepSeek's MLA: another cache layout
        return None
    layers, heads = text.get("num_hidden_layers"), text.get("num_attention_heads")
    if not layers or not heads:
        return None
    kv = text.get("num_key_value_heads") or heads
    head_dim = text.get("head_dim") or (text.get("hidden_size") or 0) // heads
    if not head_dim:
        return None
    return kv_bytes_per_token(int(layers), int(kv), int(head_dim), quant_policy, elem_bytes)


def embedding_bytes(cfg: dict, elem_bytes: int = 2) -> int:
    """Bytes of the input embedding table a decode step does not read: vocab x hidden x element when
    it is not tied to the output head (a tied table is read in full, as the head); 0 when tied or
    unknown. LMDeploy keeps it 16-bit in every weight format (AWQ and FP8 quantize linear layers)."""
    text = _text_config(cfg or {})
    tied = cfg.get("tie_word_embeddings", text.get("tie_word_embeddings", False))
    vocab, hidden = text.get("vocab_size"), text.get("hidden_size")
    if tied or not vocab or not hidden:
        return 0
    return int(vocab) * int(hidden) * elem_bytes


def weights_format(cfg: dict | None, model_format: str | None = None) -> str:
    """The weights' format in words: the quantization ("awq", "fp8" ...) where there is one (the
    ``model_format`` option, else ``quantization_config.quant_method``), else the checkpoint's dtype."""
    cfg = cfg or {}
    if model_format and model_format != "hf":
        return str(model_format)
    q = cfg.get("quantization_config") or _text_config(cfg).get("quantization_config") or {}
    if isinstance(q, dict) and q.get("quant_method"):
        return str(q["quant_method"])
    dtype = cfg.get("torch_dtype") or cfg.get("dtype") or _text_config(cfg).get("torch_dtype") or ""
    return "16-bit, from float32" if dtype == "float32" else str(dtype)


def lmdeploy_facts(cfg: dict | None, quant_policy: int = 0, model_format: str | None = None) -> dict:
    """The meter's figures for an LMDeploy engine (TurboMind or PyTorch), from ``config.json``:
    ``EngineInfo.extra`` keys ``kv_bytes_per_token``, ``kv_format``, ``weights_unread_bytes``,
    ``weights_format`` and ``moe_experts`` (``weights_bytes`` is the manager's, from the checkpoint
    as stored). {} where there is no config. Computation in LMDeploy is 16-bit: 2-byte elements."""
    if not cfg:
        return {}
    try:
        out = {"kv_format": kv_format(int(quant_policy), 2), "weights_unread_bytes": embedding_bytes(cfg, 2),
               "weights_format": weights_format(cfg, model_format), "moe_experts": moe_experts(cfg)}
        kv = kv_bytes_from_config(cfg, int(quant_policy), 2)
    except (TypeError, ValueError, AttributeError):  # an odd config: the meter says it has no figure
        return {}
    if kv is not None:
        out["kv_bytes_per_token"] = kv
    return out


def gpu_facts(index: int = 0) -> dict:
    """``extra`` keys ``gpu_name`` and ``gpu_capability`` of the CUDA device ``index`` the engine runs
    on (as torch numbers it, so CUDA_VISIBLE_DEVICES is honoured, unlike NVML's numbering); {} without."""
    gpus = local_gpus()
    if not 0 <= index < len(gpus):
        return {}
    return {"gpu_name": gpus[index].name, "gpu_capability": gpus[index].capability}


def moe_experts(cfg: dict | None) -> tuple[int, int] | None:
    """(experts a token uses, experts in all) for a mixture-of-experts config, else None."""
    text = _text_config(cfg or {})
    n = text.get("num_local_experts") or text.get("num_experts") or text.get("n_routed_experts")
    k = text.get("num_experts_per_tok") or text.get("moe_topk")
    return (int(k), int(n)) if n and k else None


@dataclass(frozen=True)
class ModelBytes:
    """What one decode step reads of a loaded model, in bytes (from ``EngineInfo.extra``)."""

    weights: int                  # the weights as the engine holds them
    kv_per_token: float           # KV bytes one token of context takes
    unread: int = 0               # weight bytes a step does not read (input embedding, vision tower)
    kv_format: str = "16-bit"     # the KV cache's element format in words ("16-bit", "int8" ...)
    weights_format: str = ""      # "bfloat16", "awq", "fp8" ... for the text
    tp: int = 1                   # GPUs the model is split over (their peaks add up)
    experts: tuple[int, int] | None = None   # MoE (used, all): the weights figure is an upper bound
    unread_what: str = "the input embedding table"   # what ``unread`` is, for the text

    @property
    def weights_read(self) -> int:
        return max(0, int(self.weights) - int(self.unread))

    @classmethod
    def from_extra(cls, extra: dict, weights_format: str = "") -> "ModelBytes | None":
        """From an engine's ``EngineInfo.extra``; None when it lacks the weights' or the KV's size."""
        w, kv = extra.get("weights_bytes"), extra.get("kv_bytes_per_token")
        if not w or kv is None:
            return None
        exp = extra.get("moe_experts")
        return cls(weights=int(w), kv_per_token=float(kv), unread=int(extra.get("weights_unread_bytes") or 0),
                   kv_format=str(extra.get("kv_format") or "16-bit"),
                   weights_format=str(extra.get("weights_format") or weights_format),
                   tp=max(1, int(extra.get("tp") or 1)), experts=tuple(exp) if exp else None,
                   unread_what=str(extra.get("weights_unread_what") or "the input embedding table"))


@dataclass(frozen=True)
class Stream:
    """One stream's decode as the meter sees it: wall-clock ``start`` (its first token) and ``end``,
    ``tokens`` decoded in between (after the first), its mean ``context`` tokens meanwhile."""

    start: float
    end: float
    tokens: int
    context: float

    @property
    def rate(self) -> float:
        """Tokens per second of this stream: at batch > 1 the engine's steps per second."""
        return self.tokens / (self.end - self.start) if self.end > self.start else 0.0


def stream_of_reply(m) -> Stream | None:
    """A finished reply (``telemetry.ReplyMetrics``: ``time`` its end, ``seconds``, ``ttft``,
    ``tokens``, ``prompt_tokens``) as a Stream; None when it has no measurable decode."""
    if m.ttft is None or m.tokens < 2 or m.seconds <= m.ttft:
        return None
    return Stream(start=m.time - m.seconds + m.ttft, end=m.time, tokens=m.tokens - 1,
                  context=(m.prompt_tokens or 0) + m.tokens / 2)


def stream_of_running(started: float, tokens: int, prompt_tokens: int = 0, now: float | None = None) -> Stream:
    """A stream still running (``manager.LiveRequest``: admitted at ``started``, ``tokens`` so far),
    for the batch it makes with others; its context is what it holds now."""
    now = time.time() if now is None else now
    return Stream(start=started, end=now, tokens=max(0, tokens - 1), context=(prompt_tokens or 0) + tokens)


@dataclass(frozen=True)
class Reading:
    """One figure of the meter: bytes per step x steps per second against the peak."""

    weights_read: int          # bytes of weights read per step
    kv_read: float             # bytes of KV read per step (all streams in the step)
    steps_per_s: float
    batch: float               # streams per step, averaged over the measured reply's decode
    context: float             # context tokens per step (all streams)
    peak_tbs: float | None     # per GPU; None: not in the table
    gpus: int = 1
    gpu: str = ""              # datasheet row, or the device name where it is not in the table
    model: ModelBytes | None = None
    age_s: float = 0.0         # seconds since the measured reply ended

    @property
    def bytes_per_step(self) -> float:
        return self.weights_read + self.kv_read

    @property
    def bytes_per_s(self) -> float:
        return self.bytes_per_step * self.steps_per_s

    @property
    def peak_bytes_per_s(self) -> float | None:
        return self.peak_tbs * 1e12 * self.gpus if self.peak_tbs else None

    @property
    def share(self) -> float | None:
        """bytes_per_s / peak (0.6 = 60%); None for a GPU not in the table."""
        peak = self.peak_bytes_per_s
        return self.bytes_per_s / peak if peak else None

    def text(self) -> str:
        """The Monitor's line, e.g. "Memory bandwidth at batch 1: 2.81 TB/s of 4.8 TB/s peak (59%) —
        13.2 GB per token × 212.8 tok/s (H200 SXM 141 GB)" and what the bytes are."""
        one = self.batch < 1.05
        unit = "token" if one else "step"
        peak = self.peak_bytes_per_s
        head = f"**Memory bandwidth** at batch {'1' if one else f'{self.batch:.1f}'}: {rate_text(self.bytes_per_s)}"
        gpus = f"{self.gpus} × {self.gpu}" if self.gpus > 1 else self.gpu
        if peak:
            head += f" of {rate_text(peak)} peak ({self.share:.0%})"
        head += (f" — {size_text(self.bytes_per_step)} per {unit} × {self.steps_per_s:.1f} "
                 f"{'tok' if one else 'steps'}/s")
        head += f" ({gpus})" if peak else (f". No datasheet peak for {self.gpu or 'this GPU'} "
                                            "(not in the studio's GPU table), so no share of it")
        m = self.model
        fmt = f" ({m.weights_format})" if m and m.weights_format else ""
        kv_fmt = m.kv_format if m else "16-bit"
        if m and m.unread:      # what was left out of the weights held, and why
            fmt = (f" ({m.weights_format + '; ' if m.weights_format else ''}{size_text(m.weights)} held less "
                   f"{size_text(m.unread)} a step does not read: {m.unread_what})")
        weights = f"weights {size_text(self.weights_read)}{fmt}" + ("" if one else f", read once for all "
                                                                                    f"{self.batch:.1f} streams,")
        ctx = f"{self.context:,.0f} tokens of context" + ("" if one else " together")
        body = f"Per {unit}: {weights} + KV cache {size_text(self.kv_read)} ({kv_fmt}, {ctx})"
        if not one:
            body += f"; {self.steps_per_s * self.batch:.1f} tokens/s in all"
        if m and m.experts:
            body += (f"; a mixture of experts: every expert's weights are counted, a token reads "
                     f"{m.experts[0]} of {m.experts[1]}, so this is an upper bound")
        age = "just now" if self.age_s < 1.5 else f"{self.age_s:.0f} s ago"
        return f"{head}.\n\n&nbsp;&nbsp;{body} · measured on the reply that ended {age}."


def size_text(n: float) -> str:
    """Bytes in decimal units (as bandwidth is quoted): "13.2 GB", "60.3 MB"."""
    if n >= GB:
        return f"{n / GB:.1f} GB"
    if n >= 1e6:
        return f"{n / 1e6:.1f} MB"
    return f"{n / 1e3:.1f} kB"


def rate_text(bps: float) -> str:
    """Bytes per second: "2.81 TB/s", "612 GB/s", "3.4 GB/s"."""
    if bps >= 1e12:
        return f"{bps / 1e12:.2f} TB/s"
    if bps >= 10 * GB:
        return f"{bps / GB:.0f} GB/s"
    return f"{bps / GB:.2f} GB/s"


def measure(model: ModelBytes, streams: Sequence[Stream], running: Iterable[Stream] = (), *,
            gpu_name: str = "", capability: tuple[int, int] | None = None,
            now: float | None = None) -> Reading | None:
    """The reading for the latest of ``streams`` (finished replies): its decode rate as steps/s,
    the others (finished or ``running``) that overlapped its decode as the batch, each counted by the
    share of the latest one's decode time it overlapped. ``gpu_name`` and ``capability`` pick the
    datasheet peak (``engines/gpus.py``); ``now`` (wall clock) dates the reading. None without a
    stream."""
    if not streams:
        return None
    last = max(streams, key=lambda s: s.end)
    span = last.end - last.start
    if span <= 0 or last.tokens < 1:
        return None
    batch, context = 1.0, last.context
    for s in (*streams, *running):
        if s is last:
            continue
        overlap = min(s.end, last.end) - max(s.start, last.start)
        if overlap > 0:
            f = min(1.0, overlap / span)
            batch += f
            context += f * s.context
    spec = gpu_spec(gpu_name, capability)
    now = time.time() if now is None else now
    return Reading(weights_read=model.weights_read, kv_read=model.kv_per_token * context,
                   steps_per_s=last.rate, batch=batch, context=context, peak_tbs=spec.peak_bandwidth_tbs,
                   gpus=model.tp, gpu=spec.source or gpu_name, model=model, age_s=max(0.0, now - last.end))


def why_no_figure(info) -> str | None:
    """Why the meter has no figure for ``info`` (an ``EngineInfo`` or None), in a sentence; None
    when it can measure."""
    if info is None:
        return "no model is loaded."
    if info.backend == "remote":
        return ("not measured for a remote engine: the model runs on another server, whose GPU, weights "
                "and KV cache this app cannot see.")
    if not str(info.device).startswith("cuda"):
        return (f"not measured on the {str(info.device).upper()}: the meter compares the bytes a decoded "
                "token reads (weights plus KV cache) with a GPU's datasheet memory bandwidth, and this "
                "model runs without a GPU.")
    if ModelBytes.from_extra(info.extra) is None:
        return (f"the {info.backend} engine did not report the size of its weights and KV cache for "
                "this model, so there is nothing to multiply by tokens/s.")
    return None


def meter_reading(info, replies: Sequence, running: Sequence = (), *, gpu_name: str = "",
                  now: float | None = None, window_s: float = WINDOW_S) -> Reading | None:
    """The meter's reading for the loaded engine ``info``: ``replies`` are the manager's metrics
    (``telemetry.ReplyMetrics``, every user's: the figure is the server's), ``running`` its live
    requests (``manager.LiveRequest``). ``gpu_name`` stands in where the engine did not record its GPU
    (NVML's first device). None where ``why_no_figure`` has a reason or no reply qualifies."""
    if why_no_figure(info):
        return None
    now = time.time() if now is None else now
    model = ModelBytes.from_extra(info.extra, weights_format=info.dtype)
    mine = [m for m in replies if m.backend == info.backend and m.model == info.model
            and m.source not in SCRATCH_SOURCES and m.finish_reason != "error" and m.tokens >= MIN_TOKENS
            and m.time >= now - window_s]
    streams = [s for s in map(stream_of_reply, mine) if s is not None]
    live = [stream_of_running(r.started, r.tokens, getattr(r, "prompt_tokens", 0) or 0, now) for r in running
            if r.source not in SCRATCH_SOURCES]
    cap = info.extra.get("gpu_capability")
    return measure(model, streams, live, gpu_name=info.extra.get("gpu_name") or gpu_name,
                   capability=tuple(cap) if cap else None, now=now)


def meter_text(info, replies: Sequence, running: Sequence = (), *, gpu_name: str = "",
               now: float | None = None, window_s: float = WINDOW_S) -> str:
    """The Monitor's bandwidth line (markdown): the reading of ``meter_reading``, or why there is none."""
    why = why_no_figure(info)
    if why:
        return f"**Memory bandwidth:** {why}"
    reading = meter_reading(info, replies, running, gpu_name=gpu_name, now=now, window_s=window_s)
    if reading is None:
        model = ModelBytes.from_extra(info.extra)
        return (f"**Memory bandwidth:** no reply of {MIN_TOKENS} tokens or more in the last "
                f"{window_s / 60:.0f} minutes to measure; it shows once one has streamed (weights "
                f"{size_text(model.weights_read)} + KV {size_text(model.kv_per_token)} per token of context "
                "are read per token).")
    return reading.text()


__all__ = ["GB", "KV_FORMATS", "MIN_TOKENS", "ModelBytes", "Reading", "SCRATCH_SOURCES", "Stream",
           "embedding_bytes", "gpu_facts", "kv_bytes_from_config", "kv_bytes_per_token", "kv_format", "lmdeploy_facts",
           "measure", "meter_reading", "meter_text", "moe_experts", "rate_text", "size_text", "stream_of_reply",
           "stream_of_running", "weights_format", "why_no_figure"]
