# Session 12 (2026-12-03), call S12A on a fresh machine (engine carry): the 1.8B shape, then where the
# adapter loses to raw stream_infer at 16 users, one pipeline, seven ways in (detokenization stubbed out on two) (bench/probe_pytorch_gap.py),
# on the PyTorch engine and TurboMind; then the engine-level GPU tests (not re-run since session 10)
source bench/gpu_calls/common.sh
step build18 150 "${BUILD18[@]}"
step gap_pt 200 python3 -m bench.probe_pytorch_gap --model $M18 --backend pytorch --users 16 --rounds 8
step gap_tm 150 python3 -m bench.probe_pytorch_gap --model $M18 --backend turbomind --users 16 --rounds 8
step gpu_engine 150 python3 -m pytest -q -p no:cacheprovider -rfE tests/gpu/test_gpu.py
step gap_tm64 100 python3 -m bench.probe_pytorch_gap --model $M18 --backend turbomind --users 64 --rounds 5
tail -11 $OUT/gap_pt.log; tail -11 $OUT/gap_tm.log; tail -4 $OUT/gpu_engine.log; tail -9 $OUT/gap_tm64.log; cat $OUT/steps.txt
