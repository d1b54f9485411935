"""Widgets and helpers shared by the pages: sampling controls -> GenParams, errors -> messages."""
from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass

import gradio as gr

from engines.base import EngineError, GenParams
from engines.manager import EngineManager
from settings import Settings

log = logging.getLogger(__name__)


@dataclass
class Context:
    """What every page's ``build`` receives."""

    settings: Settings
    manager: EngineManager
    vision: object = None      # ui.vision.VisionSlot, when the Vision page is on
    jobs: object = None        # engines.quantize.JobRunner, when the Quantize page is on
    servers: object = None     # engines.servers.ServerManager (api_server / proxy launcher)
    load: object = None        # engines.telemetry.LoadSampler: running and queued, once a second


class SamplingControls:
    """The sampling sliders; ``values`` go into an event's inputs, ``params`` turns them back."""

    def __init__(self, settings: Settings, max_new_tokens: int = 512, temperature: float = 0.7):
        r = GenParams.RANGES
        with gr.Accordion("Sampling", open=False):
            self.max_new_tokens = gr.Slider(1, settings.max_new_tokens_limit, value=max_new_tokens, step=1,
                                            label="max_new_tokens")
            self.temperature = gr.Slider(*r["temperature"], value=temperature, step=0.05,
                                         label="temperature (0 = greedy)", elem_classes=["temperature"])
            self.top_p = gr.Slider(0.01, 1.0, value=0.9, step=0.01, label="top_p")
            self.top_k = gr.Slider(*r["top_k"], value=40, step=1, label="top_k (0 = off)")
            self.repetition_penalty = gr.Slider(*r["repetition_penalty"], value=1.0, step=0.01,
                                                label="repetition_penalty")
            self.seed = gr.Number(value=None, precision=0, label="seed (empty = random)")

    @property
    def values(self) -> list:
        return [self.max_new_tokens, self.temperature, self.top_p, self.top_k, self.repetition_penalty,
                self.seed]


def make_params(settings: Settings, max_new_tokens, temperature, top_p, top_k, repetition_penalty,
                seed) -> GenParams:
    """GenParams from UI/API values; raises gr.Error naming the allowed range."""
    try:
        if max_new_tokens is not None and max_new_tokens > settings.max_new_tokens_limit:
            raise ValueError(f"max_new_tokens must be in [1, {settings.max_new_tokens_limit}], "
                             f"got {max_new_tokens!r}")
        return GenParams(max_new_tokens=_num(max_new_tokens, 512), temperature=_num(temperature, 0.7),
                         top_p=_num(top_p, 0.9), top_k=_num(top_k, 40),
                         repetition_penalty=_num(repetition_penalty, 1.0),
                         seed=None if seed in (None, "") else seed)
    except ValueError as e:
        raise gr.Error(str(e), title="Invalid parameter") from e


def _num(v, default):
    if v is None or v == "":
        return default
    if isinstance(v, float) and v.is_integer():
        return int(v) if default == int(default) and isinstance(default, int) else v
    return v


def user_error(exc: BaseException) -> gr.Error:
    """The message a user sees for ``exc``: engine errors as written, the rest summarized."""
    if isinstance(exc, gr.Error):
        return exc
    if isinstance(exc, EngineError):
        return gr.Error(exc.message, title=exc.code.replace("_", " ").capitalize())
    if isinstance(exc, ValueError):
        return gr.Error(str(exc), title="Invalid input")
    log.exception("unexpected error", exc_info=exc)
    return gr.Error(f"Internal error ({type(exc).__name__}): {exc}", title="Error")


def session_id(request: gr.Request | None) -> str:
    return (getattr(request, "session_hash", None) or "anonymous") if request else "anonymous"


def fmt_stats(stats: dict | None) -> str:
    if not stats:
        return ""
    parts = []
    if stats.get("ttft") is not None:
        parts.append(f"first token {stats['ttft']:.2f} s")
    parts.append(f"{stats.get('tokens', 0)} tokens")
    if stats.get("tokens_per_s"):
        parts.append(f"{stats['tokens_per_s']:.1f} tok/s")
    if stats.get("finish_reason") and stats["finish_reason"] != "stop":
        parts.append({"length": "cut at max_new_tokens", "abort": "stopped",
                      "error": "error"}.get(stats["finish_reason"], stats["finish_reason"]))
    return " · ".join(parts)


def user_of(request: gr.Request | None) -> str | None:
    """The logged-in user (None in an app without --auth)."""
    return getattr(request, "username", None) if request else None


def is_admin(settings: Settings, request: gr.Request | None) -> bool:
    return settings.is_admin(user_of(request))


def require_admin(settings: Settings, request: gr.Request | None,
                  what: str = "load or unload models") -> None:
    """Operator controls are for admins when the app is public or has users (Settings.admins)."""
    if not is_admin(settings, request):
        raise gr.Error(f"Only an administrator may {what} on this server.", title="Not allowed")


def may_manage(settings: Settings, request: gr.Request | None, owner: str | None) -> bool:
    """Whether the caller may cancel or see what ``owner`` started (a load test, a comparison, a
    quantization job): its owner, or an administrator (``Settings.oversees``)."""
    user = user_of(request)
    return settings.oversees(user) or (owner is not None and owner == user)


def sees_own(settings: Settings, request: gr.Request | None, owner: str | None, session: str) -> bool:
    """Whether a reply or a request that ``owner`` sent from ``session`` is the caller's to see:
    an administrator sees all, a logged-in user their own, and an anonymous visitor (a public app
    without --auth, where everyone is None) their own browser session's."""
    user = user_of(request)
    if settings.oversees(user):
        return True
    return owner == user if user is not None else owner is None and session == session_id(request)


# An absolute (or ~/, ./, ../) path inside a text: not the tail of a URL ("http://host/x"), of a
# hub id ("org/model"), of a unit ("tokens/s") or of a closing tag ("</sub>").
_PATH = re.compile(r"(?<![\w.:/~<-])(?:~|\.{1,2})?/[^\s'\"`<>|,;()\[\]{}*]+")


def sees_paths(settings: Settings, request: gr.Request | None) -> bool:
    """Whether the caller may see paths on the server: everyone in a private app without users
    (``Settings.show_paths``), else administrators only."""
    return settings.show_paths or is_admin(settings, request)


def hide_paths(value):
    """``value`` (a string, or dicts, lists and tuples of them) with every path on the server cut
    to its last component: ``/srv/models/my-w4a16`` -> ``my-w4a16``. Other values pass unchanged."""
    if isinstance(value, str):
        return _PATH.sub(lambda m: os.path.basename(m.group(0).rstrip("/")) or "…", value)
    if isinstance(value, dict):
        return {k: hide_paths(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(hide_paths(v) for v in value)
    return value


def redact_paths(settings: Settings, request: gr.Request | None, value):
    """What the caller may see of ``value``: as is for those who may see paths on the server
    (``sees_paths``), else with the paths cut to their last component (``hide_paths``). Without a
    request (a value built into the page, the same for every visitor) it is as the least
    privileged visitor would see it."""
    return value if sees_paths(settings, request) else hide_paths(value)


def queued_events(demo) -> int:
    """Requests waiting in Gradio's queue for a free place (0 where that cannot be read)."""
    try:
        return len(demo._queue)
    except Exception:  # noqa: BLE001
        return 0
