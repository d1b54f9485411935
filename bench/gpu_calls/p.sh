# Last machine, call P (carry .gpukit/ui): every app-level GPU test on the final code
source bench/gpu_calls/common.sh
[ -f $M18/config.json ] || step build18 120 "${BUILD18[@]}"
step gpu_app 540 python3 -m pytest -m gpu -q -p no:cacheprovider -rfE -s tests/gpu/test_gpu_app.py
grep -h "passed\|failed\|cancel storm\|app GPU memory" $OUT/gpu_app.log
