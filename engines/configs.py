"""One frozen, validated config per backend, built once from the app's settings or the Engines page.

``config_for(backend, options)`` picks the options that backend takes from the app-wide options
dict (``Settings.engine_options()`` merged with what the user chose). An option no backend knows is
an error; an option that belongs to another backend (``quant_policy`` when Transformers was picked)
is returned in ``not_applicable`` so the manager can say it was not used, rather than swallowing it
in a ``**_ignored`` catch-all as before.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

DTYPES = ("auto", "float32", "float16", "bfloat16")
WEIGHT_QUANTS = ("none", "int8")     # TransformersConfig.weight_quant
# KV-cache quant_policy values LMDeploy 0.18 takes (lmdeploy.messages.QuantPolicy): 0 off, 4 int4,
# 8 int8 on both engines; 16 FP8 (e4m3, a scale per tensor) on its PyTorch engine only (its
# TurboMind asserts "FP8 quantization is not supported"). 17 (e5m2) and 42 (TurboQuant) are not offered.
QUANT_POLICIES = (0, 4, 8, 16)


@dataclass(frozen=True)
class TransformersConfig:
    """Hugging Face Transformers on CPU or one CUDA GPU, with our continuous batcher."""

    device: str = "auto"            # auto | cpu | cuda
    dtype: str = "auto"             # auto: bfloat16/float16 on CUDA, float32 on CPU
    session_len: int | None = None  # context length; None: the model's own
    trust_remote_code: bool = False
    max_batch: int = 16             # requests decoded together
    # none | int8: the decoder's linear weights quantized to int8 at load (torchao's int8
    # weight-only; nothing is written to disk). Measured on a 2-core AVX2 CPU it saves memory but
    # decodes slower (README, Quantize); it is a memory saving, not a speed-up, there.
    weight_quant: str = "none"
    engine_process: str = "auto"    # auto (= off here) | on | off: engines/core.py

    def __post_init__(self):
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be auto, cpu or cuda, got {self.device!r}")
        if self.weight_quant not in WEIGHT_QUANTS:
            raise ValueError(f"weight_quant must be one of {', '.join(WEIGHT_QUANTS)}, got {self.weight_quant!r}")
        _check_common(self)
        if not 1 <= int(self.max_batch) <= 1024:
            raise ValueError("max_batch must be in [1, 1024]")


@dataclass(frozen=True)
class LMDeployConfig:
    """LMDeploy's TurboMind or PyTorch engine (names as in LMDeploy's CLI)."""

    backend: str = "turbomind"      # turbomind | pytorch
    model_format: str = "hf"        # hf | awq (TurboMind reads AWQ W4A16 folders)
    quant_policy: int = 0           # KV cache: 0 off, 8 int8, 4 int4, 16 fp8 (PyTorch engine only)
    cache_max_entry_count: float = 0.8   # share of free GPU memory for the KV cache
    session_len: int | None = None
    tp: int = 1
    dtype: str = "auto"
    trust_remote_code: bool = False
    max_batch: int | None = None    # None: LMDeploy's default
    wait_end: bool = False          # diagnostic: end streams at LMDeploy's end marker (A/B runs)
    # in the engine process (engines/core.py): outputs pushed from LMDeploy's loop (True) or read by
    # one thread per stream (False, the earlier path: A/B runs)
    core_push: bool = True
    # in the engine process: token ids are turned into text in the web process rather than on
    # LMDeploy's event loop (LMDeployEngine.detokenize_elsewhere; TURBOSTUDIO_CORE_DETOKENIZE=1)
    core_detokenize: bool = False
    # auto (= on) | on | off: the engine in a process of its own, off the web side's GIL (engines/core.py)
    engine_process: str = "auto"

    def __post_init__(self):
        if self.backend not in ("turbomind", "pytorch"):
            raise ValueError(f"backend must be turbomind or pytorch, got {self.backend!r}")
        if self.model_format not in ("hf", "awq", "fp8"):
            raise ValueError(f"model_format must be hf, awq or fp8, got {self.model_format!r}")
        if self.quant_policy not in QUANT_POLICIES:
            raise ValueError("quant_policy must be 0 (off), 4 (int4), 8 (int8) or 16 (fp8, PyTorch engine)")
        if self.quant_policy == 16 and self.backend != "pytorch":
            raise ValueError("quant_policy 16 (FP8 KV cache) runs on LMDeploy's PyTorch engine only; "
                             "TurboMind 0.18 does not support it (use 8 or 4, or the pytorch engine)")
        if not 0.0 < float(self.cache_max_entry_count) <= 1.0:
            raise ValueError("cache_max_entry_count must be in (0, 1]")
        if int(self.tp) < 1:
            raise ValueError("tp must be at least 1")
        if self.max_batch is not None and not 1 <= int(self.max_batch) <= 4096:
            raise ValueError("max_batch must be in [1, 4096]")
        _check_common(self)


@dataclass(frozen=True)
class RemoteConfig:
    """Any OpenAI-compatible server (``lmdeploy serve api_server``, its proxy, ...)."""

    remote_model: str | None = None   # the model name on the server; None: the first it lists
    api_key: str | None = None
    session_len: int | None = None
    timeout: float = 10.0             # connect timeout (s); reads wait as long as a reply takes

    def __post_init__(self):
        if self.session_len is not None and int(self.session_len) < 16:
            raise ValueError("session_len must be at least 16")
        if not 0 < float(self.timeout) <= 600:
            raise ValueError("timeout must be in (0, 600] seconds")


ENGINE_PROCESS = ("auto", "on", "off")


def _check_common(cfg) -> None:
    if cfg.engine_process not in ENGINE_PROCESS:
        raise ValueError(f"engine_process must be auto, on or off, got {cfg.engine_process!r}")
    if cfg.dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {cfg.dtype!r}")
    if cfg.session_len is not None and int(cfg.session_len) < 16:
        raise ValueError("session_len must be at least 16")


CONFIGS = {"transformers": TransformersConfig, "turbomind": LMDeployConfig, "pytorch": LMDeployConfig,
           "remote": RemoteConfig}
KNOWN_OPTIONS = frozenset(f.name for cls in set(CONFIGS.values()) for f in dataclasses.fields(cls)) - {"backend"}

BackendConfig = TransformersConfig | LMDeployConfig | RemoteConfig


def config_for(backend: str, options: dict) -> tuple[BackendConfig, list[str]]:
    """(the config for ``backend`` from ``options``, the options given that it does not use).

    ``None`` values mean "the default". Unknown option names raise ``ValueError``."""
    if backend not in CONFIGS:
        raise ValueError(f"unknown backend {backend!r}")
    unknown = set(options) - KNOWN_OPTIONS
    if unknown:
        raise ValueError(f"unknown engine option(s): {', '.join(sorted(unknown))}")
    cls = CONFIGS[backend]
    names = {f.name for f in dataclasses.fields(cls)}
    kw = {k: v for k, v in options.items() if k in names and v is not None}
    if cls is LMDeployConfig:
        kw["backend"] = backend
    not_applicable = sorted(k for k, v in options.items()
                            if k not in names and v is not None and not _is_default(k, v))
    return cls(**kw), not_applicable


def _is_default(name: str, value) -> bool:
    """Whether ``value`` is the default of option ``name`` in whichever config declares it (an
    untouched default from settings is not worth a "not used" note)."""
    for cls in set(CONFIGS.values()):
        for f in dataclasses.fields(cls):
            if f.name == name and f.default is not dataclasses.MISSING and f.default == value:
                return True
    return False
