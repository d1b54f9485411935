"""The engine contract, run over every backend this machine has.

On CPU: Transformers with the real SmolLM2 and with a tiny random-weight Llama. On a GPU (marker
``gpu``): TurboMind, LMDeploy's PyTorch engine and Transformers-CUDA on the tiny Llama.
"""
from __future__ import annotations

import gc
import threading
import time
import weakref

import pytest

from engines.base import Capabilities, ChatMessage, ChatRequest, ContextTooLong, GenParams, SchedulerView

pytestmark = pytest.mark.slow          # every test loads a model and generates
gpu = pytest.mark.gpu
BACKENDS = [
    pytest.param(("transformers", "smollm2", "cpu"), id="transformers-smollm2"),
    pytest.param(("transformers", "tiny", "cpu"), id="transformers-tiny"),
    pytest.param(("transformers", "tiny", "cuda"), id="transformers-cuda-tiny", marks=gpu),
    pytest.param(("turbomind", "tiny", "cuda"), id="turbomind-tiny", marks=gpu),
    pytest.param(("pytorch", "tiny", "cuda"), id="pytorch-tiny", marks=gpu),
]
PROMPT = [ChatMessage("user", "Write a long poem about the sea and the stars, with many verses.")]


def req(messages, params: GenParams) -> ChatRequest:
    """A request as an entry point builds it (a fresh request id each)."""
    return ChatRequest(tuple(messages), params, source="test")


def create(resolved, backend: str, **opts):
    """The backend for ``opts`` as the manager builds it: a typed config, the pre-check, create."""
    from engines import configs, registry

    # in this process (engine_process off): these tests read the engine's own objects (its pipeline,
    # its model) beside the contract; the engine core is tested in tests/engines/test_core.py and
    # through the app in tests/gpu/test_gpu_app.py, where it is the default
    config = configs.config_for(backend, {"engine_process": "off", **opts})[0]
    registry.precheck(resolved, config)
    return registry.create(resolved, config)


def _opts(backend, device):
    return {"device": device} if backend == "transformers" else {"cache_max_entry_count": 0.2, "session_len": 4096}


@pytest.fixture(scope="module", params=BACKENDS)
def engine(request):
    backend, model, device = request.param
    resolved = request.getfixturevalue("smollm2" if model == "smollm2" else "tiny_llama")
    eng = create(resolved, backend, **_opts(backend, device))
    yield eng
    eng.close()


def collect(it):
    text, deltas = "", []
    for d in it:
        text += d.text
        deltas.append(d)
    return text, deltas


def reference_greedy(engine, messages, n: int) -> str:
    """The same model's greedy answer through a path that does not stream."""
    if engine.info.backend == "transformers":
        import torch

        ids = engine._encode(messages)["input_ids"].to(engine.device)
        with torch.inference_mode():
            out = engine.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                                        do_sample=False, top_k=None, top_p=None, temperature=None)
        return engine.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    from lmdeploy import GenerationConfig

    msgs = [{"role": m.role, "content": m.content} for m in messages]
    return engine.pipe.infer(msgs, gen_config=GenerationConfig(max_new_tokens=n, do_sample=False,
                                                               top_k=1)).text


def test_info_describes_what_runs(engine):
    info = engine.info
    assert info.backend in ("transformers", "turbomind", "pytorch")
    assert info.context_length >= 1024
    assert info.vision is False
    assert info.device.startswith(("cpu", "cuda"))
    caps = info.capabilities
    assert isinstance(caps, Capabilities) and caps.vision is False and caps.seed
    # Transformers applies presence/frequency penalties itself; LMDeploy 0.18 has none to pass them to
    assert caps.penalties is (info.backend == "transformers")
    assert info.defaults is None or isinstance(info.defaults, GenParams)


def test_health_scheduler_and_live_requests(engine):
    assert engine.health() is None
    view = engine.scheduler()
    assert view is None or isinstance(view, SchedulerView)
    collect(engine.stream(req(PROMPT, GenParams(temperature=0, max_new_tokens=3))))
    deadline = time.time() + 2
    while engine.live_requests() and time.time() < deadline:
        time.sleep(0.01)
    assert engine.live_requests() == 0, "a finished request is still held by the engine"


def test_message_tokens_are_each_messages_own_text(engine):
    msgs = [ChatMessage("system", "You are brief."), ChatMessage("user", "Name three colours, please."),
            ChatMessage("assistant", "Red, green and blue.")]
    counts = engine.message_tokens(msgs)
    assert len(counts) == 3 and all(c > 0 for c in counts)
    assert sum(counts) < engine.count_tokens(msgs), "the template's own tokens are not in a message's count"
    assert engine.message_tokens(msgs[1:2]) == counts[1:2]


def test_streamed_text_equals_non_streamed_greedy(engine):
    text, deltas = collect(engine.stream(req(PROMPT, GenParams(temperature=0, max_new_tokens=24))))
    assert len(deltas) > 1, "a reply must arrive in several deltas"
    assert deltas[-1].finish_reason in ("stop", "length")
    assert all(d.finish_reason is None for d in deltas[:-1])
    assert text == reference_greedy(engine, PROMPT, 24)


def test_max_new_tokens_is_exact(engine):
    for n in (1, 17):
        _, deltas = collect(engine.stream(req(PROMPT, GenParams(temperature=0, max_new_tokens=n))))
        assert deltas[-1].tokens == n
        assert deltas[-1].finish_reason == "length"
        counts = [d.tokens for d in deltas]
        assert counts == sorted(counts), "the running token count never goes back"


def test_seed_reproduces_and_differs(engine):
    p = GenParams(temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=32, seed=1234)
    a, _ = collect(engine.stream(req(PROMPT, p)))
    b, _ = collect(engine.stream(req(PROMPT, p)))
    c, _ = collect(engine.stream(req(PROMPT, p.replace(seed=4321))))
    assert a == b
    assert a != c


def test_abort_stops_a_stream(engine):
    r = req(PROMPT, GenParams(temperature=1.0, max_new_tokens=4000, seed=1))
    it = engine.stream(r)
    got = 0
    t0 = time.perf_counter()
    last, aborted_at = None, None
    for d in it:
        got += 1
        if got == 3:
            aborted_at = time.perf_counter()
            engine.abort(r.request_id)
        last = d
    assert last.finish_reason == "abort"
    assert last.tokens < 4000
    assert time.perf_counter() - aborted_at < 1.0, "the stream did not end within 1 s of its abort"
    assert time.perf_counter() - t0 < 60
    # the engine keeps serving
    text, deltas = collect(engine.stream(req(PROMPT, GenParams(temperature=0, max_new_tokens=4))))
    assert deltas[-1].tokens == 4


def test_closing_the_iterator_aborts(engine):
    it = engine.stream(req(PROMPT, GenParams(temperature=1.0, max_new_tokens=4000, seed=2)))
    next(it)
    it.close()
    t0 = time.perf_counter()
    _, deltas = collect(engine.stream(req(PROMPT, GenParams(temperature=0, max_new_tokens=3))))
    assert deltas[-1].tokens == 3
    assert time.perf_counter() - t0 < 30


def test_concurrent_streams_interleave_and_get_their_own_answers(engine):
    prompts = {"a": [ChatMessage("user", "Name three colours.")],
               "b": [ChatMessage("user", "Write a long story about a dragon who learns to cook.")]}
    p = GenParams(temperature=0, max_new_tokens=20)
    solo = {k: collect(engine.stream(req(v, p)))[0] for k, v in prompts.items()}
    results, first_at, done_at = {}, {}, {}

    def run(k):
        text = ""
        for d in engine.stream(req(prompts[k], p)):
            if d.text and k not in first_at:
                first_at[k] = time.perf_counter()
            text += d.text
        done_at[k] = time.perf_counter()
        results[k] = text

    threads = [threading.Thread(target=run, args=(k,)) for k in prompts]
    [t.start() for t in threads]
    [t.join(120) for t in threads]
    assert results == solo
    assert max(first_at.values()) < min(done_at.values()), "both streams must be served at once"


def test_context_overflow_is_a_clear_error(engine):
    huge = [ChatMessage("user", "word " * (engine.info.context_length + 10))]
    with pytest.raises(ContextTooLong):
        collect(engine.stream(req(huge, GenParams(max_new_tokens=4))))


def test_close_frees_memory(engine, request):
    """A second instance of the same model is closed and its memory must come back."""
    from engines import telemetry

    backend, model, device = request.node.callspec.params["engine"]
    resolved = request.getfixturevalue("smollm2" if model == "smollm2" else "tiny_llama")
    before = telemetry.snapshot()["gpu_used"]
    eng = create(resolved, backend, **_opts(backend, device))
    collect(eng.stream(req(PROMPT, GenParams(max_new_tokens=4))))
    loaded = telemetry.snapshot()["gpu_used"]
    ref = weakref.ref(eng.model) if backend == "transformers" else None
    eng.close()
    eng.close()  # idempotent
    gc.collect()
    if ref is not None:
        assert ref() is None, "the model object must be released on close"
    if device == "cuda":
        after = telemetry.snapshot()["gpu_used"]
        assert loaded > before
        assert after - before < 2**30, f"GPU memory not freed: {before} -> {loaded} -> {after}"


def test_out_of_memory_in_a_step_fails_that_batch_and_the_engine_recovers(tiny_llama):
    """CUDA out-of-memory can only really happen on a GPU; here the model's forward raises the same
    exception type once, mid-reply, and the engine must report it and keep serving."""
    import torch

    eng = create(tiny_llama, "transformers", device="cpu")
    try:
        real = eng.model.forward
        calls = {"n": 0}

        def flaky(*a, **k):
            calls["n"] += 1
            if calls["n"] == 4:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            return real(*a, **k)

        eng.model.forward = flaky
        deltas = list(eng.stream(req(PROMPT, GenParams(temperature=0, max_new_tokens=20))))
        assert deltas[-1].finish_reason == "error" and "Out of memory" in deltas[-1].error
        ok = list(eng.stream(req(PROMPT, GenParams(temperature=0, max_new_tokens=5))))
        assert ok[-1].finish_reason == "length" and ok[-1].tokens == 5
    finally:
        eng.close()


def test_after_an_out_of_memory_the_failed_steps_tensors_are_gone_when_memory_is_given_back(tiny_llama):
    """The cache release after an out-of-memory must come when nothing holds the failed step's
    tensors any more (an exception's traceback does, while it is being handled): else on a GPU the
    allocator keeps that memory, seen on the H100 as gigabytes held after a 60k-token prompt."""
    import sys
    import weakref

    import torch

    eng = create(tiny_llama, "transformers", device="cpu")
    try:
        real = eng.model.forward
        held, at_release = [], []

        def greedy_forward(*a, **k):
            big = torch.ones(1 << 20)          # what the step had allocated before it ran out
            held.append(weakref.ref(big))
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

        def release():
            at_release.append((sys.exc_info()[0], [r() is None for r in held]))

        eng.model.forward = greedy_forward
        eng._empty_cache = release
        deltas = list(eng.stream(req(PROMPT, GenParams(temperature=0, max_new_tokens=8))))
        assert deltas[-1].finish_reason == "error" and "Out of memory" in deltas[-1].error
        eng.model.forward = real
        ok = list(eng.stream(req(PROMPT, GenParams(temperature=0, max_new_tokens=4))))
        assert ok[-1].tokens == 4
        assert at_release, "the memory was never given back"
        exc_type, freed = at_release[0]
        assert exc_type is None and all(freed), at_release
    finally:
        eng.close()


SHORT = [ChatMessage("user", "Name three colours.")]
LONG = [ChatMessage("user", "Tell me about the sea. " * 60)]


def _oom_pair(tiny_llama, max_new: int):
    """A CPU engine, greedy params, and the short request's answer alone (the reference)."""

    eng = create(tiny_llama, "transformers", device="cpu")
    p = GenParams(temperature=0, max_new_tokens=max_new)
    return eng, p, "".join(d.text for d in eng.stream(req(SHORT, p)))


def _only_the_long_one_failed(outs, alone):
    assert outs["long"][-1].finish_reason == "error" and "Out of memory" in outs["long"][-1].error
    assert outs["short"][-1].finish_reason in ("stop", "length"), outs["short"][-1]
    assert "".join(d.text for d in outs["short"]) == alone


def test_out_of_memory_in_a_batch_ends_only_the_longest_request(tiny_llama):
    """Two users decode in one batch; the step runs out of memory half way through the layers
    (layer 0 has already appended its keys): the longer request ends with the out-of-memory message,
    the other one goes on and its answer is the one it gets alone (greedy)."""
    import threading

    import torch

    eng, p, alone = _oom_pair(tiny_llama, 24)
    try:
        layer = eng.model.model.layers[1]
        real = layer.forward
        seen = {"n": 0}

        def flaky(hidden_states, *a, **k):
            if hidden_states.shape[0] == 2 and hidden_states.shape[1] == 1:
                seen["n"] += 1
                if seen["n"] == 3:
                    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            return real(hidden_states, *a, **k)

        layer.forward = flaky
        outs = {}

        def run(name, msgs):
            outs[name] = list(eng.stream(req(msgs, p)))

        threads = [threading.Thread(target=run, args=a) for a in (("long", LONG), ("short", SHORT))]
        [t.start() for t in threads]
        [t.join(120) for t in threads]
        assert seen["n"] >= 3, "the two requests never shared a decode step"
        _only_the_long_one_failed(outs, alone)
    finally:
        eng.close()


def test_out_of_memory_when_a_long_request_joins_the_batch_ends_only_that_request(tiny_llama):
    """The case seen on the H100 (2026-11-25): a user decodes alone; a long request joins and
    stacking its cache into the batch runs out of memory. The newcomer ends with the out-of-memory
    message; the first user's reply goes on, the same as alone."""
    import threading
    import time

    import torch

    eng, p, alone = _oom_pair(tiny_llama, 96)
    try:
        real = eng._restack
        seen = {"n": 0}

        def flaky(old_rows, old_cache, rows):
            if len(rows) == 2 and not seen["n"]:
                seen["n"] += 1
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB")
            return real(old_rows, old_cache, rows)

        eng._restack = flaky
        outs = {"short": []}
        first = threading.Event()

        def run_short():
            for d in eng.stream(req(SHORT, p)):
                outs["short"].append(d)
                first.set()
                time.sleep(0.02)        # slow reader: still decoding when the long one arrives

        t = threading.Thread(target=run_short)
        t.start()
        assert first.wait(60)
        outs["long"] = list(eng.stream(req(LONG, p)))
        t.join(120)
        assert seen["n"] == 1, "the long request never joined the batch"
        _only_the_long_one_failed(outs, alone)
    finally:
        eng.close()


def test_a_dead_scheduler_is_reported_and_a_reload_serves_again(tiny_llama, tmp_path):
    from engines.base import EngineError
    from engines.manager import EngineManager

    mgr = EngineManager(str(tmp_path))
    mgr.load(tiny_llama.path, "transformers", device="cpu")
    eng = mgr.require()

    def die(req):
        raise SystemExit("scheduler killed")   # not an Exception: ends the thread

    eng._prefill = die
    text, last = mgr.submit(req(PROMPT, GenParams(max_new_tokens=4))).text()
    assert last.finish_reason == "error" and "engine stopped" in last.error
    eng._thread.join(5)
    assert eng.health() and "scheduler killed" in eng.health()
    assert mgr.health() == eng.health()
    assert eng.live_requests() == 0 and mgr.places_taken == 0
    with pytest.raises(EngineError, match="Reload the model"):
        mgr.submit(req(PROMPT, GenParams(max_new_tokens=4)))
    assert mgr.places_taken == 0
    mgr.load(tiny_llama.path, "transformers", device="cpu")
    text, last = mgr.submit(req(PROMPT, GenParams(temperature=0, max_new_tokens=4))).text()
    assert last.tokens == 4 and mgr.health() is None
    mgr.unload()
