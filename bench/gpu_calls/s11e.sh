# Session 11, call S11E (ui, inline after S11D): TurboMind, 1/16/64 users, 6 interleaved rounds
source bench/gpu_calls/common.sh
step raw_tm 560 python3 -m bench.bench_raw --model $M18 --backend turbomind --users 1,16,64 --new-tokens 256 \
  --rounds 6 --repeat-one 2 --sides raw,adapter,v1,chat,v1-base,server --variant base:TURBOSTUDIO_CORE_PUSH=0 \
  --json $OUT/raw-turbomind.json --port 7971
tail -24 $OUT/raw_tm.log; cat $OUT/steps.txt
