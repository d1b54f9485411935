"""The LMDeploy adapter's own logic that runs without LMDeploy (the GPU tests run the rest):
dead-engine detection and the LLaVA image-token shim."""
from __future__ import annotations

import threading
import types

from engines.lmdeploy import LMDeployEngine, _use_own_image_token


def _bare_engine():
    eng = object.__new__(LMDeployEngine)      # no pipeline: only the bookkeeping is exercised
    eng._closed, eng._fatal = False, None
    eng.pipe = types.SimpleNamespace(internal_thread=types.SimpleNamespace(thread=threading.current_thread()))
    return eng


def test_a_cuda_error_marks_the_engine_dead_and_an_ordinary_one_does_not():
    eng = _bare_engine()
    eng._note_error("prompt too long for this session")
    assert eng.dead is None
    eng._note_error("RuntimeError: CUDA error: device-side assert triggered\nCompile with TORCH_USE_CUDA_DSA")
    assert "device-side assert" in eng.dead and "\n" not in eng.dead


def test_a_stopped_event_loop_marks_the_engine_dead():
    eng = _bare_engine()
    t = threading.Thread(target=lambda: None)
    t.start()
    t.join()
    eng.pipe.internal_thread.thread = t
    assert "event loop" in eng.dead
    eng._closed = True
    assert eng.dead is None, "an unloaded engine is not reported as dead"


def test_llava_placeholder_becomes_the_models_own_image_token():
    class LlavaHfVisionModel:
        image_token_id = 2                       # LMDeploy's pick: the pad token (SmolLM2's <|im_end|>)
        hf_config = types.SimpleNamespace(image_token_index=49152)

    m = LlavaHfVisionModel()
    _use_own_image_token(m)
    assert m.image_token_id == 49152

    class InternVLVisionModel:                   # other families keep LMDeploy's own choice
        image_token_id = 7
        hf_config = types.SimpleNamespace(image_token_index=99)

    other = InternVLVisionModel()
    _use_own_image_token(other)
    assert other.image_token_id == 7
