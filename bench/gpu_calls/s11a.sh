# Session 11 (2026-12-03), call S11A on a fresh machine (engine carry): the 1.8B shape for S11B, then
# the adapter's push path on LMDeploy's real engines (TurboMind and the PyTorch engine)
source bench/gpu_calls/common.sh
step build18 150 "${BUILD18[@]}"
step gpu_push 300 python3 -m pytest -q -x tests/gpu/test_gpu.py -k push -p no:cacheprovider
tail -4 $OUT/gpu_push.log; cat $OUT/steps.txt
