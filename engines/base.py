"""The engine contract every page talks to, and the error classes that cross it.

A page builds :class:`ChatMessage` lists and :class:`GenParams`, calls :meth:`Engine.stream`, and gets
back :class:`Delta` objects: new text since the last delta, the running count of generated tokens,
and (on the last one) why generation finished. Errors are :class:`EngineError` subclasses whose
``message`` is written for the person at the keyboard; the UI shows it as is.
"""
from __future__ import annotations

import math
import uuid
from dataclasses import asdict, dataclass, field, replace
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


class InvalidRequest(EngineError):
    """The request itself is wrong (a limit, an empty message, a parameter this engine cannot honour).
    ``param`` names the offending parameter where there is one (the OpenAI endpoint reports it)."""

    code = "invalid_request"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message, code=code)
        self.param = param


class Busy(EngineError):
    """Every place in the queue is taken; the request was not admitted (HTTP 429 on the API)."""

    code = "busy"


class Forbidden(EngineError):
    """The user may not do this (an operator control, another user's job)."""

    code = "forbidden"


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
    presence_penalty: float = 0.0
    """OpenAI's presence penalty in [-2, 2]: subtracted once from the logit of every token already
    generated in this reply. 0 disables it. Honoured where ``Capabilities.penalties`` is set."""
    frequency_penalty: float = 0.0
    """OpenAI's frequency penalty in [-2, 2]: subtracted from a token's logit once per time it was
    generated in this reply. 0 disables it."""
    stop: tuple[str, ...] = ()
    """Up to 4 stop strings: the reply ends before the first of them (which is not part of the reply),
    with finish reason "stop". Applied by the engine manager to every backend's text stream."""

    RANGES = {
        "max_new_tokens": (1, 32768),
        "temperature": (0.0, 2.0),
        "top_p": (1e-6, 1.0),
        "top_k": (0, 1000),
        "repetition_penalty": (0.5, 2.0),
        "seed": (0, 2**31 - 1),
        "presence_penalty": (-2.0, 2.0),
        "frequency_penalty": (-2.0, 2.0),
    }
    FIELDS = tuple(RANGES) + ("stop",)
    MAX_STOP = 4
    MAX_STOP_CHARS = 256

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
        object.__setattr__(self, "stop", _stop_strings(self.stop))

    @property
    def penalized(self) -> bool:
        """Whether presence or frequency penalties are asked for."""
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def replace(self, **changes) -> "GenParams":
        d = {k: getattr(self, k) for k in self.FIELDS}
        d.update(changes)
        return GenParams(**d)

    def to_dict(self) -> dict:
        d = {k: getattr(self, k) for k in self.FIELDS}
        d["stop"] = list(self.stop)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None, *, defaults: "GenParams | None" = None,
                  max_new_tokens_limit: int | None = None) -> "GenParams":
        """From a dict of the fields above (``stop`` as a string or a list); missing fields take
        ``defaults`` (the model's own, see ``Capabilities``) or the class defaults.
        ``max_new_tokens_limit``: the app's configured limit (``--max-new-tokens-limit``); a
        ``max_new_tokens`` outside [1, limit] is refused naming that range, not the class's own."""
        if d is not None and not isinstance(d, dict):
            raise ValueError("params must be an object of sampling parameters")
        d = dict(d or {})
        unknown = set(d) - set(cls.FIELDS)
        if unknown:
            raise ValueError(f"unknown sampling parameter(s): {', '.join(sorted(unknown))}; "
                             f"known: {', '.join(cls.FIELDS)}")
        n = d.get("max_new_tokens")
        if max_new_tokens_limit is not None and isinstance(n, (int, float)) and not isinstance(n, bool) \
                and not 1 <= n <= max_new_tokens_limit:
            raise ValueError(f"max_new_tokens must be in [1, {max_new_tokens_limit}], got {n!r}")
        if defaults is not None:
            d = {**{k: getattr(defaults, k) for k in cls.FIELDS}, **d}
        return cls(**d)


def _stop_strings(stop) -> tuple[str, ...]:
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = (stop,)
    if not isinstance(stop, (list, tuple)) or not all(isinstance(x, str) for x in stop):
        raise ValueError("stop must be a string or a list of strings")
    if len(stop) > GenParams.MAX_STOP:
        raise ValueError(f"stop takes at most {GenParams.MAX_STOP} strings, got {len(stop)}")
    for x in stop:
        if not x:
            raise ValueError("a stop string must not be empty")
        if len(x) > GenParams.MAX_STOP_CHARS:
            raise ValueError(f"a stop string has at most {GenParams.MAX_STOP_CHARS} characters")
        check_text(x, "a stop string")
    return tuple(stop)


def check_text(text: str, what: str = "the message") -> None:
    """Text must be valid Unicode: a lone surrogate (JSON ``"\\ud800"``) cannot be encoded, and would
    fail deep inside a tokenizer; it is refused here, with where it is."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        bad = ord(text[e.start])
        raise ValueError(f"{what} contains U+{bad:04X} at character {e.start}, a lone surrogate, which is "
                         "not valid Unicode text") from None


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
        check_text(self.content, f"a {self.role} message")

    @classmethod
    def from_dict(cls, d: dict) -> "ChatMessage":
        if not isinstance(d, dict) or "role" not in d or "content" not in d:
            raise ValueError("each message needs a 'role' and a 'content'")
        content = d["content"]
        if isinstance(content, list):  # OpenAI-style parts: keep the text ones
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        images = d.get("images") or ()
        if not isinstance(images, (list, tuple)):
            raise ValueError("'images' must be a list")
        return cls(role=d["role"], content=content, images=tuple(images))

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
    prompt_tokens: int | None = None  # the prompt's tokens in the model's context, where the engine knows
    # Between an engine and engines/core.py only (never seen above the engine process's proxy): an
    # engine that leaves detokenizing to the other process sends the new token ids instead of text,
    # and the prompt's ids once, on its first Delta (see LMDeployEngine.detokenize_elsewhere)
    ids: tuple[int, ...] | None = None
    prompt_ids: tuple[int, ...] | None = None


@dataclass(frozen=True)
class Capabilities:
    """What a loaded engine can honour, as typed fields (the manager refuses the rest up front,
    naming the parameter, instead of an engine ignoring it)."""

    penalties: bool = False          # presence_penalty / frequency_penalty
    logprobs: bool = False           # per-token log probabilities
    structured_output: bool = False  # response_format json_object / json_schema
    vision: bool = False             # images in user messages
    seed: bool = True                # a seed reproduces a reply


@dataclass(frozen=True)
class SchedulerView:
    """The engine's own view of its work: requests decoding now, requests waiting inside the engine,
    and the KV cache's used share (None where the engine does not say)."""

    active: int
    waiting: int
    cache_usage: float | None = None


def new_request_id(prefix: str = "req") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:20]}"


@dataclass(frozen=True)
class ChatRequest:
    """One generation request, built once at its entry point (Chat page, Vision page, ``/chat``,
    ``/v1``, load test, comparison, Quantize card) and carried unchanged to the engine.

    ``request_id`` names it from admission to its end: ``abort(request_id)`` stops it in any state.
    ``owner`` is who sent it (the logged-in user, or None in an app without users) and ``session``
    the browser session or API connection it came through (a closed tab aborts its session's
    requests). ``source`` says which entry point built it (for metrics and the Monitor page)."""

    messages: tuple[ChatMessage, ...]
    params: GenParams = field(default_factory=GenParams)
    request_id: str = field(default_factory=new_request_id)
    owner: str | None = None
    session: str = ""
    source: str = "api"
    # the prompt's tokens as the manager counted them while fitting the history (None: not counted):
    # an engine may take it instead of running its tokenizer over the prompt a second time
    prompt_tokens: int | None = None

    def __post_init__(self):
        msgs = tuple(self.messages)
        if not msgs:
            raise InvalidRequest("A request needs at least one message.", param="messages")
        if not all(isinstance(m, ChatMessage) for m in msgs):
            raise TypeError("messages must be ChatMessage objects")
        if not isinstance(self.params, GenParams):
            raise TypeError("params must be a GenParams")
        object.__setattr__(self, "messages", msgs)

    def with_messages(self, messages: Sequence[ChatMessage]) -> "ChatRequest":
        return replace(self, messages=tuple(messages), prompt_tokens=None)

    @property
    def chars(self) -> int:
        return sum(len(m.content) for m in self.messages)


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
    capabilities: Capabilities = field(default_factory=Capabilities)
    defaults: GenParams | None = None   # the model's own sampling defaults (generation_config.json)
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["defaults"] = self.defaults.to_dict() if self.defaults else None
        return d


@runtime_checkable
class Engine(Protocol):
    """What every backend provides. Backends import their heavy libraries lazily and know nothing
    of Gradio; the :class:`~engines.manager.EngineManager` is their only caller."""

    info: EngineInfo

    def stream(self, request: ChatRequest) -> Iterator[Delta]:
        """Stream the assistant's reply to ``request.messages``. Closing the iterator early aborts
        the request; so does ``abort(request.request_id)`` from any thread."""

    def count_tokens(self, messages: Sequence[ChatMessage]) -> int:
        """Prompt tokens ``messages`` take once put through the model's chat template."""

    def message_tokens(self, messages: Sequence[ChatMessage]) -> list[int]:
        """Each message's own tokens (its text, without the template), in one pass: what history
        fitting uses to stay linear in the number of messages."""

    def abort(self, request_id: str) -> None:
        """Stop ``request_id`` wherever it is (waiting, being admitted or prefilled, decoding);
        a no-op when it is unknown or finished. Its stream ends with finish reason "abort"."""

    def health(self) -> str | None:
        """None while the engine can serve; else why not (the Engines page offers a reload)."""

    def scheduler(self) -> SchedulerView | None:
        """The engine's own view of running and waiting requests, where it has one."""

    def live_requests(self) -> int:
        """Requests the engine still holds (a number above zero once every stream ended is a leak)."""

    def close(self) -> None:
        """Free the model and its device memory. Idempotent."""
