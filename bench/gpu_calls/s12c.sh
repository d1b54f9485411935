# Session 12 (2026-12-03), call S12C (ui, inline after S12B): the PyTorch engine, 1 and 16 users, 8
# interleaved rounds: raw, the adapter alone, the app's /chat and /v1, LMDeploy's api_server
source bench/gpu_calls/common.sh
step raw_pt 560 python3 -m bench.bench_raw --model $M18 --backend pytorch --users 1,16 --new-tokens 256 \
  --rounds 8 --repeat-one 2 --sides raw,adapter,v1,chat,server --json $OUT/raw-pytorch.json --port 7961
tail -14 $OUT/raw_pt.log; cat $OUT/steps.txt
