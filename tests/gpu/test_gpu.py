"""GPU-only checks (marker ``gpu``): TurboMind agrees with Transformers, switching frees memory."""
from __future__ import annotations

import pytest

from engines.base import ChatMessage, ChatRequest, GenParams

from tests.conftest import ROOT

pytestmark = [pytest.mark.gpu, pytest.mark.slow]
PROMPTS = [[ChatMessage("user", "Tell me about the history of the printing press.")],
           [ChatMessage("user", "List ten animals that live in the ocean.")]]


def create(resolved, backend: str, **opts):
    """A backend as the manager builds it: its typed config, the pre-check, then the engine."""
    from engines import configs, registry

    # in this process (engine_process off): these tests read the engine's own objects (its pipeline,
    # its model) beside the contract; the engine core is tested in tests/engines/test_core.py and
    # through the app in tests/gpu/test_gpu_app.py, where it is the default
    config = configs.config_for(backend, {"engine_process": "off", **opts})[0]
    registry.precheck(resolved, config)
    return registry.create(resolved, config)


def test_turbomind_and_transformers_agree_on_32_greedy_tokens(tiny_llama):
    """Same weights, same prompt: the first 32 greedy tokens agree. Where they part, the two
    candidates must be a near tie in the reference's logits (bf16 kernels differ in rounding),
    as vLLM's check_logprobs_close allows."""
    import torch

    tm = create(tiny_llama, "turbomind", cache_max_entry_count=0.2, session_len=4096)
    hf = create(tiny_llama, "transformers", device="cuda", dtype="bfloat16")
    try:
        from lmdeploy import GenerationConfig

        for messages in PROMPTS:
            msgs = [{"role": m.role, "content": m.content} for m in messages]
            out = tm.pipe.infer(msgs, gen_config=GenerationConfig(max_new_tokens=32, do_sample=False, top_k=1))
            tm_ids = list(out.token_ids)[:32]
            ids = hf._encode(messages)["input_ids"].cuda()
            with torch.inference_mode():
                ref = hf.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=32,
                                        do_sample=False, top_k=None, top_p=None, temperature=None)
            hf_ids = ref[0, ids.shape[1]:].tolist()
            assert len(tm_ids) == 32
            if tm_ids == hf_ids:
                continue
            i = next(k for k, (a, b) in enumerate(zip(tm_ids, hf_ids)) if a != b)
            prefix = torch.tensor([ids[0].tolist() + hf_ids[:i]], device="cuda")
            with torch.inference_mode():
                logits = hf.model(prefix).logits[0, -1].float()
            gap = (logits[hf_ids[i]] - logits[tm_ids[i]]).item()
            scale = logits.abs().max().item()
            print(f"diverged at token {i}: logit gap {gap:.4f} of {scale:.2f}")
            assert gap <= 0.02 * scale, f"TurboMind and Transformers part at token {i} without a near tie"
    finally:
        tm.close()
        hf.close()


def test_switching_models_returns_gpu_memory(tiny_llama, tmp_path):
    from bench.models import build_llama
    from engines import telemetry
    from engines.manager import EngineManager

    other = build_llama(str(tmp_path / "smol-shape"), "smollm2-135m", device="cuda", dtype="bfloat16")
    mgr = EngineManager(str(tmp_path / "cache"), {"cache_max_entry_count": 0.3, "session_len": 4096})
    base = telemetry.snapshot()["gpu_used"]
    mgr.load(tiny_llama.path, "turbomind")
    loaded = telemetry.snapshot()["gpu_used"]
    mgr.load(other, "turbomind")
    sw = mgr.last_switch
    assert sw["gpu_used_after_unload"] - base < 2**30, sw
    mgr.load(tiny_llama.path, "transformers", device="cuda")
    mgr.unload()
    after = telemetry.snapshot()["gpu_used"]
    print(f"GPU used: base {base/2**30:.2f} GiB, loaded {loaded/2**30:.2f}, after unload {after/2**30:.2f}")
    assert loaded - base > 2**30, "TurboMind should have taken its KV cache"
    assert after - base < 2**30, "switching and unloading must give the memory back (within 1 GiB)"


def test_auto_picks_turbomind_and_says_why(tiny_llama):
    from engines import registry

    backend, reason = registry.choose(tiny_llama, "auto")
    assert backend == "turbomind" and "TurboMind" in reason


def _first_divergence_is_near_tie(model, prefix_ids, ref_ids, other_ids, extra=None, tol=0.02):
    """True when ``other_ids`` equals ``ref_ids`` or parts from it only where the reference model's
    two candidates are a near tie (vLLM's check_logprobs_close idea)."""
    import torch

    if other_ids == ref_ids:
        return True
    i = next((k for k, (a, b) in enumerate(zip(other_ids, ref_ids)) if a != b), None)
    if i is None:
        return True
    ids = torch.tensor([prefix_ids + ref_ids[:i]], device="cuda")
    with torch.inference_mode():
        logits = model(input_ids=ids, **(extra or {})).logits[0, -1].float()
    gap = (logits[ref_ids[i]] - logits[other_ids[i]]).item()
    print(f"diverged at token {i}: logit gap {gap:.4f} of {logits.abs().max().item():.2f}")
    return gap <= tol * logits.abs().max().item()


def test_tiny_llava_on_lmdeploy_and_transformers_agree_on_16_greedy_tokens(tmp_path):
    """The same tiny LLaVA (random weights) on LMDeploy's vision pipeline and on Transformers-CUDA."""
    import torch

    from bench.models import build_tiny_llava
    from engines import models, registry

    # a small LLaVA of real proportions: SmolLM2-135M's text shape, a 4-layer ViT-B/16 at 224 px
    # (the 2-layer, 128-wide tower of the CPU tests trips a size check inside LMDeploy's engine)
    path = build_tiny_llava(str(tmp_path / "small-llava"), device="cuda", dtype="bfloat16", image_size=224,
                            patch=16, text_shape="smollm2-135m", vision=(768, 3072, 4, 12))
    resolved = models.resolve(path, str(tmp_path / "c"))
    backend, reason = registry.choose(resolved, "auto")
    assert backend == "pytorch", f"LLaVA runs on LMDeploy's PyTorch engine, not {backend} ({reason})"
    from engines.base import ChatMessage as CM
    from PIL import Image

    img = Image.new("RGB", (224, 224), (200, 40, 40))
    messages = [CM("user", "What colour is this image?", (img,))]
    lm = create(resolved, "pytorch", cache_max_entry_count=0.2, session_len=4096)
    try:
        from lmdeploy import GenerationConfig

        out = lm.pipe.infer(lm._messages(messages), gen_config=GenerationConfig(max_new_tokens=16, do_sample=False,
                                                                                top_k=1))
        assert out.finish_reason in ("stop", "length"), out.error_message
        lm_ids = list(out.token_ids)[:16]
        streamed = "".join(d.text for d in lm.stream(ChatRequest(tuple(messages),
                                                                 GenParams(temperature=0, max_new_tokens=16))))
        assert streamed == out.text
    finally:
        lm.close()
    hf = create(resolved, "transformers", device="cuda", dtype="bfloat16")
    try:
        enc = {k: v.cuda() for k, v in hf._encode(messages).items()}
        enc["pixel_values"] = enc["pixel_values"].to(torch.bfloat16)
        with torch.inference_mode():
            ref = hf.model.generate(**enc, max_new_tokens=16, do_sample=False, top_k=None, top_p=None,
                                    temperature=None)
        hf_ids = ref[0, enc["input_ids"].shape[1]:].tolist()
        assert len(lm_ids) == 16
        prompt = enc["input_ids"][0].tolist()
        assert _first_divergence_is_near_tie(hf.model, prompt, hf_ids, lm_ids,
                                             extra={"pixel_values": enc["pixel_values"]}), (lm_ids, hf_ids)
    finally:
        hf.close()


def _nvidia_smi() -> list[tuple[int, int]]:
    import subprocess

    out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used,memory.total", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True, check=True).stdout
    return [tuple(int(x) * 2**20 for x in line.split(",")) for line in out.strip().splitlines()]


def test_panel_memory_matches_nvidia_smi_and_follows_the_cache_setting(tiny_llama):
    """The Monitor panel's figures (telemetry.gpu_status, NVML) agree with nvidia-smi within 2%, and
    the tutorial's experiment holds: raising cache_max_entry_count takes that share of free memory."""
    from engines import telemetry

    def check(label):
        gpus, _ = telemetry.gpu_status()
        smi = _nvidia_smi()
        for g, (used, total) in zip(gpus, smi):
            print(f"{label}: GPU {g['index']} NVML {g['used'] / 2**30:.2f} GiB, nvidia-smi {used / 2**30:.2f} GiB")
            assert abs(g["used"] - used) <= 0.02 * max(used, 2**30)
            assert abs(g["total"] - total) <= 0.02 * total
        return gpus[0]["used"], gpus[0]["total"]

    base, total = check("idle")
    used = {}
    for ratio in (0.1, 0.5):
        free = total - telemetry.gpu_status()[0][0]["used"]
        eng = create(tiny_llama, "turbomind", cache_max_entry_count=ratio, session_len=4096)
        try:
            used[ratio] = check(f"cache {ratio}")[0] - base
            print(f"cache_max_entry_count {ratio}: the load took {used[ratio] / 2**30:.2f} GiB "
                  f"({used[ratio] / free:.2f} of the free memory)")
        finally:
            eng.close()
    grew = used[0.5] - used[0.1]
    assert 0.3 * free < grew < 0.5 * free, "0.5 against 0.1 of free memory should add about 0.4 of it"


_OOM_CHILD = r"""
import sys, torch
sys.path.insert(0, sys.argv[2])
from engines import models
from engines.base import GenParams, ChatMessage, ChatRequest
from engines.configs import LMDeployConfig
from engines.lmdeploy import LMDeployEngine
resolved = models.resolve(sys.argv[1], "/tmp/tscache-oom")
free = torch.cuda.mem_get_info()[0]
hog = torch.empty(free - int(2.0 * 2**30), dtype=torch.uint8, device="cuda")
try:
    LMDeployEngine(resolved, LMDeployConfig(backend="turbomind", cache_max_entry_count=0.5, session_len=2048))
    print("LOADED", flush=True)
except Exception as e:
    print("REFUSED", type(e).__name__, str(e)[:300], flush=True)
del hog
torch.cuda.empty_cache()
eng = LMDeployEngine(resolved, LMDeployConfig(backend="turbomind", cache_max_entry_count=0.2, session_len=2048))
text = "".join(d.text for d in eng.stream(ChatRequest((ChatMessage("user", "Hi"),), GenParams(temperature=0, max_new_tokens=8))))
print("SERVED", repr(text[:40]), flush=True)
eng.close()
"""


def test_a_load_that_cannot_fit_is_refused_before_turbomind_and_the_process_goes_on(tmp_path):
    """Issue #7: a 1.8B model (3.7 GiB of weights) with 2 GiB free is refused in Python with the
    figures, and the same process loads it once memory is back. TurboMind itself cannot be left to run
    out of memory: seen on the H100 (2026-11-25, LMDeploy 0.18), it aborts the whole process
    (``[TM][FATAL] allocator.cc:49 CUDA error: out of memory``, SIGABRT) half way through the weights,
    which is why ``LMDeployEngine._check_weights_fit`` runs first. A child process, so that an abort
    fails this test instead of ending the run."""
    import subprocess
    import sys

    from bench.models import build_llama

    big = build_llama("/tmp/turbostudio-bench-1.8b", "1.8b", device="cuda", dtype="bfloat16")
    p = subprocess.run([sys.executable, "-c", _OOM_CHILD, big, ROOT],
                       capture_output=True, text=True, timeout=600)
    print(p.stdout, p.stderr[-3000:])
    assert p.returncode == 0, f"the process died (code {p.returncode})"
    assert "REFUSED ModelLoadError Not enough GPU memory" in p.stdout and "SERVED" in p.stdout


@pytest.mark.parametrize("backend", ["turbomind", "pytorch"])
def test_the_push_path_streams_the_same_text_and_aborts_at_once(tiny_llama, backend):
    """LMDeploy's real engines on the adapter's two paths: ``start`` (pushed from LMDeploy's loop,
    what the engine process uses) gives the same greedy Deltas as ``stream``; an abort mid-stream
    ends it at once with "abort", nothing after, then the end; a burst of 16 all
    finish (batched kernels may round differently: the text is not compared); nothing is left held."""
    import queue
    import time

    eng = create(tiny_llama, backend, cache_max_entry_count=0.1, session_len=2048)

    def pushed(req):
        q = queue.SimpleQueue()
        eng.start(req, q.put)
        out = []
        while (d := q.get(timeout=60)) is not None:
            out.append(d)
        return out

    try:
        req = lambda n=48: ChatRequest(tuple(PROMPTS[0]), GenParams(temperature=0, max_new_tokens=n))  # noqa: E731
        pulled = list(eng.stream(req()))
        pushed_ = pushed(req())
        assert "".join(d.text for d in pulled) == "".join(d.text for d in pushed_)
        assert pulled[-1].tokens == pushed_[-1].tokens and pulled[-1].finish_reason == pushed_[-1].finish_reason
        # abort mid-stream
        r = req(2000)
        q = queue.SimpleQueue()
        eng.start(r, q.put)
        got = [q.get(timeout=60) for _ in range(3)]
        t0 = time.perf_counter()
        eng.abort(r.request_id)
        while (d := q.get(timeout=10)) is not None:
            got.append(d)
        assert got[-1].finish_reason == "abort" and time.perf_counter() - t0 < 2
        assert all(d.finish_reason is None for d in got[:-1])
        # a burst
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(16) as pool:
            ends = list(pool.map(lambda _: pushed(req())[-1], range(16)))
        assert [(d.finish_reason, d.tokens) for d in ends] == [(pulled[-1].finish_reason, pulled[-1].tokens)] * 16
        deadline = time.time() + 10
        while eng.live_requests() and time.time() < deadline:
            time.sleep(0.05)
        assert eng.live_requests() == 0
    finally:
        eng.close()


@pytest.mark.parametrize("backend", ["turbomind", "pytorch"])
def test_text_made_in_the_web_process_is_lmdeploys_own(tiny_llama, backend):
    """``TURBOSTUDIO_CORE_DETOKENIZE=1`` on LMDeploy's real engines: the engine process sends token
    ids and this process runs LMDeploy's own detokenizer over them. A random-weight model's greedy
    text (arbitrary tokens: byte pieces, special tokens, broken UTF-8) is the same as LMDeploy makes
    in its own process, for one stream and for 8 at once; the counts and finish reason too; an
    abort still ends a stream at once."""
    import time
    from concurrent.futures import ThreadPoolExecutor

    req = lambda n=96: ChatRequest(tuple(PROMPTS[0]), GenParams(temperature=0, max_new_tokens=n))  # noqa: E731
    ref = create(tiny_llama, backend, cache_max_entry_count=0.1, session_len=2048)
    try:
        want = list(ref.stream(req()))
    finally:
        ref.close()
    eng = create(tiny_llama, backend, cache_max_entry_count=0.1, session_len=2048, engine_process="on",
                 core_detokenize=True)
    try:
        assert eng.info.extra["detokenize"] == "web process"
        got = list(eng.stream(req()))
        assert "".join(d.text for d in got) == "".join(d.text for d in want)
        assert (got[-1].tokens, got[-1].finish_reason) == (want[-1].tokens, want[-1].finish_reason)
        assert "".join(d.text for d in want).strip(), "the reference made no text: nothing compared"
        with ThreadPoolExecutor(8) as pool:
            texts = list(pool.map(lambda _: "".join(d.text for d in eng.stream(req())), range(8)))
        assert all(texts)          # (batched kernels may round apart: not compared with the reference)
        st = eng.stream(req(2000))
        next(st)
        t0 = time.perf_counter()
        eng.abort(st.rid)
        assert [d.finish_reason for d in st][-1] == "abort" and time.perf_counter() - t0 < 2
    finally:
        eng.close()
