# Session 13 (written in session 13; not run: no device time left), call S13C (ui carry, right after
# S13B on the warm machine): the heap frozen (engines/heap.py, the default since session 13) against
# the heap left to Python's full collections ("nofreeze"), beside raw stream_infer: TurboMind at 64
# users (issue #19's first-token p99 <= 300 ms), then the PyTorch engine at 16, 8 interleaved rounds.
source bench/gpu_calls/common.sh
step gc_tm 280 python3 -m bench.bench_raw --model $M18 --backend turbomind --users 64 --new-tokens 256 \
  --rounds 8 --sides raw,v1,chat,v1-nofreeze,chat-nofreeze --variant nofreeze:TURBOSTUDIO_GC_FREEZE=0 \
  --json $OUT/raw-turbomind-gc.json --port 7981
step gc_pt 280 python3 -m bench.bench_raw --model $M18 --backend pytorch --users 16 --new-tokens 256 \
  --rounds 8 --sides raw,v1,chat,v1-nofreeze,chat-nofreeze --variant nofreeze:TURBOSTUDIO_GC_FREEZE=0 \
  --json $OUT/raw-pytorch-gc.json --port 7991
tail -8 $OUT/gc_tm.log; tail -8 $OUT/gc_pt.log; cat $OUT/steps.txt
