"""Engine layer: one small interface (``engines.base.Engine``) over several inference backends.

Nothing here imports Gradio; heavy libraries (torch, transformers, lmdeploy) are imported lazily
inside the backends, so ``import engines`` is cheap and works where LMDeploy is absent.
"""
from .base import (ChatMessage, ContextTooLong, Delta, Engine, EngineError, EngineInfo, EngineUnavailable,
                   GenParams, ModelLoadError)

__all__ = ["ChatMessage", "ContextTooLong", "Delta", "Engine", "EngineError", "EngineInfo",
           "EngineUnavailable", "GenParams", "ModelLoadError"]
