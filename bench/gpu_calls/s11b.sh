# Session 11 (2026-12-03), call S11B (ui carry, right after S11A): issue #19 on LMDeploy's PyTorch engine,
# 1 and 16 users, interleaved rounds: raw, the adapter (at once / starts spread over 20 ms / spread and
# gathered), the app (push path), the app with a 10 ms gather, the app on session 10's path (a pump
# thread per stream), LMDeploy's api_server
# (as run; the gather and engine-process switch-interval knobs it compared were removed after it:
# neither gained anything measurable, bench/gpu_session.md, Session 11)
source bench/gpu_calls/common.sh
step raw_pt 540 python3 -m bench.bench_raw --model $M18 --backend pytorch --users 1,16 --new-tokens 256 \
  --rounds 6 --repeat-one 2 --sides raw,adapter,adapter-spread,adapter-gather,v1,chat,v1-gather,v1-base,server \
  --variant gather:TURBOSTUDIO_LMDEPLOY_GATHER_MS=10 --variant base:TURBOSTUDIO_CORE_PUSH=0 \
  --json $OUT/raw-pytorch.json --port 7961
tail -22 $OUT/raw_pt.log; cat $OUT/steps.txt
