# Session 9 (2026-12-02), call S9B (carry .gpukit/ui, .gpukit/setup.sh, .gpukit/cublas_shim.c right after S9A):
# issue #19 on TurboMind: raw pipeline.stream_infer, the app with its engine core (chat, v1), the app
# with the engine in-process (chat-inproc, v1-inproc, the split's before), LMDeploy's api_server
source bench/gpu_calls/common.sh
step raw_tm 575 python3 -m bench.bench_raw --model $M18 --backend turbomind --users 1,16,64 --new-tokens 256 \
  --rounds 3 --sides raw,chat,v1,chat-inproc,v1-inproc,server --json $OUT/raw-turbomind.json
tail -14 $OUT/raw_tm.log; cat $OUT/steps.txt
