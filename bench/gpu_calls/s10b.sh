# Session 10 (2026-12-03), call S10B (ui carry, right after S10A): issue #19 with /chat on the app's
# own REST routes (ui/rest_chat.py): TurboMind 1/16/64 users, then the PyTorch engine 1/16 users
source bench/gpu_calls/common.sh
step raw_tm 300 python3 -m bench.bench_raw --model $M18 --backend turbomind --users 1,16,64 --new-tokens 256 \
  --rounds 3 --repeat-one 5 --sides raw,chat,v1,server --json $OUT/raw-turbomind.json --port 7951
tail -5 $OUT/raw_tm.log
step raw_pt 280 python3 -m bench.bench_raw --model $M18 --backend pytorch --users 1,16 --new-tokens 256 \
  --rounds 3 --repeat-one 5 --sides raw,chat,v1 --json $OUT/raw-pytorch.json --port 7961
tail -4 $OUT/raw_pt.log; cat $OUT/steps.txt
