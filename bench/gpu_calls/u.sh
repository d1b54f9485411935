# Session 6 (2026-12-02), call U (carry .gpukit/ui, .gpukit/setup.sh, .gpukit/cublas_shim.c right after T):
# issue #19: the app's /chat and /v1, our adapter, LMDeploy's api_server, all against raw pipeline.stream_infer
source bench/gpu_calls/common.sh
step raw_tm 560 python3 -m bench.bench_raw --model $M18 --backend turbomind --users 1,16,64 --new-tokens 256 \
  --rounds 3 --json $OUT/raw-turbomind.json
tail -12 $OUT/raw_tm.log; cat $OUT/steps.txt; tail -5 /tmp/bench-api-server-7882.log 2>/dev/null
