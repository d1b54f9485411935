# Session 8 (2026-12-02), call AB (carry .gpukit/ui, .gpukit/setup.sh, .gpukit/cublas_shim.c right after AA):
# issue #17's "each format through the app" for AWQ W4A16 (FP8 and bf16 were measured in calls Y and Z2):
# bf16 and W4A16 on both LMDeploy engines, /chat, 1 and 16 users, medians of 3 alternating rounds
source bench/gpu_calls/common.sh
Q=/tmp/turbostudio-quant-bench
step formats_awq 330 python3 -m bench.bench_formats --users 1,16 --paths chat --rounds 3 --new-tokens 256 --cache 0.1 \
  --app bf16-tm=turbomind:hf:$Q/llama2-7b-32k-bf16 \
  --app w4a16-tm=turbomind:awq:$Q/models/llama2-7b-32k-w4a16 \
  --app bf16-pt=pytorch:hf:$Q/llama2-7b-32k-bf16 \
  --app w4a16-pt=pytorch:awq:$Q/models/llama2-7b-32k-w4a16 \
  --json $OUT/formats-awq.json
tail -14 $OUT/formats_awq.log
for f in /tmp/bench-formats-w4a16*.log; do echo "== $f"; grep -i "error\|Traceback" $f | head -3; done
cat $OUT/steps.txt
