# Session 10 (2026-12-03), call S10A on a fresh machine (engine carry): the 1.8B shape for S10B, then
# the engine-level GPU tests (not run on a GPU since the engine core landed)
source bench/gpu_calls/common.sh
step build18 150 "${BUILD18[@]}"
step gpu_engine 330 python3 -m pytest -q -x tests/gpu/test_gpu.py -p no:cacheprovider
tail -4 $OUT/gpu_engine.log; cat $OUT/steps.txt
