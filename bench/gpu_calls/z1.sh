# Session 8 (2026-12-02), call Z1 on a fresh machine (carry .gpukit/engine, .gpukit/setup.sh,
# .gpukit/cublas_shim.c): the 7B shape and its FP8 result again (for Z2), and the GPU quantization tests
# fixed after session 7's run, not yet re-run
source bench/gpu_calls/common.sh
Q=/tmp/turbostudio-quant-bench
step build7b 150 python3 -c "
from bench.models import build_llama
from engines.quantize import JobRunner
src = build_llama('$Q/llama2-7b-32k-bf16', 'llama2-7b-32k', device='cuda', dtype='bfloat16')
r = JobRunner('$Q'); j = r.wait(r.submit('fp8', src, '$Q/models/llama2-7b-32k-fp8', {}).id, 600)
print(j.state, j.error); r.close()"
step gpu_quant 330 python3 -m pytest -q -m gpu tests/gpu/test_gpu_quant.py -p no:cacheprovider
tail -5 $OUT/gpu_quant.log
cat $OUT/steps.txt
