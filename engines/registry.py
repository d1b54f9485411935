"""Engine name -> backend. ``auto`` picks TurboMind, else LMDeploy-PyTorch, else Transformers, and
says why (the reason shows in the UI next to the backend that loaded).

Everything here reads the model from its :class:`~engines.models.ResolvedModel` (config.json parsed
once, TurboMind's support answer asked once); nothing reads the model's files again."""
from __future__ import annotations

from .base import Engine, EngineUnavailable, ModelLoadError
from .configs import BackendConfig, LMDeployConfig, RemoteConfig, TransformersConfig
from .models import ResolvedModel

ENGINE_NAMES = ("auto", "transformers", "turbomind", "pytorch", "remote")


def _cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def backend_of(config: BackendConfig) -> str:
    """The backend name a config builds: transformers, turbomind, pytorch or remote."""
    if isinstance(config, TransformersConfig):
        return "transformers"
    if isinstance(config, LMDeployConfig):
        return config.backend
    if isinstance(config, RemoteConfig):
        return "remote"
    raise TypeError(f"not a backend config: {type(config).__name__}")


def choose(resolved: ResolvedModel, engine: str, *, device: str = "auto",
           trust_remote_code: bool = False) -> tuple[str, str]:
    """The backend to build for ``engine`` and the reason, without loading anything."""
    if engine not in ENGINE_NAMES:
        raise ValueError(f"engine must be one of {', '.join(ENGINE_NAMES)}, got {engine!r}")
    remote = resolved.source == "remote server"
    if engine == "remote" and not remote:
        raise ValueError("the remote engine takes a server URL as the model, e.g. http://127.0.0.1:23333")
    if remote:
        if engine not in ("auto", "remote"):
            raise ValueError(f"{resolved.spec} is a server URL: use the remote engine, not {engine}")
        return "remote", "the model is a server URL: OpenAI-compatible remote engine"
    if engine != "auto":
        return engine, "chosen explicitly"
    if device == "cpu":
        return "transformers", "device cpu: only Transformers runs on CPU"
    if not _cuda():
        return "transformers", "no CUDA GPU visible: Transformers on CPU"
    from .lmdeploy import lmdeploy_available

    ok, why = lmdeploy_available()
    if not ok:
        return "transformers", why
    if resolved.local:
        ok, why = resolved.turbomind_support(trust_remote_code)
        if ok:
            return "turbomind", "CUDA and LMDeploy present, TurboMind supports this architecture"
        return "pytorch", f"{why}: LMDeploy's PyTorch engine"
    return "turbomind", "CUDA and LMDeploy present (hub model)"


def precheck(resolved: ResolvedModel, config: BackendConfig) -> None:
    """Cheap checks before an old model is unloaded: can this backend run this model at all?
    Reads ``resolved.config``, never the files."""
    backend = backend_of(config)
    remote = resolved.source == "remote server"
    if remote != (backend == "remote"):
        raise ValueError(f"the {backend} engine cannot serve {resolved.spec!r}"
                         + (": it is a server URL" if remote else ": the remote engine takes a server URL"))
    if not resolved.local or backend == "remote":
        return
    arch = resolved.architecture
    if backend == "transformers":
        _transformers_knows(resolved, config.trust_remote_code)
    else:
        label = "TurboMind" if backend == "turbomind" else "LMDeploy's PyTorch engine"
        if not _cuda():
            raise EngineUnavailable(f"{label} needs a CUDA GPU; none is visible.")
        from .lmdeploy import lmdeploy_available

        ok, why = lmdeploy_available()
        if not ok:
            raise EngineUnavailable(why)
        if backend == "turbomind":
            ok, why = resolved.turbomind_support(config.trust_remote_code)
            if not ok:
                raise ModelLoadError(f"{why} (architecture {arch}); try the 'pytorch' or 'transformers' engine.")


def _transformers_knows(resolved: ResolvedModel, trust_remote_code: bool) -> None:
    """Whether Transformers has a config class for this model type and the config.json parses into
    it (what ``AutoConfig.from_pretrained`` checks, from the already parsed dict)."""
    cfg, arch = resolved.config, resolved.architecture
    if trust_remote_code and cfg.get("auto_map"):
        return                                  # the model's own code decides, at load
    try:
        from transformers import CONFIG_MAPPING

        model_type = cfg.get("model_type")
        if not model_type:
            raise ValueError("config.json has no model_type")
        if model_type not in CONFIG_MAPPING:
            hint = " (it ships its own code: allow trust_remote_code)" if cfg.get("auto_map") else ""
            raise ValueError(f"model type {model_type!r} is not known to this transformers version{hint}")
        CONFIG_MAPPING[model_type].from_dict(dict(cfg))
    except Exception as e:  # noqa: BLE001
        line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelLoadError(f"Transformers cannot run this model (architecture {arch}): {line}") from e


def create(resolved: ResolvedModel, config: BackendConfig) -> Engine:
    """Build the backend ``config`` describes (call ``precheck`` first; the manager does). Where the
    config asks for it (``engine_process``, on by default for LMDeploy's engines), the engine is
    built in a process of its own and a proxy returned (:mod:`engines.core` says why)."""
    from .core import CoreEngine, wants_process

    if wants_process(config):
        import dataclasses

        here = dataclasses.replace(config, engine_process="off")   # what the child builds in itself
        return CoreEngine("engines.registry:create", (resolved, here), push=getattr(config, "core_push", True),
                          detokenize=getattr(config, "core_detokenize", False))
    if isinstance(config, TransformersConfig):
        from .transformers import TransformersEngine

        return TransformersEngine(resolved, config)
    if isinstance(config, LMDeployConfig):
        from .lmdeploy import LMDeployEngine

        return LMDeployEngine(resolved, config)
    if isinstance(config, RemoteConfig):
        from .remote import RemoteEngine

        return RemoteEngine(resolved, config)
    raise TypeError(f"not a backend config: {type(config).__name__}")
