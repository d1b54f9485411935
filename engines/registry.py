"""Engine name -> backend. ``auto`` picks TurboMind, else LMDeploy-PyTorch, else Transformers, and
says why (the reason shows in the UI next to the backend that loaded)."""
from __future__ import annotations

from .base import Engine, EngineUnavailable, ModelLoadError
from .models import ResolvedModel, read_config

ENGINE_NAMES = ("auto", "transformers", "turbomind", "pytorch", "remote")


def _cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


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
    from .lmdeploy import lmdeploy_available, turbomind_supports

    ok, why = lmdeploy_available()
    if not ok:
        return "transformers", why
    if resolved.local:
        ok, why = turbomind_supports(resolved.path, trust_remote_code)
        if ok:
            return "turbomind", "CUDA and LMDeploy present, TurboMind supports this architecture"
        return "pytorch", f"{why}: LMDeploy's PyTorch engine"
    return "turbomind", "CUDA and LMDeploy present (hub model)"


def precheck(resolved: ResolvedModel, backend: str, trust_remote_code: bool = False) -> None:
    """Cheap checks before an old model is unloaded: can ``backend`` run this model at all?"""
    if not resolved.local or backend == "remote":
        return
    cfg = read_config(resolved.path)
    arch = (cfg.get("architectures") or ["?"])[0]
    if backend == "transformers":
        try:
            from transformers import AutoConfig

            AutoConfig.from_pretrained(resolved.path, trust_remote_code=trust_remote_code)
        except Exception as e:  # noqa: BLE001
            line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ModelLoadError(f"Transformers cannot run this model (architecture {arch}): {line}") from e
    elif backend in ("turbomind", "pytorch"):
        label = "TurboMind" if backend == "turbomind" else "LMDeploy's PyTorch engine"
        if not _cuda():
            raise EngineUnavailable(f"{label} needs a CUDA GPU; none is visible.")
        from .lmdeploy import lmdeploy_available, turbomind_supports

        ok, why = lmdeploy_available()
        if not ok:
            raise EngineUnavailable(why)
        if backend == "turbomind":
            ok, why = turbomind_supports(resolved.path, trust_remote_code)
            if not ok:
                raise ModelLoadError(f"{why} (architecture {arch}); try the 'pytorch' or 'transformers' engine.")


def create(resolved: ResolvedModel, backend: str, **options) -> Engine:
    if backend == "transformers":
        from .transformers import TransformersEngine

        return TransformersEngine(resolved, **options)
    if backend in ("turbomind", "pytorch"):
        from .lmdeploy import LMDeployEngine

        return LMDeployEngine(resolved, backend=backend, **options)
    if backend == "remote":
        from .remote import RemoteEngine

        return RemoteEngine(resolved, **options)
    raise ValueError(f"unknown backend {backend!r}")
