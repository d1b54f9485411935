# Session 11, call S11D (ui carry, right after S11C): the PyTorch engine, 1 and 16 users, 8 interleaved
# rounds: raw, the adapter, the app (push path, frames drained in batches), the app with a pump thread
# per stream (base), the app with a 0.5 ms GIL switch interval in its engine process (sw), api_server
# (as run; the gather and engine-process switch-interval knobs it compared were removed after it:
# neither gained anything measurable, bench/gpu_session.md, Session 11)
source bench/gpu_calls/common.sh
step raw_pt 560 python3 -m bench.bench_raw --model $M18 --backend pytorch --users 1,16 --new-tokens 256 \
  --rounds 8 --repeat-one 2 --sides raw,adapter,v1,chat,v1-base,v1-sw,server \
  --variant base:TURBOSTUDIO_CORE_PUSH=0 --variant sw:TURBOSTUDIO_CORE_SWITCH_INTERVAL=0.0005 \
  --json $OUT/raw-pytorch.json --port 7961
tail -18 $OUT/raw_pt.log; cat $OUT/steps.txt
