# Session 8 (2026-12-02), call AA on a fresh machine (carry .gpukit/engine, .gpukit/setup.sh,
# .gpukit/cublas_shim.c): the 7B shape (32k vocabulary) in bf16 and the app's AWQ W4A16 job's result of
# it (8 x 256 calibration tokens: speed does not depend on the calibration), for AB
source bench/gpu_calls/common.sh
Q=/tmp/turbostudio-quant-bench
step build7b_awq 300 python3 -c "
from bench.models import build_llama
from engines.quantize import JobRunner
src = build_llama('$Q/llama2-7b-32k-bf16', 'llama2-7b-32k', device='cuda', dtype='bfloat16')
r = JobRunner('$Q'); j = r.wait(r.submit('awq', src, '$Q/models/llama2-7b-32k-w4a16', {'samples': 8, 'seqlen': 256}).id, 290)
print(j.state, j.error); print(r.read_log(j.id)[-600:]); r.close()"
tail -4 $OUT/build7b_awq.log
cat $OUT/steps.txt
