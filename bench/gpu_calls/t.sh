# Session 6 (2026-12-02) wrote these for the next session with device time (session 6 had none
# left: 220 s of the 30 minutes). Call T (carry .gpukit/engine, .gpukit/setup.sh, .gpukit/cublas_shim.c):
# issue #17 on the GPU: the FP8 job's result on TurboMind and LMDeploy's PyTorch engine (tests), the
# bandwidth meter against tokens/s x bytes by hand, then the 1.8B model for call U
source bench/gpu_calls/common.sh
step build18 240 "${BUILD18[@]}"
step gpu_quant 300 python3 -m pytest -m gpu -q -p no:cacheprovider -rfE -s tests/gpu/test_gpu_quant.py
step gpu_bw 240 python3 -m pytest -m gpu -q -p no:cacheprovider -rfE -s tests/gpu/test_gpu_bandwidth.py
grep -h "passed\|failed\|meter\|FP8\|ppl" $OUT/gpu_quant.log $OUT/gpu_bw.log | head -30
cat $OUT/steps.txt
