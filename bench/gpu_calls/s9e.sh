# Session 9 (2026-12-02), call S9E (ui carry, right after S9D): issue #19 on TurboMind after Gradio's
# per-event analytics were skipped, with the engine core (the default); 1 user timed over 5 replies
source bench/gpu_calls/common.sh
step raw_tm2 300 python3 -m bench.bench_raw --model $M18 --backend turbomind --users 1,16,64 --new-tokens 256 \
  --rounds 3 --repeat-one 5 --sides raw,chat,v1 --json $OUT/raw-turbomind-2.json --port 7951
tail -5 $OUT/raw_tm2.log; cat $OUT/steps.txt
