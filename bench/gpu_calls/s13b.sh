# Session 13 (written in session 12; not run yet), call S13B (ui carry, right after S13A): the app with its
# text made in the web process (the "detok" variant) beside the app as it is, raw stream_infer and
# api_server: the PyTorch engine at 16 users, then TurboMind at 16 and 64, 8 interleaved rounds each
source bench/gpu_calls/common.sh
step raw_pt 280 python3 -m bench.bench_raw --model $M18 --backend pytorch --users 16 --new-tokens 256 \
  --rounds 8 --sides raw,v1,chat,v1-detok,chat-detok,server --variant detok:TURBOSTUDIO_CORE_DETOKENIZE=1 \
  --json $OUT/raw-pytorch-detok.json --port 7961
step raw_tm 280 python3 -m bench.bench_raw --model $M18 --backend turbomind --users 16,64 --new-tokens 256 \
  --rounds 8 --sides raw,v1,chat,v1-detok,chat-detok,server --variant detok:TURBOSTUDIO_CORE_DETOKENIZE=1 \
  --json $OUT/raw-turbomind-detok.json --port 7971
tail -9 $OUT/raw_pt.log; tail -16 $OUT/raw_tm.log; cat $OUT/steps.txt
