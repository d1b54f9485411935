# Session 8 (2026-12-02), call Z2 (carry .gpukit/ui, .gpukit/setup.sh, .gpukit/cublas_shim.c right after Z1):
# issue #17 through the app at 16 users (call Y's /chat 16-user figures were lost: its token count
# needed the replies' text to equal one alone), /chat and /v1; then the cancel storm (session 7: 0.651)
source bench/gpu_calls/common.sh
Q=/tmp/turbostudio-quant-bench
step formats16 400 python3 -m bench.bench_formats --users 16 --paths chat,v1 --rounds 5 --new-tokens 256 --cache 0.1 \
  --app bf16-pt=pytorch:hf:$Q/llama2-7b-32k-bf16 \
  --app fp8-pt=pytorch:fp8:$Q/models/llama2-7b-32k-fp8 \
  --app fp8-pt-triton=pytorch:fp8:$Q/models/llama2-7b-32k-fp8:LMDEPLOY_BLOCKED_FP8_GEMM_BACKEND=triton \
  --app bf16-tm=turbomind:hf:$Q/llama2-7b-32k-bf16 \
  --app fp8-tm=turbomind:fp8:$Q/models/llama2-7b-32k-fp8 \
  --json $OUT/formats16.json
tail -20 $OUT/formats16.log
step storm 170 python3 -m pytest -q -m gpu tests/gpu/test_gpu_app.py -k storm -s -p no:cacheprovider
grep -i "storm\|passed\|failed" $OUT/storm.log | tail -5
cat $OUT/steps.txt
