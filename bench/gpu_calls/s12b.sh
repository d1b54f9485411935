# Session 12 (2026-12-03), call S12B (ui carry, right after S12A): TurboMind, 1/16/64 users, 8 interleaved
# rounds: raw stream_infer, the adapter alone, the app's /chat and /v1, LMDeploy's api_server (the
# 64-user first-token p99 pooled over all rounds, issue #19)
source bench/gpu_calls/common.sh
step raw_tm 560 python3 -m bench.bench_raw --model $M18 --backend turbomind --users 1,16,64 --new-tokens 256 \
  --rounds 8 --repeat-one 2 --sides raw,adapter,v1,chat,server --json $OUT/raw-turbomind.json --port 7961
tail -20 $OUT/raw_tm.log; cat $OUT/steps.txt
