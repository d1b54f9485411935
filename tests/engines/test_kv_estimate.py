"""The KV-cache room estimate that guards TurboMind loads (engines/lmdeploy.py), against the counts
TurboMind itself reported on an H100 (2026-11-25, Llama-2-7B shape, bench/results)."""
from __future__ import annotations

import pytest

from bench.models import llama_config
from engines.lmdeploy import kv_bytes_per_token, kv_tokens_estimate, min_cache_ratio

GIB = 2**30
FREE = int((79.19 - 0.73) * GIB)      # an idle H100 80GB: total less what the driver holds
WEIGHTS_FP16 = int(12.816 * GIB)      # the 7B shape's checkpoint (49k vocabulary)


@pytest.fixture(scope="module")
def cfg7b():
    return llama_config("llama2-7b").to_dict()


def test_bytes_per_token_follow_the_kv_precision(cfg7b):
    assert kv_bytes_per_token(cfg7b) == 32 * 2 * 32 * 128 * 2      # 512 KiB: layers, K+V, heads, dim, fp16
    assert kv_bytes_per_token(cfg7b, 8) == kv_bytes_per_token(cfg7b) / 2
    assert kv_bytes_per_token(cfg7b, 4) == kv_bytes_per_token(cfg7b) / 4


@pytest.mark.parametrize("ratio, measured", [(0.05, 6720), (0.5, 66944)])
def test_estimate_is_close_to_what_turbomind_held(cfg7b, ratio, measured):
    est = kv_tokens_estimate(cfg7b, ratio=ratio, free_bytes=FREE, weights=WEIGHTS_FP16)
    assert abs(est - measured) / measured < 0.05, (est, measured)


def test_the_tutorials_001_is_less_than_a_session_for_a_7b(cfg7b, tmp_path):
    # the weights' size is read from the folder: fake a checkpoint of the 7B's size (sparse file)
    with open(tmp_path / "model.safetensors", "wb") as f:
        f.truncate(WEIGHTS_FP16)
    cfg = dict(cfg7b, torch_dtype="float16")
    need = min_cache_ratio(str(tmp_path), cfg, 4096, 0, 1, FREE)
    assert 0.01 < need < 0.05            # 0.01 hung on the H100; 0.05 loaded and served
    assert min_cache_ratio(str(tmp_path), cfg, 4096, 4, 1, FREE) == pytest.approx(need / 4, rel=1e-3)
    assert min_cache_ratio(str(tmp_path), cfg, 4096, 0, 2, FREE) < need / 1.5, "tp splits weights and cache"


def test_a_long_context_default_session_is_not_held_against_the_cache(tmp_path):
    """A 128k-context model's default session is the whole context; the guard asks only for 4096."""
    cfg = llama_config("llama2-7b", max_pos=131072).to_dict()
    with open(tmp_path / "model.safetensors", "wb") as f:
        f.truncate(WEIGHTS_FP16)
    need = min_cache_ratio(str(tmp_path), cfg, None, 0, 1, FREE)
    assert need == pytest.approx(min_cache_ratio(str(tmp_path), cfg, 4096, 0, 1, FREE))
    assert need < 0.05


def test_weights_larger_than_the_free_memory_are_refused_with_the_figures(cfg7b, tmp_path, monkeypatch):
    """Before LMDeploy allocates anything: the 7B's 12.6 GiB against 8 GiB free is refused, and the
    message gives both figures; with 80 GiB free it passes."""
    import torch

    from engines.base import ModelLoadError
    from engines.lmdeploy import LMDeployEngine

    with open(tmp_path / "model.safetensors", "wb") as f:
        f.truncate(WEIGHTS_FP16)
    cfg = dict(cfg7b, torch_dtype="float16")
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a: (8 * 2**30, 80 * 2**30))
    with pytest.raises(ModelLoadError, match=r"weights take 12\.\d\d GiB per GPU and 8\.00 GiB is free"):
        LMDeployEngine._check_weights_fit(str(tmp_path), cfg, 1)
    LMDeployEngine._check_weights_fit(str(tmp_path), cfg, 2)     # tp 2: 6.3 GiB a GPU fits
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a: (80 * 2**30, 80 * 2**30))
    LMDeployEngine._check_weights_fit(str(tmp_path), cfg, 1)
