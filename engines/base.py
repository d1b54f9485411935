"""The engine contract every page talks to, and the error classes that cross it.

A page builds :class:`ChatMessage` lists and :class:`GenParams`, calls :meth:`Engine.stream`, and gets
back :class:`Delta` objects: new text since the last delta, the running count of generated tokens,
and (on the last one) why generation finished. Errors are :class:`EngineError` subclasses whose
``message`` is written for the person at the keyboard; the UI shows it as is.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator, Literal, Protocol, Sequence, runtime_checkable

FinishReason = Literal["stop", "length", "abort", "error"]


class EngineError(RuntimeError):
    """An error with a message fit for the user. ``code`` is a short machine-readable tag."""

    code = "engine_error"

    def __init__(self, message: str, *, code: str | None = None):
        super().__init__(message)
        self.message = message
        if code:
            self.code = code


class ModelLoadError(EngineError):
    """The model could not be loaded: path missing, not a model, architecture not supported."""

    code = "model_load"


class EngineUnavailable(EngineError):
    """The chosen backend cannot run here (no CUDA, LMDeploy not installed, no model loaded)."""

    code = "engine_unavailable"


class ContextTooLong(EngineError):
    """The prompt does not fit the model's context, even after dropping old turns."""

    code = "context_too_long"


@dataclass(frozen=True)
class GenParams:
    """Sampling parameters; validated on construction (``ValueError`` naming the allowed range)."""

    max_new_tokens: int = 512
    """Exact number of tokens to generate at most; generation also stops at the end-of-turn token."""
    temperature: float = 0.7
    """Softmax temperature in [0, 2]; 0 means greedy decoding (argmax), which ignores top_p/top_k."""
    top_p: float = 0.9
    """Nucleus sampling: keep the smallest set of tokens whose probability sums to top_p, in (0, 1]."""
    top_k: int = 40
    """Keep only the k most likely tokens, in [0, 1000]; 0 disables the filter."""
    repetition_penalty: float = 1.0
    """CTRL-style penalty in [0.5, 2] on tokens already in the prompt or reply; 1.0 disables it."""
    seed: int | None = None
    """Random seed in [0, 2**31); the same seed and inputs give the same answer. None: random."""

    RANGES = {
        "max_new_tokens": (1, 32768),
        "temperature": (0.0, 2.0),
        "top_p": (1e-6, 1.0),
        "top_k": (0, 1000),
        "repetition_penalty": (0.5, 2.0),
        "seed": (0, 2**31 - 1),
    }

    def __post_init__(self):
        for name, (lo, hi) in self.RANGES.items():
            value = getattr(self, name)
            if value is None and name == "seed":
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or \
                    (isinstance(value, float) and not math.isfinite(value)):
                raise ValueError(f"{name} must be a number in [{lo}, {hi}], got {value!r}")
            if name in ("max_new_tokens", "top_k", "seed") and int(value) != value:
                raise ValueError(f"{name} must be a whole number in [{lo}, {hi}], got {value!r}")
            if not lo <= value <= hi:
                shown = "(0, 1]" if name == "top_p" else f"[{lo}, {hi}]"
                raise ValueError(f"{name} must be in {shown}, got {value!r}")
        for name in ("max_new_tokens", "top_k"):
            object.__setattr__(self, name, int(getattr(self, name)))
        if self.seed is not None:
            object.__setattr__(self, "seed", int(self.seed))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def replace(self, **changes) -> "GenParams":
        d = {k: getattr(self, k) for k in self.RANGES}
        d.update(changes)
        return GenParams(**d)

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> "GenParams":
        d = dict(d or {})
        unknown = set(d) - set(cls.RANGES)
        if unknown:
            raise ValueError(f"unknown sampling parameter(s): {', '.join(sorted(unknown))}; "
                             f"known: {', '.join(cls.RANGES)}")
        return cls(**d)


@dataclass(frozen=True)
class ChatMessage:
    """One turn. ``images`` (PIL images or file paths) ride along on user turns of vision models."""

    role: Literal["system", "user", "assistant"]
    content: str
    images: tuple = ()

    def __post_init__(self):
        if self.role not in ("system", "user", "assistant"):
            raise ValueError(f"role must be system, user or assistant, got {self.role!r}")
        if not isinstance(self.content, str):
            raise ValueError("message content must be text")

    @classmethod
    def from_dict(cls, d: dict) -> "ChatMessage":
        if not isinstance(d, dict) or "role" not in d or "content" not in d:
            raise ValueError("each message needs a 'role' and a 'content'")
        content = d["content"]
        if isinstance(content, list):  # OpenAI-style parts: keep the text ones
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        return cls(role=d["role"], content=content, images=tuple(d.get("images") or ()))

    def to_dict(self) -> dict:
        return {"role": self.role, "content": self.content}


def token_upper_bound(messages: Sequence["ChatMessage"]) -> int | None:
    """An upper bound on the prompt tokens of ``messages`` without running a tokenizer: a token is at
    least one UTF-8 byte, plus 16 tokens a message and 512 for the chat template's own text. None
    when images are present (what they cost depends on the model's processor)."""
    if any(m.images for m in messages):
        return None
    return sum(len(m.content.encode()) + 16 for m in messages) + 512


@dataclass(frozen=True)
class Delta:
    """What a stream yields: new text since the last delta, tokens generated so far, and
    (on the last delta only) the finish reason."""

    text: str
    tokens: int
    finish_reason: FinishReason | None = None
    error: str | None = None  # with finish_reason "error": what went wrong, for the user


@dataclass
class EngineInfo:
    """What is actually running (not what was asked for)."""

    backend: str                 # transformers | turbomind | pytorch | remote
    model: str                   # what the user asked for (path or hub id)
    model_path: str = ""         # resolved local folder, where there is one
    device: str = "cpu"
    dtype: str = ""
    context_length: int = 2048
    vision: bool = False
    reason: str = ""             # why this backend was chosen (auto)
    max_batch: int = 1           # requests the engine serves at once, for sizing the UI's queue
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


@runtime_checkable
class Engine(Protocol):
    info: EngineInfo

    def stream(self, messages: Sequence[ChatMessage], params: GenParams, *,
               session_id: str) -> Iterator[Delta]:
        """Stream the assistant's reply to ``messages``. Closing the iterator early aborts it."""

    def count_tokens(self, messages: Sequence[ChatMessage]) -> int:
        """Prompt tokens ``messages`` take once put through the model's chat template."""

    def abort(self, session_id: str) -> None:
        """Stop the generation running for ``session_id`` (no-op when none is)."""

    def close(self) -> None:
        """Free the model and its device memory. Idempotent."""
