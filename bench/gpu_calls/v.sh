# Session 7 (2026-12-02), call V (carry .gpukit/engine, .gpukit/setup.sh, .gpukit/cublas_shim.c):
# issue #17 through the app: the 7B shape (32k vocabulary) in bf16 and the app's FP8 job's result of it
source bench/gpu_calls/common.sh
Q=/tmp/turbostudio-quant-bench
step build7b 150 python3 -c "
from bench.models import build_llama
from engines.quantize import JobRunner
src = build_llama('$Q/llama2-7b-32k-bf16', 'llama2-7b-32k', device='cuda', dtype='bfloat16')
r = JobRunner('$Q'); j = r.wait(r.submit('fp8', src, '$Q/models/llama2-7b-32k-fp8', {}).id, 600)
print(j.state, j.error); r.close()"
tail -3 $OUT/build7b.log; cat $OUT/steps.txt
