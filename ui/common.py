"""Widgets and helpers shared by the pages: sampling controls -> GenParams, errors -> messages."""
from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass

import gradio as gr

from engines.base import EngineError, EngineInfo, GenParams
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
    store: object = None       # storage.conversations.ConversationStore; None with --no-history
    compare: object = None     # engines.manager.EngineManager of the Compare view's model B


class Refusal(gr.Error):
    """``gr.Error`` for what the user asked that cannot be done (bad input, a limit, not allowed):
    the same message to them, but no traceback in the server log, which keeps tracebacks for faults."""

    def __init__(self, message: str = "Not possible.", duration: float | None = 10, visible: bool = True,
                 title: str = "Error", print_exception: bool = False):
        super().__init__(message, duration=duration, visible=visible, title=title,
                         print_exception=print_exception)


class SamplingControls:
    """The sampling sliders; ``values`` go into an event's inputs, ``make_params`` turns them back.

    They start at the loaded model's own defaults (its generation_config.json, as transformers and
    LMDeploy use them) where it has them, else the app's; a line under them says which are in force
    and where from. ``refresh`` gives the updates for a page load (after a model switch)."""

    def __init__(self, settings: Settings, info: EngineInfo | None = None, max_new_tokens: int = 512):
        r = GenParams.RANGES
        d = defaults_of(info)
        with gr.Accordion("Sampling", open=False):
            self.source = gr.Markdown(defaults_line(info), elem_classes=["defaults-line"])
            self.max_new_tokens = gr.Slider(1, settings.max_new_tokens_limit,
                                            value=min(max_new_tokens, settings.max_new_tokens_limit), step=1,
                                            label="max_new_tokens")
            self.temperature = gr.Slider(*r["temperature"], value=d.temperature, step=0.05,
                                         label="temperature (0 = greedy)", elem_classes=["temperature"])
            self.top_p = gr.Slider(0.01, 1.0, value=d.top_p, step=0.01, label="top_p")
            self.top_k = gr.Slider(*r["top_k"], value=d.top_k, step=1, label="top_k (0 = off)")
            self.repetition_penalty = gr.Slider(*r["repetition_penalty"], value=d.repetition_penalty, step=0.01,
                                                label="repetition_penalty")
            # a text box: a Number field shows 0 when empty, which reads as seed 0
            self.seed = gr.Textbox(value="", label="seed", placeholder="random (or a whole number)",
                                   max_lines=1, elem_classes=["seed"])

    @property
    def values(self) -> list:
        return [self.max_new_tokens, self.temperature, self.top_p, self.top_k, self.repetition_penalty,
                self.seed]

    @property
    def defaults_outputs(self) -> list:
        return [self.source, self.temperature, self.top_p, self.top_k, self.repetition_penalty]

    @staticmethod
    def refresh(info: EngineInfo | None) -> list:
        d = defaults_of(info)
        return [defaults_line(info), d.temperature, d.top_p, d.top_k, d.repetition_penalty]


def defaults_of(info: EngineInfo | None) -> GenParams:
    return (info.defaults if info is not None and info.defaults is not None else None) or GenParams()


SAMPLING_DEFAULTS = ("temperature", "top_p", "top_k", "repetition_penalty")
"""The sampling values a model's generation_config.json may set, shown in the defaults line."""


def defaults_line(info: EngineInfo | None) -> str:
    """Which sampling defaults are in force and where each comes from: the values the model's
    generation_config.json sets (where they differ from the app's) named apart from the app's own,
    so "top_k 40" is not said to come from a file that sets only temperature and top_p."""
    d, app = defaults_of(info), GenParams()

    def text(keys) -> str:
        return " · ".join(f"{k} {getattr(d, k):g}" for k in keys)

    keys = SAMPLING_DEFAULTS
    if info is None:
        return f"<sub>Defaults: {text(keys)} (the app's; no model is loaded).</sub>"
    if info.defaults is None:
        return f"<sub>Defaults: {text(keys)}: the app's own, since {model_label(info)} sets none.</sub>"
    own = _keys_set_by(info) or [k for k in keys if getattr(d, k) != getattr(app, k)]
    own = [k for k in keys if k in own]
    rest = [k for k in keys if k not in own]
    if not own:
        return f"<sub>Defaults: {text(keys)} ({model_label(info)}'s generation_config.json sets the app's " \
               f"own values).</sub>"
    return f"<sub>Defaults: {text(own)} from {model_label(info)}'s generation_config.json" + \
        (f"; {text(rest)} the app's own" if rest else "") + ".</sub>"


def _keys_set_by(info: EngineInfo) -> list[str]:
    """The sampling keys the model's generation_config.json sets, read from its folder ([] where
    there is no local file to read, e.g. a hub id on LMDeploy or a remote server)."""
    import json

    folder = info.model_path or info.model
    try:
        with open(os.path.join(folder, "generation_config.json")) as f:
            values = json.load(f)
    except (OSError, ValueError, TypeError):
        return []
    return [k for k in SAMPLING_DEFAULTS if isinstance(values, dict) and isinstance(values.get(k), (int, float))]


def model_label(info: EngineInfo | None) -> str:
    """A model's name as people call it: a folder's last component, a hub id or server model as is."""
    if info is None:
        return "no model"
    m = info.model
    return os.path.basename(m.rstrip("/")) if m.startswith(("/", "~", ".")) else m


def make_params(settings: Settings, max_new_tokens, temperature, top_p, top_k, repetition_penalty,
                seed) -> GenParams:
    """GenParams from UI/API values; raises gr.Error naming the allowed range."""
    try:
        if max_new_tokens is not None and max_new_tokens > settings.max_new_tokens_limit:
            raise ValueError(f"max_new_tokens must be in [1, {settings.max_new_tokens_limit}], "
                             f"got {max_new_tokens!r}")
        if isinstance(seed, str):
            seed = seed.strip()
            if seed and not seed.lstrip("-").isdigit():
                raise ValueError(f"seed must be a whole number (or empty for random), got {seed!r}")
            seed = int(seed) if seed else None
        return GenParams(max_new_tokens=_num(max_new_tokens, 512), temperature=_num(temperature, 0.7),
                         top_p=_num(top_p, 0.9), top_k=_num(top_k, 40),
                         repetition_penalty=_num(repetition_penalty, 1.0), seed=seed)
    except ValueError as e:
        raise Refusal(str(e), title="Invalid parameter", print_exception=False) from e


def _num(v, default):
    if v is None or v == "":
        return default
    if isinstance(v, float) and v.is_integer():
        return int(v) if default == int(default) and isinstance(default, int) else v
    return v


def user_error(exc: BaseException) -> gr.Error:
    """The message a user sees for ``exc``: engine errors and refusals as written (no traceback in
    the server log: they are the user's input, not a fault), anything else summarized and logged
    with its traceback."""
    if isinstance(exc, gr.Error):
        return exc
    if isinstance(exc, EngineError):
        return gr.Error(exc.message, title=exc.code.replace("_", " ").capitalize(), print_exception=False)
    if isinstance(exc, ValueError):
        return gr.Error(str(exc), title="Invalid input", print_exception=False)
    log.exception("unexpected error", exc_info=exc)
    return gr.Error(f"Internal error ({type(exc).__name__}): {exc}", title="Error")


def refuse(exc: BaseException) -> str:
    """A refusal in a page's own event: a warning toast that leaves the page as it was (an error
    would draw Gradio's red Error overlay over the outputs). Returns a line for the page's status
    (the toast fades; the reason stays readable there, and for API clients of the page's events).
    Named API endpoints (``/chat``) raise instead."""
    err = user_error(exc)
    gr.Warning(err.message, title=err.title)
    log.info("refused: %s", err.message)
    return f"⚠️ {err.message}"


def session_id(request: gr.Request | None) -> str:
    return (getattr(request, "session_hash", None) or "anonymous") if request else "anonymous"


def fmt_stats(stats: dict | None) -> str:
    if not stats:
        return ""
    parts = []
    if stats.get("ttft") is not None:
        parts.append(f"first token {stats['ttft']:.2f} s")
    if stats.get("tokens") is not None:
        parts.append(f"{stats['tokens']} tokens")
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
        raise Refusal(f"Only an administrator may {what} on this server.", title="Not allowed")


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
