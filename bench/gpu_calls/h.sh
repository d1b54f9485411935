# Third machine, call H (carry .gpukit/ui, right after G): the app-level GPU tests (out of memory,
# concurrent users, stop, the 200-stream cancel storm), then app vs engine
source bench/gpu_calls/common.sh
[ -f $M18/config.json ] || step build18 120 "${BUILD18[@]}"
step gpu_app 330 python3 -m pytest -m gpu -q -p no:cacheprovider -rfE -s tests/gpu/test_gpu_app.py -k "out_of_memory or concurrent or stop_frees or storm"
step app 120 python3 -m bench.bench_app --model $M18 --engine turbomind --users 1,16,64 --new-tokens 256 --client http --json $OUT/app.json
grep -h "passed\|failed\|cancel storm\|app GPU memory" $OUT/gpu_app.log; grep -h "users\|decode-only\|note:" $OUT/app.log
