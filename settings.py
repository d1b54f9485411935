"""Every knob of TurboStudio in one typed place.

This is the only module that reads ``sys.argv`` or environment variables (imitating vLLM's
``envs.py``): pages and engines receive a :class:`Settings` instance and never look elsewhere.
Command-line options are named like LMDeploy's CLI (``--model-format``, ``--quant-policy``,
``--cache-max-entry-count``, ``--session-len``, ``--tp``), so the tutorial's commands carry over.
Each option can also come from an environment variable ``TURBOSTUDIO_<NAME>`` (handy for a hosted
Space, where there is no command line); an explicit command-line flag wins.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

ENGINES = ("auto", "transformers", "turbomind", "pytorch", "remote")
DEVICES = ("auto", "cpu", "cuda")
MODEL_FORMATS = ("hf", "awq", "fp8")
QUANT_POLICIES = (0, 4, 8, 16)
ENGINE_PROCESSES = ("auto", "on", "off")


def _default_cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "turbostudio")


@dataclass
class Settings:
    """The app's settings; see ``python app.py --help`` for the meaning of each."""

    model: str | None = None          # None: the built-in default (SmolLM2-135M-Instruct)
    engine: str = "auto"              # auto | transformers | turbomind | pytorch
    device: str = "auto"              # transformers backend only: auto | cpu | cuda
    dtype: str = "auto"               # auto | float32 | float16 | bfloat16
    model_format: str = "hf"          # hf | awq (TurboMind) | fp8 (LMDeploy engines)
    quant_policy: int = 0             # KV cache: 0 (off), 8 (int8), 4 (int4), 16 (fp8: PyTorch engine)
    cache_max_entry_count: float = 0.8  # share of free GPU memory for the KV cache (LMDeploy)
    session_len: int | None = None    # context length; None: the model's own
    tp: int = 1                       # tensor parallel GPUs (LMDeploy)
    trust_remote_code: bool = False
    engine_process: str = "auto"      # auto | on | off: the engine in a process of its own (engines/core.py)
    server_name: str = "127.0.0.1"
    server_port: int = 7860
    share: bool = False
    auth: str | None = None           # "user:password" or a file of such lines
    root_path: str | None = None
    cache_dir: str = field(default_factory=_default_cache_dir)
    concurrency: int | None = None    # generation events run at once; None: sized from the engine
    max_queue: int = 64               # waiting events before "busy" is answered
    switch_interval: float | None = None  # the GIL's switch interval (s); None: Python's 0.005
    max_input_chars: int = 131072     # characters of a whole request (all messages together)
    max_messages: int = 1024          # messages in one request (system and assistant included)
    max_new_tokens_limit: int = 4096
    no_load: bool = False             # start without loading a model (tests, admin-only setups)
    share_without_auth: bool = False  # explicit opt-out of the --auth that --share requires
    model_roots: str | None = None    # os.pathsep-separated folders the UI may load models from
    allowed_models: str | None = None  # comma-separated hub ids / server URLs the UI may load
    admin: str | None = None          # comma-separated users allowed to load models (with --auth)
    api: bool = False                 # serve /v1/models and /v1/chat/completions (OpenAI-compatible)
    remote_model: str | None = None   # engine remote: the model name on the server (default: its first)
    remote_api_key: str | None = None  # engine remote: the server's API key
    vision_model: str | None = None   # None: llava-interleave-qwen-0.5b from the hub, when reachable
    vision_engine: str = "auto"
    max_upload_mb: int = 20           # largest file a browser may upload
    max_images_per_turn: int = 4
    max_images: int = 8               # per conversation
    no_history: bool = False          # keep no conversations on the server (the page keeps them in the tab)
    history_days: int | None = None   # delete conversations not updated in this many days; None: keep
    # Set from the environment only (no command-line flag): where the app runs and diagnostics.
    hosted: bool = False              # SPACE_ID is set: a public hosted demo (Hugging Face Spaces)
    hub_offline: bool = False         # HF_HUB_OFFLINE: never try the model hub
    hub_endpoint: str = "https://huggingface.co"   # HF_ENDPOINT
    profile: str | None = None        # TURBOSTUDIO_PROFILE: sample the server's stacks into this file
    session_shim: bool = True         # TURBOSTUDIO_SESSION_SHIM=0: Gradio's own per-session configs
    queue_shim: bool = True           # TURBOSTUDIO_QUEUE_SHIM=0: Gradio's own 1 ms queue poll
    rest_chat: bool = True            # TURBOSTUDIO_REST_CHAT=0: /chat's REST calls through Gradio's queue
    lmdeploy_wait_end: bool = False   # TURBOSTUDIO_LMDEPLOY_WAIT_END=1: old stream ends (A/B runs)
    core_push: bool = True            # TURBOSTUDIO_CORE_PUSH=0: a pump thread per stream in the engine process (A/B runs)
    core_detokenize: bool = False     # TURBOSTUDIO_CORE_DETOKENIZE=1: LMDeploy's text made in the web process
    fast_http: bool = False           # TURBOSTUDIO_FAST_HTTP=1: uvloop/httptools where installed (measured: no gain)
    gc_freeze: bool = True            # TURBOSTUDIO_GC_FREEZE=0: the heap left in the collector's full walks

    def validate(self) -> "Settings":
        if self.engine not in ENGINES:
            raise ValueError(f"--engine must be one of {', '.join(ENGINES)}, got {self.engine!r}")
        if self.engine_process not in ENGINE_PROCESSES:
            raise ValueError(f"--engine-process must be auto, on or off, got {self.engine_process!r}")
        if self.device not in DEVICES:
            raise ValueError(f"--device must be one of {', '.join(DEVICES)}, got {self.device!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.model_format not in MODEL_FORMATS:
            raise ValueError(f"--model-format must be one of {', '.join(MODEL_FORMATS)}")
        if self.quant_policy not in QUANT_POLICIES:
            raise ValueError("--quant-policy must be 0 (off), 4 (int4), 8 (int8) or 16 (fp8, LMDeploy's "
                             "PyTorch engine only)")
        if not 0.0 < self.cache_max_entry_count <= 1.0:
            raise ValueError("--cache-max-entry-count must be in (0, 1]")
        if self.session_len is not None and self.session_len < 16:
            raise ValueError("--session-len must be at least 16")
        if self.tp < 1:
            raise ValueError("--tp must be at least 1")
        if self.switch_interval is not None and not 0 < self.switch_interval <= 1:
            raise ValueError("--switch-interval is in seconds, in (0, 1] (Python's own is 0.005)")
        if not 0 < self.server_port < 65536:
            raise ValueError("--server-port must be in 1..65535")
        if self.history_days is not None and self.history_days < 1:
            raise ValueError("--history-days must be at least 1 (leave it out to keep conversations)")
        if self.max_messages < 1 or self.max_input_chars < 1:
            raise ValueError("--max-messages and --max-input-chars must be at least 1")
        if self.share and not self.auth and not self.share_without_auth:
            raise ValueError("--share makes the app public: give --auth user:password (or a file of users), "
                             "or --share-without-auth to accept that anyone with the link can use it")
        return self

    @property
    def public(self) -> bool:
        """Reachable by people the operator does not know: a share link or a hosted Space."""
        return bool(self.share or self.hosted)

    @property
    def restricted(self) -> bool:
        """Whether the UI may load models only from the configured roots and allowed ids."""
        return bool(self.public or self.auth or self.model_roots)

    @property
    def show_paths(self) -> bool:
        """Whether every user may see paths on the server (a private app without users)."""
        return not (self.public or self.auth)

    def limits(self):
        """The per-request limits every entry point shares (engines.manager.Limits)."""
        from engines.manager import Limits

        return Limits(max_pending=self.max_queue + (self.concurrency or 16),
                      max_messages=self.max_messages, max_input_chars=self.max_input_chars,
                      max_new_tokens=self.max_new_tokens_limit)

    def load_policy(self):
        from engines.models import LoadPolicy

        roots = [r for r in (self.model_roots or "").split(os.pathsep) if r] or \
            [os.path.join(self.cache_dir, "models")]
        allowed = {a.strip() for a in (self.allowed_models or "").split(",") if a.strip()}
        return LoadPolicy(restricted=self.restricted, roots=roots, allowed=allowed,
                          trust_remote_code=self.trust_remote_code)

    def admins(self) -> set[str] | None:
        """Users who may use operator controls; None means everyone (a private, local app).

        A public app (share link or hosted Space) has operator controls only with --auth *and*
        --admin: anyone can reach it, so nobody is an operator by default."""
        if self.admin and self.auth:
            return {a.strip() for a in self.admin.split(",") if a.strip()}
        if self.public or self.admin:
            return set()
        return None

    def is_admin(self, user: str | None) -> bool:
        """Whether ``user`` may use the operator controls (load models, start jobs and servers)."""
        admins = self.admins()
        return admins is None or user in admins

    def oversees(self, user: str | None) -> bool:
        """Whether ``user`` sees and may cancel what *other* users started (metrics, load tests,
        jobs). In an app with users that takes an --admin; a private app without users has one
        person at the keyboard. (A private app with --auth but no --admin lets every user operate
        it, as before, but each still sees only their own runs and replies.)"""
        if not self.auth and not self.public:
            return True
        return bool(self.admin) and user in (self.admins() or set())

    def auth_pairs(self) -> list[tuple[str, str]] | None:
        """``--auth`` as (user, password) pairs: "user:pw" or a file with one such line each."""
        if not self.auth:
            return None
        lines = [self.auth]
        if os.path.isfile(self.auth):
            lines = Path(self.auth).read_text().splitlines()
        pairs = []
        for line in lines:
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            user, sep, pw = line.partition(":")
            if not sep or not user or not pw:
                raise ValueError("--auth takes user:password (or a file of such lines)")
            pairs.append((user, pw))
        return pairs

    def engine_options(self) -> dict:
        """The options every engine backend receives (see ``engines.registry.create``)."""
        return dict(device=self.device, dtype=self.dtype, model_format=self.model_format,
                    quant_policy=self.quant_policy, cache_max_entry_count=self.cache_max_entry_count,
                    session_len=self.session_len, tp=self.tp,
                    trust_remote_code=self.trust_remote_code, engine_process=self.engine_process,
                    remote_model=self.remote_model,
                    api_key=self.remote_api_key, wait_end=self.lmdeploy_wait_end or None,
                    core_push=None if self.core_push else False,
                    core_detokenize=True if self.core_detokenize else None)


_HELP = {
    "model": "model folder or hub id (default: the built-in SmolLM2-135M-Instruct)",
    "engine": "inference engine; auto picks TurboMind, then LMDeploy-PyTorch, then Transformers",
    "device": "device for the transformers engine",
    "dtype": "weights/activation dtype",
    "model_format": "weight format (awq: 4-bit AWQ from `lmdeploy lite auto_awq`, TurboMind; fp8: a blocked-FP8 "
                    "folder from the Quantize page, TurboMind or LMDeploy's PyTorch engine)",
    "quant_policy": "KV-cache quantization: 0 off, 8 int8, 4 int4 (LMDeploy engines), 16 fp8 e4m3 "
                    "(LMDeploy's PyTorch engine only; TurboMind 0.18 refuses it)",
    "cache_max_entry_count": "share of free GPU memory given to the KV cache (LMDeploy engines)",
    "session_len": "context length in tokens (default: the model's)",
    "tp": "GPUs one model spans (tensor parallel, LMDeploy engines)",
    "trust_remote_code": "allow models that ship their own Python code",
    "engine_process": "run the engine in a process of its own, so the web server and the engine do not "
                      "share one Python GIL (auto: on for TurboMind and LMDeploy's PyTorch engine, off for "
                      "Transformers)",
    "server_name": "address to bind; 127.0.0.1 keeps it local (use an SSH tunnel)",
    "server_port": "port to serve on",
    "share": "create a public Gradio share link (requires --auth)",
    "auth": "user:password, or a file with one user:password a line",
    "root_path": "URL prefix when served behind a reverse proxy",
    "cache_dir": "where converted models and app data are kept",
    "concurrency": "generation requests served at once (default: sized from the engine)",
    "max_queue": "requests allowed to wait before new ones are told the app is busy",
    "switch_interval": "seconds a Python thread may hold the GIL while another waits (default: Python's "
                       "0.005). An in-process engine's scheduler thread waits up to this long for the GIL "
                       "behind the web server's threads at each step; a smaller value (e.g. 0.0005) is an "
                       "experiment for many users (bench/bench_app.py --app-args)",
    "max_input_chars": "characters one request may carry, all its messages (system and assistant "
                       "included) together",
    "max_messages": "messages one request may carry (the Chat page leaves older turns out beyond it)",
    "max_new_tokens_limit": "largest max_new_tokens a user may ask for",
    "no_load": "start the app without loading a model",
    "share_without_auth": "allow --share without --auth (anyone with the link can chat)",
    "model_roots": "folders (separated by ':') the UI may load models from; set, or implied when the app "
                   "is shared or has --auth (then only the app's own model cache)",
    "allowed_models": "comma-separated hub ids or server URLs the UI may load when loading is restricted",
    "admin": "comma-separated users who may load/unload models from the UI (with --auth); "
             "shared without auth, nobody may",
    "api": "also serve an OpenAI-compatible API at /v1 (same port, same --auth as Bearer user:password)",
    "remote_model": "with --engine remote: the model name on the server (default: the first it lists)",
    "remote_api_key": "with --engine remote: the server's API key",
    "vision_model": "vision-language model folder or hub id for the Vision page "
                    "(default: llava-hf/llava-interleave-qwen-0.5b-hf when a hub is reachable)",
    "vision_engine": "engine for the vision model (auto: LMDeploy's PyTorch engine for LLaVA on GPU, "
                     "else Transformers)",
    "max_upload_mb": "largest file a user may upload, in MB",
    "max_images_per_turn": "images one message may carry",
    "max_images": "images one vision conversation may hold",
    "no_history": "keep no conversations on the server: each chat lives in its browser tab only",
    "history_days": "delete conversations not updated in this many days (at start-up and daily; "
                    "default: keep them)",
}
DTYPES = ("auto", "float32", "float16", "bfloat16")
_CHOICES = {"engine": ENGINES, "vision_engine": ENGINES, "device": DEVICES, "model_format": MODEL_FORMATS,
            "quant_policy": QUANT_POLICIES, "dtype": DTYPES, "engine_process": ENGINE_PROCESSES}
# --help in groups, in this order; options not named here are benchmarking knobs, hidden from --help
_GROUPS = {
    "model and engine": ("model", "engine", "device", "dtype", "model_format", "quant_policy",
                         "cache_max_entry_count", "session_len", "tp", "trust_remote_code", "remote_model",
                         "remote_api_key", "vision_model", "vision_engine", "engine_process", "no_load",
                         "cache_dir"),
    "serving and security": ("server_name", "server_port", "share", "auth", "admin", "share_without_auth",
                             "root_path", "api", "model_roots", "allowed_models"),
    "limits": ("max_input_chars", "max_messages", "max_new_tokens_limit", "max_images_per_turn", "max_images",
               "max_upload_mb", "max_queue", "concurrency"),
    "conversations": ("no_history", "history_days"),
}
_EPILOG = """Every option can also be set as an environment variable TURBOSTUDIO_<OPTION> (for example
TURBOSTUDIO_MODEL or TURBOSTUDIO_MAX_QUEUE; handy on a hosted Space); a flag on the command line wins.
Diagnostics (environment only): TURBOSTUDIO_PROFILE=<file> samples the server's stacks,
TURBOSTUDIO_SESSION_SHIM=0 and TURBOSTUDIO_QUEUE_SHIM=0 switch off the Gradio shims,
TURBOSTUDIO_LMDEPLOY_WAIT_END=1 restores the old LMDeploy stream ends, TURBOSTUDIO_CORE_PUSH=0 the
engine process's pump thread per stream, TURBOSTUDIO_CORE_DETOKENIZE=1 makes LMDeploy's text in the web
process instead of on LMDeploy's loop (under test), TURBOSTUDIO_FAST_HTTP=1 serves HTTP on uvloop and
httptools where they are installed (measured no faster here: ui/gradio_patches.http_stack),
TURBOSTUDIO_GC_FREEZE=0 leaves the heap in the garbage collector's full collections (engines/heap.py).
SPACE_ID set (a Hugging Face Space) makes the app public: no operator controls without --auth and --admin."""


def _env_value(name: str, typ, env) -> object | None:
    raw = env.get("TURBOSTUDIO_" + name.upper())
    if raw is None or raw == "":
        return None
    if typ is bool:
        return raw.strip().lower() in ("1", "true", "yes", "on")
    if typ is int:
        return int(raw)
    if typ is float:
        return float(raw)
    return raw


# Fields read from the environment only (name -> variable). Diagnostics and where the app runs are
# not user options, so they get no flag.
_ENV_ONLY = {"hosted": "SPACE_ID", "hub_offline": "HF_HUB_OFFLINE", "hub_endpoint": "HF_ENDPOINT",
             "profile": "TURBOSTUDIO_PROFILE", "session_shim": "TURBOSTUDIO_SESSION_SHIM",
             "queue_shim": "TURBOSTUDIO_QUEUE_SHIM", "rest_chat": "TURBOSTUDIO_REST_CHAT",
             "lmdeploy_wait_end": "TURBOSTUDIO_LMDEPLOY_WAIT_END",
             "core_push": "TURBOSTUDIO_CORE_PUSH", "core_detokenize": "TURBOSTUDIO_CORE_DETOKENIZE",
             "fast_http": "TURBOSTUDIO_FAST_HTTP", "gc_freeze": "TURBOSTUDIO_GC_FREEZE"}


def _env_only(env) -> dict:
    out = {}
    for name, var in _ENV_ONLY.items():
        raw = env.get(var)
        if raw is None or raw == "":
            continue
        if name == "hosted":
            out[name] = True
        elif name in ("hub_endpoint", "profile"):
            out[name] = raw
        else:
            out[name] = raw.strip().lower() in ("1", "true", "yes", "on")
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="app.py", description="TurboStudio: chat with LLMs and VLMs on your own GPU (or CPU).",
        epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    groups = {name: p.add_argument_group(name) for name in _GROUPS}
    group_of = {opt: groups[g] for g, opts in _GROUPS.items() for opt in opts}
    defaults = Settings()
    hints = {f.name: f.type for f in dataclasses.fields(Settings)}
    for f in dataclasses.fields(Settings):
        if f.name in _ENV_ONLY:
            continue
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        hint = str(hints[f.name])
        target = group_of.get(f.name, p)
        help_text = _HELP[f.name] if f.name in group_of else argparse.SUPPRESS
        if hint == "bool":
            target.add_argument(flag, action="store_true", default=None, help=help_text)
            continue
        typ = int if hint.startswith("int") else float if hint.startswith("float") else str
        if help_text is not argparse.SUPPRESS and default not in (None, ""):
            help_text += f" (default: {default})"
        target.add_argument(flag, type=typ, default=None, choices=_CHOICES.get(f.name), help=help_text)
    return p


def from_args(argv: Sequence[str] | None = None, env: dict | None = None) -> Settings:
    """Settings from the command line, then ``TURBOSTUDIO_*`` variables, then defaults."""
    env = os.environ if env is None else env
    ns = build_parser().parse_args(argv)
    s = Settings()
    for f in dataclasses.fields(Settings):
        if f.name in _ENV_ONLY:
            continue
        hint = str(f.type)
        typ = bool if hint == "bool" else int if hint.startswith("int") else \
            float if hint.startswith("float") else str
        val = getattr(ns, f.name)
        if val is None:
            val = _env_value(f.name, typ, env)
        if val is not None:
            setattr(s, f.name, val)
    for name, val in _env_only(env).items():
        setattr(s, name, val)
    # On a Hugging Face Space the app must listen on all interfaces (the Space's proxy connects to it)
    if s.hosted and ns.server_name is None and not env.get("TURBOSTUDIO_SERVER_NAME"):
        s.server_name = "0.0.0.0"
    return s.validate()
