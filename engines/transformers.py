"""Hugging Face Transformers backend (CPU or CUDA), with continuous batching.

Why our own decode loop instead of ``model.generate`` with a streamer:

* **Batching across users.** One scheduler thread owns the model. Requests from any number of
  sessions join a running batch at the next step and leave it when they finish or are aborted
  (continuous batching, as TurboMind and LMDeploy-PyTorch do). On CPU or GPU the per-step cost of
  a small batch is close to that of one sequence, so N users get nearly N times the throughput,
  where N threads each calling ``generate`` would fight over the same memory bandwidth.
* **Per-request sampling state.** Each request samples from its own ``torch.Generator``, so a seed
  reproduces an answer even while other users share the batch (``torch.manual_seed`` is global).
* **Exact control.** ``max_new_tokens`` is exact; ``abort(request_id)`` ends the stream at once in
  any state (waiting, being prefilled, decoding) and the row leaves the batch at the next step; text
  is detokenized incrementally (bounded work per token, like vLLM's ``detokenize_incrementally``).
* **OpenAI's penalties.** ``presence_penalty`` and ``frequency_penalty`` are applied in the batched
  sampler from per-row counts of the reply's tokens (kept only for rows that ask for them).

Batched decoding left-pads the KV caches of the rows to a common length and passes an attention
mask and explicit position ids; prefill runs one request at a time (no padding in the prompt pass).
A request alone in the batch takes exactly the path ``model.generate`` takes, so greedy output is
token-for-token the same as ``generate(do_sample=False)`` (the contract tests check this).
Models whose cache is not a plain list of full-attention layers (sliding-window hybrids,
linear-attention layers) or whose positions are not 1-D (Qwen2-VL's M-RoPE) are decoded
round-robin instead: every active request advances one token per turn, with its own cache.
"""
from __future__ import annotations

import inspect
import logging
import os
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Iterator, Sequence

from .base import (InvalidRequest, Capabilities, ChatMessage, ChatRequest, ContextTooLong, Delta, EngineError, EngineInfo,
                   EngineUnavailable, GenParams, ModelLoadError, SchedulerView)
from . import heap
from .configs import TransformersConfig
from .models import SAMPLING_KEYS, sampling_defaults

log = logging.getLogger(__name__)

# Model types whose decode positions are plain 1-D token positions (safe to batch with padding).
_NON_1D_POSITIONS = {"qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "glm4v", "glm4v_moe"}


class IncrementalDetokenizer:
    """Turns token ids into text deltas with bounded work per token.

    Decodes a short window ``tokens[prefix:]`` and compares it with ``tokens[prefix:read]`` so that
    multi-token characters and tokenizers that merge spaces across tokens come out right; a trailing
    U+FFFD (an incomplete UTF-8 sequence) is held back until the next token completes it.
    """

    def __init__(self, tokenizer, skip_special_tokens: bool = True):
        self.tok = tokenizer
        self.skip = skip_special_tokens
        self.ids: list[int] = []
        self.prefix = 0
        self.read = 0

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        prefix_text = self.tok.decode(self.ids[self.prefix:self.read], skip_special_tokens=self.skip)
        new_text = self.tok.decode(self.ids[self.prefix:], skip_special_tokens=self.skip)
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            delta = new_text[len(prefix_text):]
            self.prefix, self.read = self.read, len(self.ids)
            return delta
        return ""

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character at the very end)."""
        prefix_text = self.tok.decode(self.ids[self.prefix:self.read], skip_special_tokens=self.skip)
        new_text = self.tok.decode(self.ids[self.prefix:], skip_special_tokens=self.skip)
        self.prefix = self.read = len(self.ids)
        return new_text[len(prefix_text):] if len(new_text) > len(prefix_text) else ""


# Prompt tokens per prefill pass (see TransformersEngine._prefill): an abort waits for at most one.
# On the shared 2-core CPU (load 7, 2026-12-02) one 512-token piece of SmolLM2-135M at position
# 3.5k took 41 s; 64 keeps a piece near a second on a quiet machine at 8k. A GPU takes 4096 in ms.
PREFILL_CHUNK_CPU = 64
PREFILL_CHUNK_GPU = 4096


@dataclass(eq=False)
class _Request:
    request_id: str
    inputs: dict                 # model inputs for the prefill (input_ids, maybe pixel_values ...)
    params: GenParams
    max_new: int                 # max_new_tokens, capped by the context
    out: queue.Queue = field(default_factory=queue.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)   # guards ``done`` and ``out``
    done: bool = False           # the stream's last delta was sent
    generator: object = None
    seen: object = None          # token ids seen (prompt + reply), only for a repetition_penalty
    counts: object = None        # times each token was generated in this reply, only for penalties
    generated: int = 0
    length: int = 0              # tokens in this row's cache
    cache: object = None         # own cache while outside a batch
    next_token: int | None = None
    detok: IncrementalDetokenizer | None = None


class TransformersEngine:
    """The ``transformers`` backend. Thread-safe: ``stream`` may be called from many threads.

    A request is known by its id from ``stream`` until the scheduler lets go of it: waiting in
    ``_pending``, being prefilled (``_admitting``) or decoding (``_active``). ``abort(request_id)``
    ends its stream at once in any of these states (the last delta, finish reason "abort", is sent
    from the caller's thread) and the scheduler drops it at its next turn; a waiting request leaves
    the queue then, without waiting for a place in the batch."""

    def __init__(self, resolved, config: TransformersConfig):
        import torch

        self._torch = torch
        device, dtype = config.device, config.dtype
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cuda" and not torch.cuda.is_available():
            raise EngineUnavailable("device 'cuda' was asked for but no CUDA GPU is visible.")
        self.device = torch.device(device)
        if dtype == "auto":
            if self.device.type == "cuda":
                dtype = "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
            else:
                dtype = "float32"
        self.dtype = getattr(torch, dtype)
        path = resolved.path
        self.vision = resolved.vision
        self.processor = None
        t0 = time.perf_counter()
        try:
            self._load(path, config.trust_remote_code, config.weight_quant)
        except EngineError:
            raise
        except torch.OutOfMemoryError as e:
            self._free()
            raise ModelLoadError(f"Out of memory while loading {resolved.spec!r} on {device}: {e}") from e
        except (OSError, ValueError, KeyError, ImportError, TypeError, RuntimeError) as e:
            self._free()
            raise ModelLoadError(f"transformers cannot load {resolved.spec!r}: {_first_line(e)}") from e
        self.load_seconds = time.perf_counter() - t0
        mcfg = self.model.config
        text_cfg = getattr(mcfg, "text_config", None) or mcfg
        ctx = getattr(text_cfg, "max_position_embeddings", None) or 2048
        session_len = config.session_len
        self.context_length = int(min(session_len, ctx) if session_len else ctx)
        self.eos_ids = self._eos_ids()
        # whether forward() takes logits_to_keep: prefill then computes only the last position's logits
        forward_params = inspect.signature(self.model.forward).parameters
        self._keep_last = "logits_to_keep" in forward_params
        # transformers 5.2x renamed forward()'s past_key_values to cache (the old name warns on
        # every step, and goes in 5.40): the name this version takes, read once
        self._cache_kw = "cache" if "cache" in forward_params else "past_key_values"
        self.batchable = self._batchable(mcfg)
        # tokens per prompt pass: a longer prompt is prefilled in pieces, an abort seen between them
        self._prefill_chunk = PREFILL_CHUNK_CPU if self.device.type == "cpu" else PREFILL_CHUNK_GPU
        self.max_batch = int(config.max_batch)
        self.info = EngineInfo(
            backend="transformers", model=resolved.spec, model_path=path, device=str(self.device),
            dtype=str(self.dtype).replace("torch.", ""), context_length=self.context_length,
            vision=self.vision, max_batch=self.max_batch,
            capabilities=Capabilities(penalties=True, vision=self.vision, seed=True),
            defaults=self._model_defaults(),
            extra={"batching": "continuous" if self.batchable else "round-robin",
                   "load_seconds": round(self.load_seconds, 2),
                   "architecture": (getattr(mcfg, "architectures", None) or ["?"])[0],
                   **self._bandwidth_facts()})
        if getattr(self, "_quant_weights_bytes", None):
            self.info.extra.update(weights_bytes=self._quant_weights_bytes, weight_quant="int8")
        if getattr(self, "_fp8", False):
            self.info.extra["checkpoint_format"] = "fp8"     # run dequantized on a CPU; a reply's metadata says it
        self._dead: str | None = None   # why the scheduler thread ended, if it did
        self._give_back = False         # release the allocator's cache at the scheduler's next turn
        self._lock = threading.Lock()   # guards _requests, _pending, _admitting and _active membership
        self._requests: dict[str, _Request] = {}   # every request the engine holds, by id
        self._pending: deque[_Request] = deque()
        self._admitting: list[_Request] = []
        self._active: list[_Request] = []
        self._sweep = False             # an abort happened: drop aborted requests from _pending
        self._stopped = False           # the scheduler thread has ended
        self._closed = threading.Event()
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="transformers-scheduler", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ loading
    def _load(self, path: str, trust_remote_code: bool, weight_quant: str = "none"):
        import transformers as tf

        kw = dict(dtype=self.dtype, trust_remote_code=trust_remote_code)
        fp8 = self._fp8 = _fp8_checkpoint(path)
        if fp8 and self.device.type == "cpu" and not self.vision:
            # A blocked-FP8 checkpoint (engines/quantize_worker.py's, or any with weight_scale_inv) on
            # a CPU: dequantized here, block by block, to the engine's dtype. Transformers 5 would
            # dequantize it too on a CPU, but refuses weights whose sides are not whole blocks
            # (SmolLM2's 576 = 4.5 x 128), which LMDeploy and the checkpoint format allow.
            from .quantize_worker import dequantized_state_dict

            cfg = tf.AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
            del cfg.quantization_config
            self.tokenizer = tf.AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
            self.model = tf.AutoModelForCausalLM.from_config(cfg, dtype=self.dtype,
                                                             trust_remote_code=trust_remote_code)
            missing, unexpected = self.model.load_state_dict(dequantized_state_dict(path, self.dtype), strict=False)
            tied = {"lm_head.weight"} if getattr(cfg, "tie_word_embeddings", False) else set()
            if unexpected or set(missing) - tied:
                raise ModelLoadError(f"the FP8 checkpoint does not match its config: missing {missing[:3]}, "
                                     f"unexpected {unexpected[:3]}")
            self.model.tie_weights()
            gen = os.path.join(path, "generation_config.json")
            if os.path.isfile(gen):
                self.model.generation_config = tf.GenerationConfig.from_pretrained(path)
            self.model.to(self.device).eval()
            return
        if self.vision:
            self.processor = tf.AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)
            self.tokenizer = self.processor.tokenizer
            self.model = tf.AutoModelForImageTextToText.from_pretrained(path, **kw)
        else:
            self.tokenizer = tf.AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
            self.model = tf.AutoModelForCausalLM.from_pretrained(path, **kw)
        self.model.to(self.device).eval()
        if weight_quant == "int8":
            self._int8_weights()

    def _int8_weights(self) -> None:
        """torchao's int8 weight-only quantization of the decoder's linear layers (not lm_head, which
        SmolLM2 ties to its embedding): a maintained library rather than our own kernels."""
        try:
            from torchao.quantization import Int8WeightOnlyConfig, quantize_
        except ImportError as e:
            raise ModelLoadError("weight_quant int8 needs torchao (pip install torchao)") from e
        import torch

        quantize_(self.model, Int8WeightOnlyConfig(),
                  filter_fn=lambda m, name: isinstance(m, torch.nn.Linear) and ".layers." in f".{name}")
        # the bytes the weights really take: a torchao tensor reports its float dtype's element size,
        # its int8 data and scales are its inner tensors (the manager's count would see float32)
        total = 0
        for prm in self.model.parameters():
            t = prm.data
            if type(t) is not torch.Tensor and hasattr(t, "__tensor_flatten__"):
                inner = [getattr(t, n) for n in t.__tensor_flatten__()[0]]
                total += sum(x.numel() * x.element_size() for x in inner if isinstance(x, torch.Tensor))
            else:
                total += prm.numel() * prm.element_size()
        self._quant_weights_bytes = total

    def _bandwidth_facts(self) -> dict:
        """The Monitor's bandwidth meter's figures (``engines/bandwidth.py``): the KV cache's bytes per
        token (Transformers keeps it in the model's dtype), the weight bytes a decode step does not
        read (an input embedding not tied to the head, a vision tower), and the GPU. {} on failure:
        the meter then says it has no figure."""
        from . import bandwidth

        try:
            model, elem = self.model, self.dtype.itemsize
            cfg = self.model.config.to_dict()
            unread, what = 0, []
            emb, head = model.get_input_embeddings(), model.get_output_embeddings()
            if emb is not None and (head is None or head.weight.data_ptr() != emb.weight.data_ptr()):
                unread += emb.weight.numel() * emb.weight.element_size()
                what.append("the input embedding table")
            vision = sum(p.numel() * p.element_size() for n, p in model.named_parameters()
                         if any(k in n for k in ("vision_tower", "vision_model", "multi_modal_projector", "visual.")))
            if vision:
                unread += vision
                what.append("the vision tower")
            facts = {"kv_bytes_per_token": bandwidth.kv_bytes_from_config(cfg, 0, elem),
                     "kv_format": bandwidth.kv_format(0, elem), "weights_unread_bytes": int(unread),
                     "weights_unread_what": " and ".join(what) or None,
                     "moe_experts": bandwidth.moe_experts(cfg)}
            if self.device.type == "cuda":
                facts.update(bandwidth.gpu_facts(self.device.index or 0))
            return {k: v for k, v in facts.items() if v is not None}
        except Exception:  # noqa: BLE001 - a figure for the Monitor, never a reason to fail a load
            log.debug("no bandwidth figures for this model", exc_info=True)
            return {}

    def perplexity(self, text: str, max_tokens: int = 4096, window: int = 512) -> dict:
        """Perplexity of ``text`` (no chat template) over its first ``max_tokens`` scored tokens, in
        windows of ``window`` tokens (each window scored on its own: ``window - 1`` tokens), with
        a forward pass of the loaded model. For the Quantize card on a scratch engine: it runs in
        the caller's thread beside the scheduler (the weights are only read). Returns
        {"perplexity", "tokens"}."""
        import math

        torch = self._torch
        ids = self.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
        nll, scored = 0.0, 0
        with torch.inference_mode():
            for chunk in ppl_windows(ids, max_tokens, window):
                x = torch.tensor([chunk], device=self.device)
                logits = self.model(input_ids=x).logits[0, :-1].float()
                nll += torch.nn.functional.cross_entropy(logits, x[0, 1:], reduction="sum").item()
                scored += len(chunk) - 1
        if not scored:
            raise ValueError("the text is too short for a perplexity (fewer than 2 tokens)")
        return {"perplexity": math.exp(nll / scored), "tokens": scored}

    def _eos_ids(self) -> set[int]:
        ids: set[int] = set()
        gc_ = getattr(self.model, "generation_config", None)
        for src in (getattr(gc_, "eos_token_id", None), self.tokenizer.eos_token_id):
            if isinstance(src, int):
                ids.add(src)
            elif src:
                ids.update(int(i) for i in src)
        return ids

    def _model_defaults(self) -> GenParams | None:
        """The model's own sampling defaults (its generation_config.json), None where it has none."""
        gc_ = getattr(self.model, "generation_config", None)
        if gc_ is None:
            return None
        try:
            values = gc_.to_diff_dict()   # what the model's file sets (5.x: unset values are None)
        except Exception:  # noqa: BLE001 - a figure for the UI, never a reason to fail a load
            return None
        return sampling_defaults({k: values.get(k) for k in SAMPLING_KEYS})

    def _batchable(self, mcfg) -> bool:
        if getattr(mcfg, "model_type", "") in _NON_1D_POSITIONS:
            return False
        try:
            from transformers.cache_utils import DynamicCache, DynamicLayer
        except ImportError:
            return False
        try:
            cache = DynamicCache(config=mcfg)
        except TypeError:
            return False
        layers = getattr(cache, "layers", [])
        return all(type(layer) is DynamicLayer for layer in layers)

    # ------------------------------------------------------------------ prompt
    def _template(self, messages: Sequence[ChatMessage]) -> list[dict]:
        out = []
        for m in messages:
            if self.vision and m.role == "user":
                parts = [{"type": "image"} for _ in m.images] + [{"type": "text", "text": m.content}]
                out.append({"role": m.role, "content": parts})
            elif self.vision:
                out.append({"role": m.role, "content": [{"type": "text", "text": m.content}]})
            else:
                out.append({"role": m.role, "content": m.content})
        return out

    def _prompt_text(self, messages: Sequence[ChatMessage]) -> str:
        templ = self.processor if self.vision else self.tokenizer
        msgs = self._template(messages)
        if getattr(templ, "chat_template", None):
            try:
                return templ.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
            except Exception as e:  # e.g. a template that refuses a system turn
                if messages and messages[0].role == "system" and len(messages) > 1:
                    merged = [ChatMessage(messages[1].role, messages[0].content + "\n\n" + messages[1].content,
                                          messages[1].images)] + list(messages[2:])
                    return self._prompt_text(merged)
                # the messages do not suit this model's template (e.g. roles that must alternate):
                # the request's fault, refused as such (a 400 on the API), not an engine failure
                raise InvalidRequest(f"The model's chat template refused these messages: {_first_line(e)}",
                                     param="messages") from e
        # No chat template: a plain transcript the base model can continue.
        lines = [f"{m.role.capitalize()}: {m.content}" for m in messages]
        return "\n".join(lines) + "\nAssistant:"

    def _encode(self, messages: Sequence[ChatMessage]) -> dict:
        text = self._prompt_text(messages)
        if self.vision:
            images = [_as_image(img) for m in messages for img in m.images]
            enc = self.processor(text=text, images=images or None, return_tensors="pt")
            return {k: v for k, v in enc.items()}
        enc = self.tokenizer(text, return_tensors="pt", add_special_tokens=False)
        return {"input_ids": enc["input_ids"]}

    def count_tokens(self, messages: Sequence[ChatMessage]) -> int:
        return int(self._encode(messages)["input_ids"].shape[-1])

    def message_tokens(self, messages: Sequence[ChatMessage]) -> list[int]:
        """Each message's own text tokens: one batched tokenizer call for all of them."""
        if not messages:
            return []
        ids = self.tokenizer([m.content for m in messages], add_special_tokens=False)["input_ids"]
        return [len(x) for x in ids]

    # ------------------------------------------------------------------ public API
    def stream(self, request: ChatRequest) -> Iterator[Delta]:
        if self._closed.is_set():
            raise EngineUnavailable("This model was unloaded.")
        if self._dead:
            raise EngineError(f"The engine stopped ({self._dead}). Reload the model on the Engines page.",
                              code="engine_dead")
        params = request.params
        inputs = self._encode(request.messages)
        n_prompt = int(inputs["input_ids"].shape[-1])
        room = self.context_length - n_prompt
        if room < 1:
            raise ContextTooLong(f"The prompt takes {n_prompt} tokens; the model's context is "
                                 f"{self.context_length}.")
        req = _Request(request_id=request.request_id, inputs=inputs, params=params,
                       max_new=min(params.max_new_tokens, room))
        with self._lock:
            if self._stopped:
                raise EngineUnavailable("This model was unloaded." if self._closed.is_set() else
                                        f"The engine stopped ({self._dead}). Reload the model on the Engines page.")
            if request.request_id in self._requests:
                raise EngineError(f"A request with id {request.request_id!r} is still running.",
                                  code="invalid_request")
            self._requests[req.request_id] = req
            self._pending.append(req)
        self._wake.set()
        return self._drain(req, n_prompt)

    def _drain(self, req: _Request, n_prompt: int | None = None) -> Iterator[Delta]:
        try:
            while True:
                item = req.out.get()
                # Coalesce what is already queued into one delta (fewer UI updates, no text lost).
                items = [item]
                while items[-1].finish_reason is None:
                    try:
                        items.append(req.out.get_nowait())
                    except queue.Empty:
                        break
                text = "".join(d.text for d in items)
                last = items[-1]
                yield Delta(text, last.tokens, last.finish_reason, last.error, prompt_tokens=n_prompt)
                if last.finish_reason is not None:
                    return
        finally:
            if not req.done:           # a consumer that stops early aborts the request
                self._cancel(req)

    def abort(self, request_id: str) -> None:
        """End ``request_id``'s stream now (finish reason "abort"), waiting, prefilling or decoding;
        the scheduler lets go of it at its next turn. Unknown or finished ids: nothing happens."""
        with self._lock:
            req = self._requests.get(request_id)
        if req is not None:
            self._cancel(req)

    def _cancel(self, req: _Request) -> None:
        req.cancelled.set()
        self._end(req, Delta("", req.generated, "abort"))
        with self._lock:
            self._sweep = True
        self._wake.set()

    def health(self) -> str | None:
        """None while the scheduler serves; else why it stopped (a reload is needed)."""
        return None if self._closed.is_set() else self._dead

    def scheduler(self) -> SchedulerView:
        """Requests decoding in the batch now, and those waiting for a place or being prefilled."""
        with self._lock:
            return SchedulerView(active=len(self._active), waiting=len(self._pending) + len(self._admitting))

    def live_requests(self) -> int:
        with self._lock:
            return len(self._requests)

    def close(self) -> None:
        if self._closed.is_set():
            return
        self._closed.set()
        self._wake.set()
        self._thread.join(timeout=30)
        self._free()

    def _free(self):
        for name in ("model", "tokenizer", "processor"):
            if hasattr(self, name):
                setattr(self, name, None)
        heap.collect()           # the frozen heap too (engines/heap.py)
        torch = self._torch
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    # ------------------------------------------------------------------ scheduler
    def _loop(self):
        """The scheduler thread. Errors of one step fail that step's requests and the loop goes on;
        anything that ends the thread itself marks the engine dead, so callers get a clear message
        (and the UI offers a reload) instead of waiting forever."""
        try:
            self._run_loop()
        except BaseException as e:  # noqa: BLE001 - the thread is ending: say why, to everyone
            self._dead = f"{type(e).__name__}: {e}"
            log.exception("the transformers scheduler stopped")
            with self._lock:
                held = list(self._requests.values())
            for r in held:
                self._fail(r, RuntimeError(f"the engine stopped ({self._dead})"))
        finally:
            with self._lock:
                self._stopped = True    # stream() refuses from now on
                held = list(self._requests.values())
                self._pending.clear()
                self._admitting, self._active = [], []
            for r in held:              # closed: every stream still open ends now
                self._finish(r, "abort")

    def _take_pending(self) -> list[_Request]:
        """Requests aborted while they waited leave the queue (they need no place in the batch);
        then as many as fit join the batch."""
        dropped, admitted = [], []
        with self._lock:
            if self._sweep:
                self._sweep = False
                dropped = [r for r in self._pending if r.cancelled.is_set()]
                if dropped:
                    self._pending = deque(r for r in self._pending if not r.cancelled.is_set())
            while self._pending and len(self._active) + len(admitted) < self.max_batch:
                admitted.append(self._pending.popleft())
            self._admitting = admitted
        for r in dropped:
            self._finish(r, "abort")
        return admitted

    def _run_loop(self):
        torch = self._torch
        batch_cache = None      # DynamicCache holding every active row, left-padded
        batch_rows: list[_Request] = []
        mask = None
        while not self._closed.is_set():
            if self._give_back:
                # after an out-of-memory: here, outside the handler, the failed step's exception and
                # the tensors its traceback held are gone, so the memory really goes back to the GPU
                self._give_back = False
                self._empty_cache()
            self._wake.clear()          # a wake-up from here on is seen by the wait below
            admitted = self._take_pending()
            with torch.inference_mode():
                for req in admitted:
                    if req.cancelled.is_set():
                        self._finish(req, "abort")
                        continue
                    try:
                        self._prefill(req)
                    except Exception as e:  # noqa: BLE001 - reported to that user, loop goes on
                        self._fail(req, e)
                        continue
                    with self._lock:
                        self._active.append(req)
                with self._lock:
                    self._admitting = []
                # Drop finished or cancelled rows.
                done = [r for r in self._active if r.cancelled.is_set() or r.next_token is None]
                for r in done:
                    self._finish(r, "abort")   # only lets go of rows that already finished
                if done:
                    with self._lock:
                        self._active = [r for r in self._active if r not in done]
                if not self._active:
                    batch_cache, batch_rows, mask = None, [], None
                    self._wake.wait(timeout=0.5)
                    continue
                try:
                    if self.batchable:
                        # a list: the cache cut back after an out-of-memory step (_evict_on_oom)
                        if batch_rows != self._active or isinstance(batch_cache, list):
                            batch_cache, mask = self._restack(batch_rows, batch_cache, self._active)
                            batch_rows = list(self._active)
                        batch_cache, mask = self._step_batched(batch_rows, batch_cache, mask)
                    else:
                        for r in list(self._active):
                            self._step_single(r)
                except Exception as e:  # noqa: BLE001 - e.g. out of memory: fail the batch, keep serving
                    cropped = self._evict_on_oom(e, batch_cache, mask)
                    if cropped is not None:
                        batch_cache = cropped     # restacked without the evicted row next step
                        continue
                    log.exception("decode step failed")
                    for r in list(self._active):
                        self._fail(r, e)
                    with self._lock:
                        self._active = []
                    batch_cache, batch_rows, mask = None, [], None
                    self._give_back = True

    def _evict_on_oom(self, exc, batch_cache, mask):
        """Out of memory in a batched decode step: end only the longest request (its cache is the
        largest) with the out-of-memory message and go on with the others, the way a serving engine
        preempts, instead of failing every user in the batch. The step may have appended this
        position to some layers before it failed: the batch cache is cropped back to its width
        before the step, so the next step restacks consistent rows; that cropped cache is returned
        (None: not handled here)."""
        if not isinstance(exc, self._torch.OutOfMemoryError) or len(self._active) < 2 or not self.batchable:
            return None
        if batch_cache is None or mask is None:
            return None
        width = int(mask.shape[1])
        # (keys, values) per layer, each cut back to its width before the step (no API call: the
        # name and meaning of DynamicCache.crop's argument differ between transformers 5 releases)
        cropped = [(k[:, :, :width], v[:, :, :width]) for k, v in self._layers(batch_cache)]
        victim = max(self._active, key=lambda r: r.length)
        log.warning("out of memory in a decode step of %d requests; ending the longest (%d tokens)",
                    len(self._active), victim.length)
        self._fail(victim, exc)
        with self._lock:
            self._active = [r for r in self._active if r is not victim]
        return cropped

    def _empty_cache(self):
        heap.collect()           # the frozen heap too (engines/heap.py)
        if self.device.type == "cuda":
            self._torch.cuda.empty_cache()

    def _prefill(self, req: _Request):
        torch = self._torch
        inputs = {k: (v.to(self.device, dtype=self.dtype) if v.is_floating_point() else v.to(self.device))
                  for k, v in req.inputs.items() if hasattr(v, "to")}
        req.inputs = None
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        # only the last position's logits: a long prompt's full logits (tokens x vocabulary) would
        # take more memory than its KV cache (8k tokens x 49k vocabulary = 0.8 GB in bf16)
        extra = {"logits_to_keep": 1} if self._keep_last else {}
        ids = inputs["input_ids"][0]
        chunk = self._prefill_chunk
        if set(inputs) <= {"input_ids", "attention_mask"} and ids.shape[0] > chunk:
            # A long text prompt goes through in pieces of ``chunk`` tokens, and an abort is seen
            # between two of them: one 8k-token prompt on a CPU is minutes of work, which went on
            # (and held up everyone's decoding) long after its client had gone. (Images' inputs
            # are not cut: their processor's tensors belong to the whole prompt.)
            mask = inputs.get("attention_mask")
            start = 0
            while ids.shape[0] - start > chunk:
                if req.cancelled.is_set():
                    return        # next_token stays None: the scheduler lets go of it at once
                piece = {"input_ids": inputs["input_ids"][:, start:start + chunk]}
                if mask is not None:
                    piece["attention_mask"] = mask[:, :start + chunk]
                cache = getattr(self.model(**piece, **{self._cache_kw: cache}, use_cache=True, **extra),
                                self._cache_kw)
                start += chunk
            if req.cancelled.is_set():
                return
            inputs = {"input_ids": inputs["input_ids"][:, start:],
                      **({"attention_mask": mask} if mask is not None else {})}
        out = self.model(**inputs, **{self._cache_kw: cache}, use_cache=True, **extra)
        req.cache = getattr(out, self._cache_kw)
        req.length = int(ids.shape[0])
        # the ids seen (prompt and reply), kept only where repetition_penalty needs them
        req.seen = ids.clone() if req.params.repetition_penalty != 1.0 else None
        seed = req.params.seed if req.params.seed is not None else int.from_bytes(os.urandom(4), "little") >> 1
        # a CPU generator per request: its draws are host-side (no device sync), and a seed gives
        # the same answer whoever else shares the batch
        req.generator = torch.Generator().manual_seed(seed)
        req.detok = IncrementalDetokenizer(self.tokenizer)
        self._accept(req, self._next_tokens([req], out.logits[:, -1])[0])

    def _accept(self, req: _Request, tok: int) -> None:
        """Emit the sampled token ``tok`` (or finish the request)."""
        req.generated += 1
        if tok in self.eos_ids:
            req.next_token = None
            self._finish(req, "stop")
            return
        if req.seen is not None:
            req.seen = self._torch.cat([req.seen, req.seen.new_tensor([tok])])
        if req.counts is not None:
            req.counts[tok] += 1
        text = req.detok.push(tok)
        if req.generated >= req.max_new or req.cancelled.is_set():
            text += req.detok.flush()
            self._emit(req, Delta(text, req.generated))
            req.next_token = None
            self._finish(req, "abort" if req.cancelled.is_set() and req.generated < req.max_new else "length")
            return
        req.next_token = tok
        self._emit(req, Delta(text, req.generated))

    def _next_tokens(self, rows: list[_Request], logits) -> list[int]:
        """The next token of every row from ``logits`` [rows, vocabulary], for the whole batch at once:
        one host copy per step, however many rows (a per-row ``argmax``/``multinomial`` made one
        device sync and several kernel launches per row, and the step's cost grew with the batch).

        Per row, in this order: repetition penalty, presence and frequency penalties, then greedy
        (argmax) or temperature, top-k, top-p and a draw. The draw is inverse-CDF sampling with a
        uniform number from the row's own CPU generator: the same distribution as
        ``torch.multinomial``, and a seed reproduces a reply whatever else shares the batch.

        Presence and frequency penalties follow OpenAI's definition: a token's logit is lowered by
        ``frequency_penalty * c + presence_penalty * (c > 0)``, ``c`` the times it was generated in
        this reply so far (not the prompt). Rows that ask for them keep a count per vocabulary entry
        (``_Request.counts``); they are penalized together, in one operation."""
        torch = self._torch
        logits = logits.float()
        n = len(rows)
        for i, r in enumerate(rows):      # rare: rows with a repetition penalty, one by one
            pen = r.params.repetition_penalty
            if pen != 1.0 and r.seen is not None:
                score = logits[i].gather(0, r.seen)
                logits[i] = logits[i].scatter(0, r.seen, torch.where(score < 0, score * pen, score / pen))
        penalized = [i for i, r in enumerate(rows) if r.params.penalized]
        if penalized:
            dev = logits.device
            for i in penalized:
                if rows[i].counts is None:      # the reply's first token: nothing generated yet
                    rows[i].counts = logits.new_zeros(logits.shape[-1])
            idx = torch.tensor(penalized, device=dev)
            counts = torch.stack([rows[i].counts for i in penalized])
            freq = torch.tensor([rows[i].params.frequency_penalty for i in penalized], device=dev).unsqueeze(1)
            pres = torch.tensor([rows[i].params.presence_penalty for i in penalized], device=dev).unsqueeze(1)
            logits[idx] = logits[idx] - freq * counts - pres * (counts > 0).float()
        greedy = [i for i, r in enumerate(rows) if r.params.greedy]
        sampled = [i for i, r in enumerate(rows) if not r.params.greedy]
        if not sampled:
            return logits.argmax(-1).tolist()
        dev = logits.device
        out = torch.empty(n, dtype=torch.long, device=dev)
        if greedy:
            g = torch.tensor(greedy, device=dev)
            out[g] = logits[g].argmax(-1)
        s = torch.tensor(sampled, device=dev)
        ps = [rows[i].params for i in sampled]
        x = logits[s] / torch.tensor([p.temperature for p in ps], device=dev).unsqueeze(1)
        vocab = x.shape[-1]
        ks = [p.top_k if p.top_k and p.top_k < vocab else 0 for p in ps]
        if any(ks):
            kmax = max(ks)
            top = torch.topk(x, kmax, dim=-1).values
            kth = top.gather(1, torch.tensor([max(k, 1) - 1 for k in ks], device=dev).unsqueeze(1))
            kth = kth.masked_fill(torch.tensor([k == 0 for k in ks], device=dev).unsqueeze(1), float("-inf"))
            x = x.masked_fill(x < kth, float("-inf"))
        if any(p.top_p < 1.0 for p in ps):
            sorted_x, idx = torch.sort(x, descending=True)
            probs = torch.softmax(sorted_x, dim=-1)
            top_p = torch.tensor([p.top_p if p.top_p < 1.0 else 2.0 for p in ps], device=dev).unsqueeze(1)
            remove = (probs.cumsum(-1) - probs) > top_p   # keep the first token that crosses top_p
            x = torch.full_like(x, float("-inf")).scatter(1, idx, sorted_x.masked_fill(remove, float("-inf")))
        cdf = torch.softmax(x, dim=-1).cumsum(-1)
        u = torch.tensor([float(torch.rand((), generator=rows[i].generator)) for i in sampled], device=dev)
        # the first token whose cumulative probability exceeds u (zero-probability tokens never are)
        pick = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(1).contiguous(), right=True).squeeze(1)
        out[s] = pick.clamp_(max=vocab - 1)
        return out.tolist()

    def _step_single(self, req: _Request):
        torch = self._torch
        ids = torch.tensor([[req.next_token]], device=self.device)
        out = self.model(input_ids=ids, **{self._cache_kw: req.cache}, use_cache=True)
        req.cache = getattr(out, self._cache_kw)
        req.length += 1
        self._accept(req, self._next_tokens([req], out.logits[:, -1])[0])

    # --- batched decoding over left-padded caches
    @staticmethod
    def _layers(cache):
        if isinstance(cache, list):        # already (keys, values) per layer
            return cache
        if hasattr(cache, "layers"):
            return [(layer.keys, layer.values) for layer in cache.layers]
        return list(zip(cache.key_cache, cache.value_cache))  # transformers 4.x

    def _restack(self, old_rows, old_cache, rows):
        """Build one left-padded cache for ``rows`` from the old batch and the rows' own caches."""
        torch = self._torch
        from transformers import DynamicCache

        if old_cache is not None:
            old_layers = self._layers(old_cache)
            width = old_layers[0][0].shape[2]
            for i, r in enumerate(old_rows):
                if r in rows:  # keep only this row's valid (right-aligned) part
                    r.cache = [(k[i:i + 1, :, width - r.length:], v[i:i + 1, :, width - r.length:])
                               for k, v in old_layers]
        width = max(r.length for r in rows)
        per_layer = []
        n_layers = None
        row_layers = []
        for r in rows:
            layers = r.cache if isinstance(r.cache, list) else self._layers(r.cache)
            row_layers.append(layers)
            n_layers = len(layers)
        for li in range(n_layers):
            ks, vs = [], []
            for r, layers in zip(rows, row_layers):
                k, v = layers[li]
                pad = width - r.length
                if pad:
                    k = torch.nn.functional.pad(k, (0, 0, pad, 0))
                    v = torch.nn.functional.pad(v, (0, 0, pad, 0))
                ks.append(k)
                vs.append(v)
            per_layer.append((torch.cat(ks), torch.cat(vs)))
        for r in rows:
            r.cache = None
        cache = DynamicCache(config=self.model.config)
        for li, (k, v) in enumerate(per_layer):
            cache.update(k, v, li)
        mask = torch.zeros(len(rows), width, dtype=torch.long, device=self.device)
        for i, r in enumerate(rows):
            mask[i, width - r.length:] = 1
        return cache, mask

    def _step_batched(self, rows, cache, mask):
        torch = self._torch
        ids = torch.tensor([[r.next_token] for r in rows], device=self.device)
        mask = torch.cat([mask, mask.new_ones(len(rows), 1)], dim=1)
        pos = torch.tensor([[r.length] for r in rows], device=self.device)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos,
                         **{self._cache_kw: cache}, use_cache=True)
        for r, tok in zip(rows, self._next_tokens(rows, out.logits[:, -1])):
            r.length += 1
            self._accept(r, tok)
        return getattr(out, self._cache_kw), mask

    # --- endings
    def _emit(self, req: _Request, delta: Delta) -> None:
        """A delta of a running request (dropped once its stream has ended, e.g. by an abort)."""
        with req.lock:
            if not req.done:
                req.out.put(delta)

    def _end(self, req: _Request, delta: Delta) -> bool:
        """Send the stream's last delta, once (from the scheduler or an aborting thread)."""
        with req.lock:
            if req.done:
                return False
            req.done = True
            req.out.put(delta)
        return True

    def _release(self, req: _Request) -> None:
        """The scheduler lets go of ``req``: it is no longer one of the engine's requests."""
        req.cache = None
        with self._lock:
            if self._requests.get(req.request_id) is req:
                del self._requests[req.request_id]

    def _finish(self, req: _Request, reason: str):
        """(Scheduler thread.) End ``req`` with ``reason`` unless it has ended, and let go of it."""
        if not req.done:
            text = req.detok.flush() if req.detok else ""
            self._end(req, Delta(text, req.generated, reason))
        self._release(req)

    def _fail(self, req: _Request, exc: BaseException):
        torch = self._torch
        if isinstance(exc, torch.OutOfMemoryError):
            msg = "Out of memory during generation; try a shorter prompt or fewer max_new_tokens."
            # not released here: this runs inside the handler, where the exception's traceback still
            # holds the failed step's tensors (on the H100 the app kept a 60k-token prompt's pool,
            # gigabytes, that a model load then found free); the scheduler releases it next turn
            self._give_back = True
        else:
            msg = f"Generation failed: {_first_line(exc)}"
        self._end(req, Delta("", req.generated, "error", msg))
        self._release(req)


def ppl_windows(ids: list[int], max_tokens: int, window: int) -> list[list[int]]:
    """The windows a perplexity is computed over: consecutive, non-overlapping runs of ``window``
    token ids (the last may be shorter, at least 2) until ``max_tokens`` tokens are scored (each
    window scores all but its first). The same for every engine, so their figures compare."""
    out, i, scored = [], 0, 0
    while i < len(ids) - 1 and scored < max_tokens:
        size = min(window, max_tokens - scored + 1, len(ids) - i)
        if size < 2:
            break
        out.append(list(ids[i:i + size]))
        scored += size - 1
        i += size
    return out


def _fp8_checkpoint(path: str) -> bool:
    """Whether the folder's config.json says blocked FP8 (``quantization_config.quant_method`` fp8)."""
    import json

    try:
        with open(os.path.join(path, "config.json")) as f:
            cfg = json.load(f)
    except (OSError, ValueError):
        return False
    q = cfg.get("quantization_config") or (cfg.get("text_config") or {}).get("quantization_config") or {}
    return isinstance(q, dict) and q.get("quant_method") == "fp8"


def _as_image(img):
    """A PIL image from a PIL image or a path (normalized by ``engines.images.prepare``)."""
    if isinstance(img, str):
        from .images import prepare

        return prepare(img).image
    return img


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:500]
