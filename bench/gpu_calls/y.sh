# Session 8 (2026-12-02), call Y (carry .gpukit/ui, .gpukit/setup.sh, .gpukit/cublas_shim.c right after X):
# issue #17's target through the app: each format's app loaded at once, /chat 1 and 16 users, medians of
# alternating rounds (bench_formats); the PyTorch engine's FP8 both with LMDeploy's automatic GEMM choice
# and with its Triton kernel
source bench/gpu_calls/common.sh
Q=/tmp/turbostudio-quant-bench
step formats 540 python3 -m bench.bench_formats --users 1,16 --rounds 5 --new-tokens 256 --cache 0.1 \
  --app bf16-pt=pytorch:hf:$Q/llama2-7b-32k-bf16 \
  --app fp8-pt=pytorch:fp8:$Q/models/llama2-7b-32k-fp8 \
  --app fp8-pt-triton=pytorch:fp8:$Q/models/llama2-7b-32k-fp8:LMDEPLOY_BLOCKED_FP8_GEMM_BACKEND=triton \
  --app bf16-tm=turbomind:hf:$Q/llama2-7b-32k-bf16 \
  --app fp8-tm=turbomind:fp8:$Q/models/llama2-7b-32k-fp8 \
  --json $OUT/formats.json
tail -40 $OUT/formats.log
for f in /tmp/bench-formats-*.log; do echo "== $f"; grep -i "error\|Traceback" $f | head -3; done
cat $OUT/steps.txt
