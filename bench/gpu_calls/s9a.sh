# Session 9 (2026-12-02), call S9A on a fresh machine (carry .gpukit/engine, .gpukit/setup.sh,
# .gpukit/cublas_shim.c): the 1.8B shape, and TurboMind and the PyTorch engine in the engine core
# (engines/core.py) against in-process: the same greedy text
source bench/gpu_calls/common.sh
step build18 150 "${BUILD18[@]}"
step core_smoke 200 python3 -c "
import os, time
from engines.manager import EngineManager
from engines.base import ChatRequest, ChatMessage, GenParams
for backend in ('turbomind', 'pytorch'):
    out = {}
    for mode in ('on', 'off'):
        with EngineManager('/tmp/tscache', {'engine_process': mode, 'cache_max_entry_count': 0.2, 'session_len': 4096}) as m:
            t = time.time(); info = m.load('$M18', backend); load = time.time() - t
            r = ChatRequest((ChatMessage('user', 'Tell me a story about a cat.'),), GenParams(temperature=0, max_new_tokens=64))
            t = time.time(); text, last = m.submit(r).text(); dt = time.time() - t
            out[mode] = (text, last.tokens)
            print(backend, mode, 'pid', info.extra.get('engine_process'), 'load %.1f s' % load, 'reply %.3f s' % dt, last.tokens, 'tokens', m.token_cost(list(r.messages)), m.scheduler(), flush=True)
    print(backend, 'same text:', out['on'] == out['off'], flush=True)
"
cat $OUT/core_smoke.log | grep -v -i "warn" | tail -8
cat $OUT/steps.txt
