# Session 8 (2026-12-02), call X (carry .gpukit/engine, .gpukit/setup.sh, .gpukit/cublas_shim.c):
# issue #17: the 7B shape (32k vocabulary) in bf16 and the app's FP8 job's result of it; which FP8 GEMM
# LMDeploy's PyTorch engine picks here; the Quantize card's figures again (PyTorch engine only: its
# batch-16 figure now measured after a warm-up at that batch size)
source bench/gpu_calls/common.sh
Q=/tmp/turbostudio-quant-bench
step build7b 150 python3 -c "
from bench.models import build_llama
from engines.quantize import JobRunner
src = build_llama('$Q/llama2-7b-32k-bf16', 'llama2-7b-32k', device='cuda', dtype='bfloat16')
r = JobRunner('$Q'); j = r.wait(r.submit('fp8', src, '$Q/models/llama2-7b-32k-fp8', {}).id, 600)
print(j.state, j.error); r.close()"
tail -2 $OUT/build7b.log
step fp8gemm 60 python3 -c "
import torch, triton; print('triton', triton.__version__, 'capability', torch.cuda.get_device_capability())
from lmdeploy.pytorch.backends.cuda import blockedf8_modules as m
print('deep_gemm', m._has_deep_gemm(), 'gluon', m._has_gluon())"
cat $OUT/fp8gemm.log | tail -3
step card_pt 330 python3 -m bench.bench_quantize --fp8 --shape llama2-7b-32k --engines pytorch --json $OUT/card-pt.json
tail -14 $OUT/card_pt.log
cat $OUT/steps.txt
