"""LMDeploy backends: TurboMind and LMDeploy's PyTorch engine, one adapter with two engine configs.

Both run behind ``lmdeploy.pipeline``: it owns an asyncio loop thread and batches every request it
is given continuously, so ``stream`` simply submits one request per call (a coroutine on that loop)
and relays the deltas; many callers at once are batched by the engine itself (no lock here). Each
request gets its own LMDeploy ``Session``; ``abort(request_id)`` stops it in any state (see
:class:`LMDeployEngine`), and a consumer that stops iterating early (a closed Gradio stream) aborts
it too.

Verified with LMDeploy 0.18 (``AsyncEngine.preprocess``/``generate``, ``Session.async_abort``);
``lmdeploy_available`` refuses older versions. LMDeploy is imported only when this backend is
built, so the app runs without it.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
from dataclasses import dataclass, field
from typing import Iterator, Sequence

from .base import (Capabilities, ChatMessage, ChatRequest, ContextTooLong, Delta, EngineError, EngineInfo,
                   EngineUnavailable, GenParams, ModelLoadError, SchedulerView, token_upper_bound)
from . import bandwidth, heap
from .configs import LMDeployConfig
from .models import read_generation_defaults

log = logging.getLogger(__name__)

BACKENDS = ("turbomind", "pytorch")


MIN_VERSION = (0, 18)      # the adapter runs requests through AsyncEngine.preprocess/generate (0.18)


def lmdeploy_available() -> tuple[bool, str]:
    try:
        import lmdeploy
    except Exception as e:  # noqa: BLE001 - any import failure means "not usable here"
        return False, f"LMDeploy is not installed ({type(e).__name__}); `pip install -r requirements-gpu.txt`"
    version = str(getattr(lmdeploy, "__version__", "0"))
    try:
        parts = tuple(int(x) for x in version.split(".")[:2])
    except ValueError:
        parts = (0, 0)
    if parts < MIN_VERSION:
        return False, (f"LMDeploy {version} is older than {'.'.join(map(str, MIN_VERSION))}, the version this "
                       "app's adapter was verified with; `pip install -r requirements-gpu.txt`")
    return True, ""


def turbomind_supports(path: str, trust_remote_code: bool = False) -> tuple[bool, str]:
    from lmdeploy.turbomind.supported_models import is_supported

    try:
        ok = is_supported(path, trust_remote_code=trust_remote_code)
    except Exception as e:  # noqa: BLE001
        return False, f"TurboMind cannot read this model ({e})"
    return ok, "" if ok else "TurboMind does not support this architecture"


def _image_part(img) -> dict:
    """An OpenAI-style image part for LMDeploy's multimodal processor (a PIL image or a path)."""
    if isinstance(img, str):
        from PIL import Image

        img = Image.open(img)
    return {"type": "image_data", "image_data": {"data": img}}


class _PilSafeImageProcessor:
    """Compatibility shim. LMDeploy 0.18's LLaVA-hf preprocessing calls the image processor with
    ``input_data_format='channels_last'``; transformers 5's torchvision-backed processors turn a PIL
    image into a channels-first tensor first and then misread it ("size of tensor a (336) must match
    the size of tensor b (3)", seen on the H100 with transformers 5.17). A PIL image's layout is never
    ambiguous, so for PIL input we let the processor infer it."""

    def __init__(self, inner):
        self._inner = inner

    def __call__(self, images, *args, **kwargs):
        from PIL import Image

        if isinstance(images, Image.Image) or (isinstance(images, (list, tuple)) and images and
                                               all(isinstance(i, Image.Image) for i in images)):
            kwargs.pop("input_data_format", None)
        return self._inner(images, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._inner, name)


def _patch_vision_preprocessor(pipe) -> None:
    model = getattr(getattr(pipe.async_engine, "vl_encoder", None), "model", None)
    proc = getattr(model, "processor", None)
    if proc is not None and callable(proc) and not isinstance(proc, _PilSafeImageProcessor):
        model.processor = _PilSafeImageProcessor(proc)
    _use_own_image_token(model)


def _use_own_image_token(model) -> None:
    """Second shim. LMDeploy 0.18 fills an image's places in the prompt with the tokenizer's *pad*
    token id and later finds them again with ``input_ids == pad_id`` (vl/model/base.py,
    pytorch/models/llava.py). Where the pad token also occurs in the rendered chat template, e.g.
    SmolLM2's tokenizer whose pad token is ``<|im_end|>``, the mask counts those too and the engine
    dies on a device-side assert in ``masked_scatter`` (seen on the H100). llava-hf models carry an
    image token of their own (``image_token_index``) that text never contains, so we place that one:
    the LLaVA model replaces those embeddings with the image features either way."""
    cfg = getattr(model, "hf_config", None)
    own = getattr(cfg, "image_token_index", None) or getattr(cfg, "image_token_id", None)
    if model is None or own is None or not hasattr(model, "image_token_id"):
        return
    if type(model).__name__ in ("LlavaHfVisionModel", "LlavaNextVisionModel") and model.image_token_id != own:
        log.info("LMDeploy vision model: image placeholder %s -> the model's own image token %s",
                 model.image_token_id, own)
        model.image_token_id = int(own)


def kv_bytes_per_token(cfg: dict, quant_policy: int = 0) -> float:
    """Bytes one token of KV cache takes (all layers, K and V): fp16/bf16, int8 (8), int4 (4) or fp8 (16)."""
    text = cfg.get("text_config", cfg)
    heads = text.get("num_attention_heads") or 1
    kv = text.get("num_key_value_heads") or heads
    head_dim = text.get("head_dim") or text.get("hidden_size", 0) // heads
    elem = {8: 1.0, 4: 0.5, 16: 1.0}.get(quant_policy, 2.0)
    return text.get("num_hidden_layers", 0) * 2 * kv * head_dim * elem


def weight_bytes(path: str, cfg: dict) -> int:
    """The weights' size on the GPU, from the checkpoint files (float32 ones are loaded as 16-bit)."""
    import os

    total = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path)
                if f.endswith((".safetensors", ".bin")))
    dtype = str(cfg.get("torch_dtype") or cfg.get("dtype") or cfg.get("text_config", {}).get("torch_dtype") or "")
    return total // 2 if "float32" in dtype and "quantization_config" not in cfg else total


def kv_tokens_estimate(cfg: dict, *, ratio: float, free_bytes: int, weights: int, quant_policy: int = 0,
                       tp: int = 1) -> int:
    """Tokens TurboMind's cache will hold: ``cache_max_entry_count`` is the share of the GPU memory
    still free once the weights are in (LMDeploy >= 0.2). Measured against TurboMind's own count on
    an H100 (Llama-2-7B shape, 0.05): 6570 estimated, 6720 held."""
    per_gpu_free = free_bytes - weights / tp
    per_token = kv_bytes_per_token(cfg, quant_policy) / tp
    return int(max(0, per_gpu_free) * ratio / per_token) if per_token else 0


MIN_CACHE_TOKENS = 4096


def cache_floor_tokens(cfg: dict, session_len: int | None) -> int:
    """Tokens the KV cache must hold: one session, counted as at most ``MIN_CACHE_TOKENS``. The
    floor is capped so that long-context models, whose default session is the whole context (LMDeploy
    takes max_position_embeddings), are not refused for a cache LMDeploy itself would accept: what
    hung was a cache of ~1300 tokens."""
    session = session_len or cfg.get("text_config", cfg).get("max_position_embeddings") or 4096
    return min(session, MIN_CACHE_TOKENS)


def min_cache_ratio(path: str, cfg: dict, session_len: int | None, quant_policy: int, tp: int,
                    free_bytes: int) -> float | None:
    """The smallest cache_max_entry_count whose cache holds ``cache_floor_tokens`` (None: unknown)."""
    per_ratio = kv_tokens_estimate(cfg, ratio=1.0, free_bytes=free_bytes, weights=weight_bytes(path, cfg),
                                   quant_policy=quant_policy, tp=tp)
    return cache_floor_tokens(cfg, session_len) / per_ratio if per_ratio else None


def suggested_cache_ratio(need: float) -> float:
    """The share to offer instead of one that is too small: 10% above the minimum, at most 0.95."""
    return round(min(0.95, need * 1.1), 3)


class LMDeployText:
    """Token ids to text for the streams of an engine that detokenizes elsewhere (built in the
    process that reads them: engines/core.py's parent). Runs LMDeploy's own tokenizer and its
    ``detokenize_incrementally`` from the prompt's ids on, as LMDeploy's ``generate`` does with the
    defaults the adapter leaves (skip special tokens, spaces between them)."""

    def __init__(self, path: str, trust_remote_code: bool = False):
        from lmdeploy.tokenizer import DetokenizeState, Tokenizer

        self.tok = Tokenizer(path, trust_remote_code=trust_remote_code)   # as LMDeploy's engine builds it
        self.State = DetokenizeState

    def stream(self, prompt_ids):
        """A function from each output's new ids to its new text, for one stream."""
        ids = list(prompt_ids)
        state = self.State(len(ids))
        tok = self.tok

        def feed(new) -> str:
            nonlocal state
            ids.extend(new)
            text, state = tok.detokenize_incrementally(ids, state)
            return text
        return feed


@dataclass(eq=False)
class _Call:
    """One request from ``stream``/``start`` until LMDeploy has let go of it. ``out`` carries
    LMDeploy's outputs to the pull relay (and the markers below); ``push`` replaces it on the push
    path; ``aborted`` is set by ``abort`` in any state."""

    request_id: str
    out: queue.Queue = field(default_factory=queue.Queue)
    aborted: threading.Event = field(default_factory=threading.Event)
    future: object = None        # concurrent.futures.Future of the coroutine on LMDeploy's loop
    task: object = None          # its asyncio.Task (set on the loop when it starts)
    session: object = None       # LMDeploy's Session, once it exists
    push: "_Push | None" = None  # the push path's sink (``LMDeployEngine.start``)


_ABORT = object()     # abort() was called: the relay ends the stream now
_END = object()       # the coroutine has ended: LMDeploy holds nothing of this request any more


class _Prompt:
    """(Detokenizing elsewhere.) The prompt's token ids, handed to the reader before LMDeploy's first
    output: the other side's detokenizer starts from them, as LMDeploy's own does."""

    def __init__(self, ids):
        self.ids = tuple(map(int, ids))


class _Failure:
    def __init__(self, message: str):
        self.message = message


class _Reader:
    """One request's LMDeploy outputs (and failures) as Deltas, for both paths: the pull relay
    (``stream``) and the push path (``start``). ``finished`` once a Delta with a finish reason
    went out; nothing is translated after it."""

    def __init__(self, engine: "LMDeployEngine"):
        self.engine = engine
        self.tokens = 0
        self.finished = False
        self.prompt_ids: tuple[int, ...] | None = None   # (ids out) the prompt's, until the first Delta

    def output(self, item) -> Delta | None:
        if self.finished:
            return None
        if isinstance(item, _Failure):
            return self._error(item.message)
        if isinstance(item, _Prompt):
            self.prompt_ids = item.ids
            return None
        self.tokens = item.generate_token_len
        reason = item.finish_reason
        if reason == "error":
            return self._error(getattr(item, "error_message", None) or item.response or
                               "LMDeploy reported an error")
        prompt = (getattr(item, "history_token_len", 0) or 0) + (getattr(item, "input_token_len", 0) or 0)
        self.finished = bool(reason)
        if self.engine._ids_out:        # text is made on the other side, from these ids
            first, self.prompt_ids = self.prompt_ids, None
            return Delta("", self.tokens, reason, prompt_tokens=prompt or None,
                         ids=tuple(map(int, getattr(item, "token_ids", None) or ())), prompt_ids=first)
        return Delta(item.response or "", self.tokens, reason, prompt_tokens=prompt or None)

    def final(self, reason: str) -> Delta | None:
        """The closing Delta ("abort", or "stop" when LMDeploy let go without a finish reason)."""
        if self.finished:
            return None
        self.finished = True
        return Delta("", self.tokens, reason)

    def _error(self, message: str) -> Delta:
        self.finished = True
        self.engine._note_error(message)
        return Delta("", self.tokens, "error", message)


class _Push:
    """The push path (``LMDeployEngine.start``): each output is translated where it arrives, on
    LMDeploy's event loop, and handed to ``sink`` there; ``abort`` hands its closing Delta over
    from the caller's thread. No thread of ours waits on a queue per request, so nothing of ours
    is woken per token (engines/core.py's engine process serves many streams this way: with
    LMDeploy's PyTorch engine, which schedules every step in Python on that loop, a woken thread
    per stream per token competed with it for the GIL). The lock orders the two threads' Deltas:
    none goes out after the closing one."""

    def __init__(self, engine: "LMDeployEngine", sink):
        self.reader = _Reader(engine)
        self.sink = sink
        self.lock = threading.Lock()
        self.ended = False

    def output(self, item) -> None:
        with self.lock:
            d = self.reader.output(item)
            if d is not None:
                self.sink(d)

    def abort(self) -> None:
        with self.lock:
            d = self.reader.final("abort")
            if d is not None:
                self.sink(d)

    def end(self) -> None:
        """LMDeploy has let go of the request: the closing Delta if none went out, then ``None``."""
        with self.lock:
            if self.ended:
                return
            self.ended = True
            d = self.reader.final("stop")
            if d is not None:
                self.sink(d)
            self.sink(None)


class LMDeployEngine:
    """TurboMind or LMDeploy's PyTorch engine behind ``lmdeploy.pipeline``.

    Each request runs as one coroutine on LMDeploy's own event loop (``AsyncEngine.preprocess`` then
    ``AsyncEngine.generate``, what ``Pipeline.stream_infer`` runs for each prompt), which hands its
    outputs to the caller's thread through a queue. Owning the coroutine is what lets
    ``abort(request_id)`` work in every state:

    * before LMDeploy has the request (``stream`` has not submitted it yet, or the coroutine has not
      started): the id is marked aborted, and the coroutine checks the mark when it starts;
    * waiting for one of LMDeploy's request handles (every place of ``max_batch_size`` taken) or
      being preprocessed: the coroutine is cancelled (it holds no engine instance yet);
    * prefilling or decoding: LMDeploy's own ``Session.async_abort`` (an engine cancel); checked
      again after each output, for an abort that came just before the engine had the sequence.

    In every case the stream ends at once with finish reason "abort" (the relay is woken through the
    queue, not by LMDeploy)."""

    def __init__(self, resolved, config: LMDeployConfig):
        backend = config.backend
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}")
        self._check_gpu(config)
        cfg = resolved.config
        self.vision = resolved.vision
        if resolved.local and cfg:
            self._check_weights_fit(resolved.path, cfg, config.tp)
        if backend == "turbomind" and resolved.local:
            ok, why = resolved.turbomind_support(config.trust_remote_code)
            if not ok:
                raise ModelLoadError(f"{why}: {resolved.spec!r}. Try the 'pytorch' or 'transformers' engine.")
            self._check_kv_room(resolved.path, cfg, config.cache_max_entry_count, config.session_len,
                                config.quant_policy, config.tp)
        self.pipe = self._pipeline(resolved, config)
        if self.vision:
            _patch_vision_preprocessor(self.pipe)
        bc = self.pipe.backend_config
        # diagnostic switch (Settings.lmdeploy_wait_end): a stream ends when LMDeploy has let go of
        # the request rather than at the response that carries the finish reason (A/B runs)
        self._wait_end = bool(config.wait_end)
        self._ids_out = False      # detokenize_elsewhere() was called: Deltas carry ids, not text
        self._trust_remote_code = bool(config.trust_remote_code)
        self._lock = threading.Lock()
        self._calls: dict[str, _Call] = {}
        self._closed = False
        self._fatal: str | None = None
        self._path = resolved.path
        self.info = EngineInfo(
            backend=backend, model=resolved.spec, model_path=resolved.path, device="cuda",
            dtype=str(getattr(bc, "dtype", config.dtype)), context_length=int(bc.session_len or 2048),
            vision=self.vision, max_batch=int(bc.max_batch_size or 64),
            # LMDeploy's GenerationConfig (0.18) has no presence/frequency penalty: not claimed
            capabilities=Capabilities(penalties=False, vision=self.vision, seed=True),
            defaults=read_generation_defaults(resolved.path) if resolved.local else None,
            extra={"tp": config.tp, "quant_policy": config.quant_policy, "model_format": config.model_format,
                   "cache_max_entry_count": config.cache_max_entry_count,
                   "cache_block_seq_len": int(getattr(bc, "cache_block_seq_len", 0) or 64),
                   # the Monitor's bandwidth meter: KV bytes per token, weights a step does not read, the GPU
                   **bandwidth.lmdeploy_facts(cfg, config.quant_policy, config.model_format),
                   **bandwidth.gpu_facts(0)})

    # ------------------------------------------------------------------ loading
    @staticmethod
    def _check_gpu(config: LMDeployConfig) -> None:
        ok, why = lmdeploy_available()
        if not ok:
            raise EngineUnavailable(why)
        import torch

        if not torch.cuda.is_available():
            raise EngineUnavailable(f"LMDeploy's {config.backend} engine needs a CUDA GPU; none is visible.")
        n_gpu = torch.cuda.device_count()
        if config.tp > n_gpu:
            raise EngineUnavailable(f"--tp {config.tp} asks for {config.tp} GPUs but {n_gpu} is visible.")

    @staticmethod
    def _pipeline(resolved, config: LMDeployConfig):
        """LMDeploy's pipeline for ``config`` (the only place LMDeploy's engine is built)."""
        import torch
        from lmdeploy import PytorchEngineConfig, TurbomindEngineConfig, pipeline

        common = dict(tp=config.tp, cache_max_entry_count=config.cache_max_entry_count,
                      session_len=config.session_len, quant_policy=config.quant_policy, dtype=config.dtype)
        if config.max_batch:
            common["max_batch_size"] = config.max_batch
        if config.backend == "turbomind":
            fmt = None if config.model_format == "hf" else config.model_format
            engine_cfg = TurbomindEngineConfig(model_format=fmt, **common)
        else:
            # a blocked-FP8 folder says so in its config.json, which the PyTorch engine reads; its
            # model_format="fp8" would mean "quantize a bf16 model to FP8 while loading" instead
            engine_cfg = PytorchEngineConfig(**common)
        try:
            return pipeline(resolved.path, backend_config=engine_cfg, log_level="ERROR",
                            trust_remote_code=config.trust_remote_code)
        except Exception as e:  # noqa: BLE001 - LMDeploy raises many types; the UI needs one
            heap.collect()       # the frozen heap too (engines/heap.py)
            torch.cuda.empty_cache()
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ModelLoadError(f"LMDeploy ({config.backend}) cannot load {resolved.spec!r}: {msg}") from e

    @staticmethod
    def _check_weights_fit(path, cfg, tp) -> None:
        """Refuse a model whose weights cannot fit in the free GPU memory, with the figures, before
        LMDeploy allocates anything (an out-of-memory half way through a load leaves less behind and
        says less)."""
        import torch

        free = torch.cuda.mem_get_info()[0]
        weights = weight_bytes(path, cfg) / tp
        # TurboMind also allocates workspace and cuBLAS buffers beside the weights and the KV cache
        # (which is a share of what the weights leave): keep 1 GiB (or 5%) for them
        if weights + max(2**30, 0.05 * free) > free:
            raise ModelLoadError(
                f"Not enough GPU memory: the weights take {weights / 2**30:.2f} GiB per GPU and "
                f"{free / 2**30:.2f} GiB is free. Unload a model, stop other GPU processes, or use a "
                "quantized (AWQ) version of the model.")

    @staticmethod
    def _check_kv_room(path, cfg, ratio, session_len, quant_policy, tp) -> None:
        """Refuse a cache too small for one session (at most 4096 tokens) before TurboMind sees it:
        LMDeploy 0.18's TurboMind did not finish loading then (seen twice on an H100: a Llama-2-7B
        shape with cache_max_entry_count 0.01, room for ~1300 tokens against a 4096-token session,
        still loading when killed after 3 and 6 minutes; 0.05 loaded in 4 s), where the tutorial's
        older LMDeploy simply ran with a tiny cache."""
        import torch

        if not 0 < ratio < 1 or not torch.cuda.is_available():
            return
        free = torch.cuda.mem_get_info()[0]
        need = min_cache_ratio(path, cfg, session_len, quant_policy, tp, free)
        if need and ratio < need:
            floor = cache_floor_tokens(cfg, session_len)
            tokens = int(floor * ratio / need)
            raise ModelLoadError(
                f"cache_max_entry_count {ratio} leaves the KV cache room for about {tokens} tokens, less than "
                f"{floor}; TurboMind 0.18 was seen not to finish loading then. Raise "
                f"cache_max_entry_count to at least {suggested_cache_ratio(need):.2f}, or lower the session "
                f"length to {max(256, tokens // 2)}.")

    def perplexity(self, text: str, max_tokens: int = 4096, window: int = 512) -> dict:
        """Perplexity of ``text`` (no chat template) with LMDeploy's own ``Pipeline.get_ppl`` (its
        mean cross-entropy per window), in the same windows as the Transformers engine
        (``transformers.ppl_windows``). For the Quantize card on a scratch engine. Returns
        {"perplexity", "tokens"}."""
        import math

        from .transformers import ppl_windows

        ids = self.pipe.async_engine.tokenizer.encode(text, add_bos=False, add_special_tokens=False)
        windows = ppl_windows(ids, max_tokens, window)
        if not windows:
            raise ValueError("the text is too short for a perplexity (fewer than 2 tokens)")
        losses = self.pipe.get_ppl(windows)
        nll = sum(float(loss) * (len(w) - 1) for loss, w in zip(losses, windows))
        scored = sum(len(w) - 1 for w in windows)
        return {"perplexity": math.exp(nll / scored), "tokens": scored}

    # ------------------------------------------------------------------ prompt
    def _messages(self, messages: Sequence[ChatMessage]) -> list[dict]:
        out = []
        for m in messages:
            if m.images:
                parts = [{"type": "text", "text": m.content}] + [_image_part(i) for i in m.images]
                out.append({"role": m.role, "content": parts})
            else:
                out.append({"role": m.role, "content": m.content})
        return out

    @staticmethod
    def _gen_config(p: GenParams):
        from lmdeploy import GenerationConfig

        kw = dict(max_new_tokens=p.max_new_tokens, repetition_penalty=p.repetition_penalty)
        if p.greedy:
            kw.update(do_sample=False, top_k=1)
        else:
            kw.update(do_sample=True, temperature=p.temperature, top_p=p.top_p, top_k=p.top_k)
        if p.seed is not None:
            kw["random_seed"] = p.seed
        return GenerationConfig(**kw)

    def detokenize_elsewhere(self):
        """Leave turning token ids into text to the process that reads the streams (engines/core.py
        calls this in the engine process when asked: ``TURBOSTUDIO_CORE_DETOKENIZE=1``). Returns
        what that process builds to do it (``"module:function"``, its arguments), or None where this
        LMDeploy cannot (then nothing changes).

        Why: LMDeploy detokenizes every output of every stream incrementally on its event loop, the
        thread that also schedules every step of its PyTorch engine and takes TurboMind's outputs. On
        the H200 (2026-12-03, ``bench/probe_pytorch_gap.py``, 16 users) that work was a third of
        TurboMind's loop CPU per token and its removal sped the push path by 3% (TurboMind, 16
        users), 9% (TurboMind, 64) and 4.8% (PyTorch engine, 16). vLLM's V1 detokenizes in its
        front-end process for the same reason. How: LMDeploy's ``generate`` asks its tokenizer for
        each output's text and hands on the new token ids beside it; here the tokenizer's
        ``detokenize_incrementally`` only advances its offsets, each Delta carries those ids (and the
        first one the prompt's), and the other process runs LMDeploy's own ``detokenize_incrementally``
        over the same ids (:class:`LMDeployText`): the same text, made by the same code."""
        tok = getattr(self.pipe.async_engine, "tokenizer", None)
        try:
            from lmdeploy.tokenizer import DetokenizeState
        except ImportError:
            return None
        if tok is None or not callable(getattr(tok, "detokenize_incrementally", None)):
            return None

        def detokenize_incrementally(all_input_ids, state, skip_special_tokens=True,
                                     spaces_between_special_tokens=True):
            return "", DetokenizeState(len(all_input_ids), None, 0, 0)

        tok.detokenize_incrementally = detokenize_incrementally   # this engine's tokenizer only
        self._ids_out = True
        return ("engines.lmdeploy:LMDeployText", (self._path, self._trust_remote_code))

    def count_tokens(self, messages: Sequence[ChatMessage]) -> int:
        eng = self.pipe.async_engine
        text_only = [ChatMessage(m.role, m.content) for m in messages]
        try:
            prompt = eng.chat_template.messages2prompt(self._messages(text_only))
            n = len(eng.tokenizer.encode(prompt, add_bos=True))
        except Exception:  # noqa: BLE001 - an estimate is fine for trimming the history
            n = len(eng.tokenizer.encode("".join(m.content for m in messages))) + 8 * len(messages)
        n_images = sum(len(m.images) for m in messages)
        if n_images:   # the vision model's own count of tokens an image expands to (LLaVA: 576)
            vl = getattr(getattr(eng, "vl_encoder", None), "model", None)
            n += n_images * int(getattr(vl, "n_token_per_image", 0) or 0)
        return n

    def message_tokens(self, messages: Sequence[ChatMessage]) -> list[int]:
        """Each message's own text tokens, through LMDeploy's tokenizer (no BOS, no template)."""
        tok = self.pipe.async_engine.tokenizer
        return [len(tok.encode(m.content, add_bos=False)) if m.content else 0 for m in messages]

    # ------------------------------------------------------------------ requests
    def stream(self, request: ChatRequest) -> Iterator[Delta]:
        return self._relay(self._submit(request))

    def start(self, request: ChatRequest, sink) -> None:
        """The push form of ``stream`` (engines/core.py's engine process uses it): returns once the
        request is submitted (raising what ``stream`` raises, before any Delta); then ``sink(delta)``
        is called for each Delta, from LMDeploy's event loop (or from ``abort``'s caller for the
        closing "abort"), and ``sink(None)`` once, when LMDeploy has let go of the request. ``sink``
        must be quick and must not block: it runs on LMDeploy's loop."""
        call = self._submit(request, _Push(self, sink))
        if call.future is None:             # aborted before LMDeploy had it
            call.push.end()

    def _submit(self, request: ChatRequest, push: _Push | None = None) -> _Call:
        if self._closed:
            raise EngineUnavailable("This model was unloaded.")
        dead = self.health()
        if dead:
            raise EngineError(f"The engine stopped ({dead}). Reload the model on the Engines page.",
                              code="engine_dead")
        call = _Call(request.request_id, push=push)
        with self._lock:
            if call.request_id in self._calls:
                raise EngineError(f"A request with id {call.request_id!r} is still running.",
                                  code="invalid_request")
            self._calls[call.request_id] = call     # from here on abort() finds it
        try:
            messages = request.messages
            bound = token_upper_bound(messages)
            ctx = self.info.context_length
            # a count the manager made while fitting the history is taken as it is: in the engine
            # process this runs on the frame thread, where a second count of a long prompt (or of any
            # prompt with images) would hold every frame behind it
            n_prompt = request.prompt_tokens or (bound if bound is not None and bound < ctx else
                                                 self.count_tokens(messages))
            if n_prompt >= ctx:
                raise ContextTooLong(f"The prompt takes {n_prompt} tokens; the session length is "
                                     f"{ctx} (raise --session-len if the model allows).")
            prompt, gen_config = self._messages(messages), self._gen_config(request.params)
            if not call.aborted.is_set():
                call.future = asyncio.run_coroutine_threadsafe(self._generate(call, prompt, gen_config),
                                                               self._loop())
        except BaseException:
            self._forget(call)
            raise
        if call.future is None:             # aborted before LMDeploy had it: nothing to undo there
            self._forget(call)
        return call

    def _loop(self):
        return self.pipe.internal_thread.loop

    async def _generate(self, call: _Call, prompt: list[dict], gen_config) -> None:
        """(LMDeploy's event loop.) One request, as ``Pipeline.stream_infer`` runs it, into ``call.out``."""
        call.task = asyncio.current_task()
        eng = self.pipe.async_engine
        emit = call.push.output if call.push is not None else call.out.put
        session = None
        try:
            if call.aborted.is_set():        # aborted before it started: LMDeploy never sees it
                return
            session = call.session = self.pipe.session()
            request = await eng.preprocess(messages=prompt, session_id=session, gen_config=gen_config)
            if call.aborted.is_set():
                return
            if self._ids_out:
                emit(_Prompt(request.inputs["input_ids"]))
            stopping = False
            async for out in eng.generate(request, stream_response=True):
                if call.aborted.is_set():
                    if not stopping:         # an abort that came before the engine had the sequence
                        stopping = True
                        await session.async_abort()
                    continue
                emit(out)
        except asyncio.CancelledError:       # abort() while it waited for a place or was preprocessed
            pass
        except Exception as e:  # noqa: BLE001 - LMDeploy's RequestError and the rest: that request fails
            message = getattr(e, "message", None) or str(e) or type(e).__name__
            emit(_Failure(str(message)))
        finally:
            if session is not None:
                try:
                    await session.async_close()   # idempotent: generate() removes it at its end
                except Exception:  # noqa: BLE001
                    log.debug("closing an LMDeploy session failed", exc_info=True)
            self._forget(call)
            if call.push is not None:
                call.push.end()
            else:
                call.out.put(_END)

    async def _stop(self, call: _Call) -> None:
        """(LMDeploy's event loop.) Stop ``call`` where it is: an engine cancel once it holds an
        engine instance, else cancel its coroutine (waiting for a place, or being preprocessed)."""
        session, task = call.session, call.task
        if session is not None and getattr(session, "_handle", None) is not None:
            await session.async_abort()
        elif task is not None and not task.done():
            task.cancel()

    def _relay(self, call: _Call) -> Iterator[Delta]:
        """(The pull path.) LMDeploy's outputs as Deltas. The stream ends at the output that carries
        a finish reason (LMDeploy lets go of the request on its own loop a moment later), or at once
        on abort."""
        reader = _Reader(self)
        try:
            while True:
                item = call.out.get()
                if item is _ABORT or item is _END:
                    d = reader.final("abort" if item is _ABORT else "stop")
                    if d is not None:
                        yield d
                    return
                d = reader.output(item)
                if d is not None:
                    yield d
                    # (wait_end: read on to _END; what follows the finish carries nothing)
                    if reader.finished and (not self._wait_end or d.finish_reason == "error"):
                        return
        finally:
            if not reader.finished:          # the consumer left early: stop the request
                self.abort(call.request_id)
            if call.aborted.is_set() and call.future is not None:
                # the place is given back when LMDeploy has let go of the request (a cancel takes
                # a step): bounded, so a busy or stuck engine cannot hold the caller past 0.5 s
                try:
                    call.future.result(timeout=0.5)
                except Exception:  # noqa: BLE001 - timeout or the coroutine's own end
                    log.debug("LMDeploy took over 0.5 s to let go of %s", call.request_id)

    def abort(self, request_id: str) -> None:
        """End ``request_id``'s stream now with finish reason "abort", in any state (see the class)."""
        with self._lock:
            call = self._calls.get(request_id)
        if call is None or call.aborted.is_set():
            return
        call.aborted.set()
        if call.push is not None:
            call.push.abort()
        else:
            call.out.put(_ABORT)
        if call.future is not None and not self._closed:
            stop = self._stop(call)
            try:
                asyncio.run_coroutine_threadsafe(stop, self._loop())
            except Exception:  # noqa: BLE001 - the loop has stopped: nothing runs there any more
                stop.close()     # never scheduled: closed here rather than warned about at collection
                log.debug("abort of %s could not reach LMDeploy's loop", request_id, exc_info=True)

    def _forget(self, call: _Call) -> None:
        with self._lock:
            if self._calls.get(call.request_id) is call:
                del self._calls[call.request_id]

    # errors after which a CUDA context is unusable: the engine must be reloaded, not retried
    _FATAL = ("device-side assert", "illegal memory access", "CUDA error", "cudaError", "NCCL error",
              "unspecified launch failure")

    def health(self) -> str | None:
        """Why this engine can no longer serve (the Engines page says so and offers a reload), or
        None: LMDeploy's event-loop thread has ended, or a request failed with a CUDA error."""
        if self._closed:
            return None
        if self._fatal:
            return self._fatal
        th = getattr(getattr(self.pipe, "internal_thread", None), "thread", None)
        if th is not None and not th.is_alive():
            return "LMDeploy's event loop has stopped"
        return None

    def _note_error(self, message: str) -> None:
        if any(k.lower() in (message or "").lower() for k in self._FATAL):
            self._fatal = message.strip().splitlines()[0][:300]
            log.error("LMDeploy engine marked dead: %s", self._fatal)

    def live_requests(self) -> int:
        """Requests held: ours that LMDeploy has not let go of yet, or LMDeploy's own sessions where
        it holds more (each request has one session, removed when the request ends): above zero
        once every stream ended is a leak in either layer."""
        with self._lock:
            ours = len(self._calls)
        return max(ours, self.lmdeploy_sessions() or 0)

    def lmdeploy_sessions(self) -> int | None:
        """Sessions in LMDeploy's own session manager (for leak checks: it should fall back to zero
        with ``live_requests``); None where this LMDeploy has no such manager."""
        pipe = self.pipe
        if pipe is None:
            return None
        mgr = getattr(pipe, "session_mgr", None) or getattr(getattr(pipe, "async_engine", None), "session_mgr", None)
        return len(getattr(mgr, "sessions", {}) or {}) if mgr is not None else None

    def scheduler(self) -> SchedulerView | None:
        """TurboMind's scheduler: running and waiting sequences and the KV cache's used fraction
        (None where the engine gives no synchronous view, e.g. LMDeploy's PyTorch engine)."""
        eng = getattr(getattr(self.pipe, "async_engine", None), "engine", None)
        fn = getattr(eng, "get_schedule_metrics", None)
        if fn is None or self.info.backend != "turbomind":
            return None
        try:
            m = fn()
        except Exception:  # noqa: BLE001
            return None
        if asyncio.iscoroutine(m):       # a version whose metrics are async: no synchronous view
            m.close()
            return None
        return SchedulerView(active=int(m.active_seqs), waiting=int(m.waiting_seqs),
                             cache_usage=float(m.cache_usage))

    def kv_capacity(self) -> dict | None:
        """The tokens LMDeploy's PyTorch engine's KV cache holds, its own count: the blocks it
        allocated (less those it reserves) x tokens per block, from the engine's ``cache_config``
        (LMDeploy 0.18: ``pipeline.async_engine.engine.cache_config``, filled in once the cache is
        built). None elsewhere (TurboMind: ``measure_kv_capacity`` reads its scheduler instead) or
        where this version keeps the engine in another process."""
        if self.info.backend != "pytorch":
            return None
        cfg = getattr(getattr(getattr(self.pipe, "async_engine", None), "engine", None), "cache_config", None)
        try:
            blocks = int(cfg.num_gpu_blocks) - int(getattr(cfg, "num_reserved_gpu_blocks", 0) or 0)
            block = int(cfg.block_size)
        except (AttributeError, TypeError, ValueError):
            return None
        return {"tokens": blocks * block, "blocks": blocks, "block_tokens": block} if blocks > 0 else None

    def close(self) -> None:
        if self._closed:
            return
        with self._lock:
            calls = list(self._calls.values())
        for call in calls:           # every open stream ends now, with "abort"
            self.abort(call.request_id)
        self._closed = True
        try:
            self.pipe.close()
        finally:
            self.pipe = None
            for call in calls:       # LMDeploy is gone: the push path's ends, which its loop would have sent
                if call.push is not None:
                    call.push.end()
            heap.collect()       # the frozen heap too (engines/heap.py)
            import torch

            torch.cuda.empty_cache()


def measure_kv_capacity(manager, timeout: float = 30.0) -> dict | None:
    """How many tokens the loaded LMDeploy engine's KV cache holds. LMDeploy's PyTorch engine
    counts its own blocks (``LMDeployEngine.kv_capacity``). TurboMind's is measured rather than estimated:
    one request whose prompt ends mid-block is submitted through ``manager`` (the one road),
    TurboMind's ``cache_usage`` (blocks in use over blocks in all) is read while it runs, and blocks
    in use are known exactly (``ceil(tokens / block)``), so blocks in all = in use / usage.
    Returns {"tokens", "blocks", "block_tokens"}, or None where the engine gives no cache view."""
    import time

    from .base import ChatRequest

    info = manager.info()
    if info is None:
        return None
    own = getattr(manager.require(), "kv_capacity", None)    # the PyTorch engine counts its blocks itself
    counted = own() if own is not None else None
    if counted:
        return counted
    if manager.scheduler() is None:
        return None
    block = int(info.extra.get("cache_block_seq_len") or 64)
    words = "Count the blocks of this cache, one by one, slowly:"
    msgs = [ChatMessage("user", words)]
    n = manager.token_cost(msgs)
    while not block // 8 <= n % block <= block // 4:      # leave room for a few generated tokens
        words += " ok"
        msgs = [ChatMessage("user", words)]
        n = manager.token_cost(msgs)
    usage, tokens = 0.0, 0
    sub = manager.submit(ChatRequest(tuple(msgs), GenParams(temperature=0, max_new_tokens=block // 2),
                                     source="kv-probe"))
    it = iter(sub)
    try:
        deadline = time.time() + timeout
        for d in it:
            tokens = d.tokens
            view = manager.scheduler()
            if view is not None and (view.cache_usage or 0) > 0 and tokens >= 1:
                usage = view.cache_usage
                break
            if time.time() > deadline:
                break
    finally:
        it.close()
    if usage <= 0:
        return None
    used = -(-(n + tokens) // block)
    blocks = round(used / usage)
    return {"tokens": blocks * block, "blocks": blocks, "block_tokens": block}
