# Session 5 (2026-12-02), call R right after Q (carry .gpukit/ui, .gpukit/setup.sh, .gpukit/cublas_shim.c):
# every app-level GPU test (TurboMind app: concurrent users, stop, the cancel storm with the engine
# holding no request after it; Transformers-CUDA out of memory; the Quantize page's AWQ job, card, load)
source bench/gpu_calls/common.sh
[ -f $M18/config.json ] || step build18 120 "${BUILD18[@]}"
step gpu_app 560 python3 -m pytest -m gpu -q -p no:cacheprovider -rfE -s tests/gpu/test_gpu_app.py
grep -h "passed\|failed\|cancel storm\|app GPU memory\|Error" $OUT/gpu_app.log | head -20
