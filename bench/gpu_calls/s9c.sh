# Session 9 (2026-12-02), call S9C (ui carry, right after S9B): issue #19 on LMDeploy's PyTorch engine
# (1 and 16 users), then the app-level GPU tests with the engine core on (the default now)
source bench/gpu_calls/common.sh
step raw_pt 330 python3 -m bench.bench_raw --model $M18 --backend pytorch --users 1,16 --new-tokens 256 \
  --rounds 3 --sides raw,adapter,chat,v1,chat-inproc,v1-inproc --json $OUT/raw-pytorch.json --port 7941
tail -5 $OUT/raw_pt.log
step gpu_app 240 python3 -m pytest -m gpu -q -p no:cacheprovider -rfE tests/gpu/test_gpu_app.py tests/gpu/test_gpu_v1.py
tail -8 $OUT/gpu_app.log; cat $OUT/steps.txt
