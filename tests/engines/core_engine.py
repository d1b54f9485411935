"""A small engine for the engine-core tests (``tests/engines/test_core.py``), built in the child
process by ``CoreEngine("tests.engines.core_engine:ScriptedEngine", ...)``.

It keeps the engine contract with real threads and timing, and lets a test ask for the cases the
process boundary must carry: a refusal with its parameter, an error in the middle of a stream, a
stream that runs until aborted, a process that dies mid-stream. The prompt (the last message's
text) says what to do: ``"count N"`` streams words 1..N; ``"forever"`` one word every 10 ms until
aborted; ``"fail after N"`` raises after N words; ``"refuse"`` raises InvalidRequest in ``stream()``;
``"die after N"`` ends the process after N words."""
from __future__ import annotations

import os
import threading
import time

from engines.base import Capabilities, Delta, EngineInfo, InvalidRequest, ModelLoadError, SchedulerView


class ScriptedEngine:
    def __init__(self, fail_load: bool = False):
        if fail_load:
            raise ModelLoadError("the test asked this load to fail", code="test_code")
        self.info = EngineInfo(backend="scripted", model="scripted", context_length=4096, max_batch=8,
                               capabilities=Capabilities(seed=False))
        self._aborted: set[str] = set()
        self._live: set[str] = set()
        self._lock = threading.Lock()

    def count_tokens(self, messages) -> int:
        return sum(len(m.content.split()) for m in messages) + 3 * len(messages)

    def message_tokens(self, messages) -> list[int]:
        return [len(m.content.split()) for m in messages]

    def perplexity(self, text: str, max_tokens: int = 4096) -> dict:
        import gc

        return {"perplexity": 1.5, "tokens": min(max_tokens, len(text.split())), "pid": os.getpid(),
                "frozen": gc.get_freeze_count()}       # the engine process's heap (engines/heap.py)

    def stream(self, request):
        prompt = request.messages[-1].content
        if prompt == "refuse":
            raise InvalidRequest("the test refuses this", param="temperature", code="test_refusal")
        with self._lock:
            self._live.add(request.request_id)
        return self._gen(request.request_id, prompt)

    def _gen(self, rid: str, prompt: str):
        words = prompt.split()
        try:
            n = int(words[-1]) if words[-1].isdigit() else 10 ** 6
            for i in range(1, n + 1):
                if rid in self._aborted:
                    yield Delta("", i - 1, "abort")
                    return
                if words[0] == "fail" and i > n - 1:
                    raise RuntimeError("the engine failed on purpose")
                if words[0] == "die" and i > n - 1:
                    os._exit(3)
                if words[0] == "forever":
                    time.sleep(0.01)
                yield Delta(f" w{i}", i, "length" if i == n else None, prompt_tokens=len(words) if i == 1 else None)
        finally:
            with self._lock:
                self._live.discard(rid)
                self._aborted.discard(rid)

    def abort(self, request_id: str) -> None:
        with self._lock:
            if request_id in self._live:
                self._aborted.add(request_id)

    def health(self):
        return None

    def scheduler(self):
        with self._lock:
            return SchedulerView(active=len(self._live), waiting=0)

    def live_requests(self) -> int:
        with self._lock:
            return len(self._live)

    def close(self) -> None:
        pass


class PushingEngine(ScriptedEngine):
    """The same scripts on the push path (``start(request, sink)``, as the LMDeploy adapter has it):
    one loop thread of the engine's own runs every stream a step at a time and hands each Delta to
    its stream's sink there, then ``None`` at its end. A failure mid-stream becomes an error Delta
    (as LMDeploy's failures do: the sink has no exceptions); ``abort`` hands the closing "abort"
    over from the caller's thread at once, and nothing of that stream follows it."""

    def __init__(self, fail_load: bool = False):
        super().__init__(fail_load)
        self._jobs: dict[str, list] = {}         # rid -> [generator, sink, closed]
        self._wake = threading.Condition(self._lock)
        threading.Thread(target=self._loop, daemon=True, name="pushing-engine-loop").start()

    def start(self, request, sink) -> None:
        it = self.stream(request)                # refusals raise here, before any Delta
        with self._lock:
            self._jobs[request.request_id] = [it, sink, False]
            self._wake.notify()

    def abort(self, request_id: str) -> None:
        super().abort(request_id)
        with self._lock:
            job = self._jobs.get(request_id)
            if job is None or job[2]:
                return
            job[2] = True
        job[1](Delta("", 0, "abort"))

    def _loop(self):
        while True:
            with self._lock:
                while not self._jobs:
                    self._wake.wait()
                jobs = list(self._jobs.items())
            for rid, job in jobs:
                it, sink, _ = job
                try:
                    d = next(it)
                except StopIteration:
                    d = None
                except Exception as e:  # noqa: BLE001 - the push path's failures are error Deltas
                    d = Delta("", 0, "error", str(e))
                with self._lock:
                    closed = job[2]
                    if d is not None and d.finish_reason:
                        job[2] = True
                if d is not None and not closed:
                    sink(d)
                if d is None or d.finish_reason:
                    with self._lock:
                        self._jobs.pop(rid, None)
                    it.close()                   # its finally takes the lock: not under it
                    sink(None)


class WordText:
    """The other side of ``IdsEngine``: id ``i`` is the text ``" w{i}"``; a stream starts from the
    prompt's ids (as LMDeploy's detokenizer does) and each call turns new ids into their text. A
    prompt id 0 in first place marks "the prompt came through" in the text."""

    def __init__(self, fail: bool = False):
        if fail:
            raise RuntimeError("the test asked the text side to fail")

    def stream(self, prompt_ids):
        seen = [tuple(prompt_ids)]

        def feed(new) -> str:
            return "".join(f" w{i}" for i in new)
        feed.prompt = seen
        return feed


class IdsEngine(PushingEngine):
    """PushingEngine whose ``detokenize_elsewhere`` is honoured: once called, every Delta carries
    the ids of its words (``" w{i}"`` is id ``i``) and no text, the first one also the prompt's ids."""

    def __init__(self, fail_load: bool = False, fail_text: bool = False):
        super().__init__(fail_load)
        self.fail_text = fail_text
        self.ids_out = False

    def detokenize_elsewhere(self):
        self.ids_out = True
        return ("tests.engines.core_engine:WordText", (self.fail_text,))

    def _gen(self, rid, prompt):
        first = True
        for d in super()._gen(rid, prompt):
            if self.ids_out and d.text:
                ids = tuple(int(w[1:]) for w in d.text.split())
                d = Delta("", d.tokens, d.finish_reason, d.error, d.prompt_tokens, ids=ids,
                          prompt_ids=(0, len(prompt.split())) if first else None)
                first = False
            yield d
