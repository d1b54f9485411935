# Session 8 (2026-12-02), call Z (carry .gpukit/setup.sh, .gpukit/cublas_shim.c: both parts already
# installed by X and Y on the warm machine): the GPU tests fixed after session 7's run, not yet re-run
source bench/gpu_calls/common.sh
step gpu_quant 300 python3 -m pytest -x -q -m gpu tests/gpu/test_gpu_quant.py -p no:cacheprovider
tail -5 $OUT/gpu_quant.log
step storm 200 python3 -m pytest -q -m gpu tests/gpu/test_gpu_app.py -k storm -s -p no:cacheprovider
grep -i "storm\|passed\|failed" $OUT/storm.log | tail -5
cat $OUT/steps.txt
