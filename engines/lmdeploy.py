"""LMDeploy backends: TurboMind and LMDeploy's PyTorch engine, one adapter with two engine configs.

Both run behind ``lmdeploy.pipeline``: it owns an asyncio loop thread and batches every request it
is given continuously, so ``stream`` simply submits one request per call and relays the deltas; many
callers at once are batched by the engine itself (no lock here). Each call gets its own LMDeploy
``Session``; ``abort(session_id)`` cancels that session's request inside the engine, and a consumer
that stops iterating early (a closed Gradio stream) aborts it too.

LMDeploy is imported only when this backend is built, so the app runs without it.
"""
from __future__ import annotations

import gc
import logging
import os
import threading
from typing import Iterator, Sequence

from .base import (ChatMessage, ContextTooLong, Delta, EngineError, EngineInfo, EngineUnavailable, GenParams,
                   ModelLoadError, token_upper_bound)
from .models import read_config

log = logging.getLogger(__name__)

BACKENDS = ("turbomind", "pytorch")


def lmdeploy_available() -> tuple[bool, str]:
    try:
        import lmdeploy  # noqa: F401
    except Exception as e:  # noqa: BLE001 - any import failure means "not usable here"
        return False, f"LMDeploy is not installed ({type(e).__name__}); `pip install -r requirements-gpu.txt`"
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
    """Bytes one token of KV cache takes (all layers, K and V): fp16/bf16, int8 (8) or int4 (4)."""
    text = cfg.get("text_config", cfg)
    heads = text.get("num_attention_heads") or 1
    kv = text.get("num_key_value_heads") or heads
    head_dim = text.get("head_dim") or text.get("hidden_size", 0) // heads
    elem = {8: 1.0, 4: 0.5}.get(quant_policy, 2.0)
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


class LMDeployEngine:
    def __init__(self, resolved, *, backend: str = "turbomind", model_format: str = "hf",
                 quant_policy: int = 0, cache_max_entry_count: float = 0.8,
                 session_len: int | None = None, tp: int = 1, dtype: str = "auto",
                 trust_remote_code: bool = False, max_batch: int | None = None, **_ignored):
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}")
        ok, why = lmdeploy_available()
        if not ok:
            raise EngineUnavailable(why)
        import torch

        if not torch.cuda.is_available():
            raise EngineUnavailable(f"LMDeploy's {backend} engine needs a CUDA GPU; none is visible.")
        n_gpu = torch.cuda.device_count()
        if tp > n_gpu:
            raise EngineUnavailable(f"--tp {tp} asks for {tp} GPUs but {n_gpu} is visible.")
        from lmdeploy import GenerationConfig, PytorchEngineConfig, TurbomindEngineConfig, pipeline

        self._GenerationConfig = GenerationConfig
        cfg = read_config(resolved.path) if resolved.local else {}
        self.vision = "vision_config" in cfg
        common = dict(tp=tp, cache_max_entry_count=cache_max_entry_count, session_len=session_len,
                      quant_policy=quant_policy, dtype=dtype)
        if max_batch:
            common["max_batch_size"] = max_batch
        if resolved.local and cfg:
            self._check_weights_fit(resolved.path, cfg, tp)
        if backend == "turbomind":
            if resolved.local:
                ok, why = turbomind_supports(resolved.path, trust_remote_code)
                if not ok:
                    raise ModelLoadError(f"{why}: {resolved.spec!r}. Try the 'pytorch' or "
                                         "'transformers' engine.")
                self._check_kv_room(resolved.path, cfg, cache_max_entry_count, session_len, quant_policy, tp)
            engine_cfg = TurbomindEngineConfig(model_format=None if model_format == "hf" else model_format,
                                               **common)
        else:
            engine_cfg = PytorchEngineConfig(**common)
        try:
            self.pipe = pipeline(resolved.path, backend_config=engine_cfg, log_level="ERROR",
                                 trust_remote_code=trust_remote_code)
        except Exception as e:  # noqa: BLE001 - LMDeploy raises many types; the UI needs one
            gc.collect()
            torch.cuda.empty_cache()
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ModelLoadError(f"LMDeploy ({backend}) cannot load {resolved.spec!r}: {msg}") from e
        if self.vision:
            _patch_vision_preprocessor(self.pipe)
        bc = self.pipe.backend_config
        self._sessions: dict[str, list] = {}
        # diagnostic switch: end streams at LMDeploy's end marker and close sessions blocking, as
        # before 2026-11-26 (for side-by-side runs on a GPU; see _relay)
        self._wait_end = os.environ.get("TURBOSTUDIO_LMDEPLOY_WAIT_END") == "1"
        self._lock = threading.Lock()
        self._closed = False
        self._fatal: str | None = None
        self._tokenizer = None
        self._path = resolved.path
        self.info = EngineInfo(
            backend=backend, model=resolved.spec, model_path=resolved.path, device="cuda",
            dtype=str(getattr(bc, "dtype", dtype)), context_length=int(bc.session_len or 2048),
            vision=self.vision, max_batch=int(bc.max_batch_size or 64),
            extra={"tp": tp, "quant_policy": quant_policy, "model_format": model_format,
                   "cache_max_entry_count": cache_max_entry_count})

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

    def _messages(self, messages: Sequence[ChatMessage]) -> list[dict]:
        out = []
        for m in messages:
            if m.images:
                parts = [{"type": "text", "text": m.content}] + [_image_part(i) for i in m.images]
                out.append({"role": m.role, "content": parts})
            else:
                out.append({"role": m.role, "content": m.content})
        return out

    def _gen_config(self, p: GenParams):
        kw = dict(max_new_tokens=p.max_new_tokens, repetition_penalty=p.repetition_penalty)
        if p.greedy:
            kw.update(do_sample=False, top_k=1)
        else:
            kw.update(do_sample=True, temperature=p.temperature, top_p=p.top_p, top_k=p.top_k)
        if p.seed is not None:
            kw["random_seed"] = p.seed
        return self._GenerationConfig(**kw)

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

    def stream(self, messages: Sequence[ChatMessage], params: GenParams, *,
               session_id: str) -> Iterator[Delta]:
        if self._closed:
            raise EngineError("This model was unloaded.", code="engine_unavailable")
        if self.dead:
            raise EngineError(f"The engine stopped ({self.dead}). Reload the model on the Engines page.",
                              code="engine_dead")
        bound = token_upper_bound(messages)
        n_prompt = bound if bound is not None and bound < self.info.context_length else self.count_tokens(messages)
        if n_prompt >= self.info.context_length:
            raise ContextTooLong(f"The prompt takes {n_prompt} tokens; the session length is "
                                 f"{self.info.context_length} (raise --session-len if the model allows).")
        session = self.pipe.session()
        with self._lock:
            self._sessions.setdefault(session_id, []).append(session)
        it = self.pipe.stream_infer(self._messages(messages), sessions=session,
                                    gen_config=self._gen_config(params))
        return self._relay(it, session, session_id)

    def _relay(self, it, session, session_id) -> Iterator[Delta]:
        """LMDeploy's responses as Deltas. The stream ends at the response that carries a finish
        reason: LMDeploy's own end marker comes a turn of its event loop later, and the session is
        closed without waiting for that loop (the last text reaches the user ~10 ms sooner)."""
        finished = False
        tokens = 0
        try:
            for out in it:
                tokens = out.generate_token_len
                if out.finish_reason == "error":
                    finished = True
                    self._note_error(out.error_message or "")
                    yield Delta(out.text or "", tokens, "error",
                                out.error_message or "LMDeploy reported an error")
                    return
                if out.finish_reason:
                    finished = True
                    yield Delta(out.text or "", tokens, out.finish_reason)
                    if not self._wait_end:
                        return
                    continue
                yield Delta(out.text or "", tokens, out.finish_reason)
            if not finished:
                yield Delta("", tokens, "stop")
        except Exception as e:
            self._note_error(str(e))
            raise
        finally:
            if not finished:
                try:
                    session.abort()
                except Exception:  # noqa: BLE001
                    log.debug("abort after early close failed", exc_info=True)
            with self._lock:
                lst = self._sessions.get(session_id, [])
                if session in lst:
                    lst.remove(session)
                if not lst:
                    self._sessions.pop(session_id, None)
            self._close_session(session, wait=not finished or self._wait_end)

    @staticmethod
    def _close_session(session, wait: bool) -> None:
        """End LMDeploy's bookkeeping for ``session``. After an abort we wait for it (the slot must
        be free when the caller goes on). A finished request's close is only scheduled on LMDeploy's
        event loop, to run once the request has let go of its engine instance (``Session._active``,
        LMDeploy 0.18): closed earlier, LMDeploy would first cancel through that instance."""
        try:
            mgr = session._session_mgr() if getattr(session, "_session_mgr", None) else None
            loop = getattr(mgr, "loop", None)
            if wait or loop is None or not all(hasattr(session, a) for a in ("async_close", "_active", "_handle")):
                session.close()
                return
            import asyncio

            async def close_after_end():
                active = session._active
                if session._handle is not None and active is not None:
                    await active.wait()
                await session.async_close()

            asyncio.run_coroutine_threadsafe(close_after_end(), loop)
        except Exception:  # noqa: BLE001
            log.debug("closing an LMDeploy session failed", exc_info=True)

    # errors after which a CUDA context is unusable: the engine must be reloaded, not retried
    _FATAL = ("device-side assert", "illegal memory access", "CUDA error", "cudaError", "NCCL error",
              "unspecified launch failure")

    @property
    def dead(self) -> str | None:
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

    def live_sessions(self) -> dict:
        """Sessions alive now: ours (streams being relayed) and LMDeploy's own session manager's
        (a number that stays above ours after the streams end is a leak: stuck sessions)."""
        mgr = getattr(self.pipe, "session_mgr", None) or getattr(getattr(self.pipe, "async_engine", None),
                                                                 "session_mgr", None)
        with self._lock:
            ours = sum(len(v) for v in self._sessions.values())
        return {"relayed": ours, "lmdeploy": len(getattr(mgr, "sessions", {}) or {}) if mgr is not None else None}

    def schedule_metrics(self) -> dict | None:
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
        return {"active": int(m.active_seqs), "waiting": int(m.waiting_seqs), "cache_usage": float(m.cache_usage)}

    def kv_capacity(self, timeout: float = 30.0) -> dict | None:
        """How many tokens the KV cache holds, measured rather than estimated: one request whose
        prompt ends mid-block is started, TurboMind's ``cache_usage`` (blocks in use over blocks in
        all) is read while it runs, and blocks in use are known exactly (``ceil(tokens / block)``),
        so blocks in all = in use / usage. Returns {"tokens", "blocks", "block_tokens"} or None."""
        if self.schedule_metrics() is None:
            return None
        block = int(getattr(self.pipe.backend_config, "cache_block_seq_len", 0) or 64)
        words = "Count the blocks of this cache, one by one, slowly:"
        msgs = [ChatMessage("user", words)]
        n = self.count_tokens(msgs)
        while not block // 8 <= n % block <= block // 4:      # leave room for a few generated tokens
            words += " ok"
            msgs = [ChatMessage("user", words)]
            n = self.count_tokens(msgs)
        import time

        sid = f"kv-probe-{id(self)}"
        usage, tokens = 0.0, 0
        it = self.stream(msgs, GenParams(temperature=0, max_new_tokens=block // 2), session_id=sid)
        try:
            deadline = time.time() + timeout
            for d in it:
                tokens = d.tokens
                m = self.schedule_metrics() or {}
                if m.get("cache_usage", 0) > 0 and tokens >= 1:
                    usage = m["cache_usage"]
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

    def abort(self, session_id: str) -> None:
        with self._lock:
            sessions = list(self._sessions.get(session_id, []))
        for s in sessions:
            try:
                s.abort()
            except Exception:  # noqa: BLE001
                log.debug("abort failed", exc_info=True)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self.pipe.close()
        finally:
            self.pipe = None
            gc.collect()
            import torch

            torch.cuda.empty_cache()
