# Call B (carry .gpukit/ui, right after A): issues #7 and #6 through the app
source bench/gpu_calls/common.sh
[ -f $M18/config.json ] || step build18 120 "${BUILD18[@]}"
step gpu_app 200 python3 -m pytest -m gpu -q -p no:cacheprovider -rfE -s tests/gpu/test_gpu_app.py tests/gpu/test_gpu.py -k "out_of_memory or concurrent"
step web 100 python3 -m bench.bench_web --users 1,16,64 --new-tokens 256 --json $OUT/web.json
step app 150 python3 -m bench.bench_app --model $M18 --engine turbomind --users 1,16,64 --new-tokens 256 --client http --json $OUT/app.json
step app_si 120 python3 -m bench.bench_app --model $M18 --engine turbomind --users 1,16,64 --new-tokens 256 --client http --app-args "--switch-interval 0.0005" --json $OUT/app_si.json
tail -n 4 $OUT/gpu_app.log; grep -h "users\|decode-only" $OUT/web.log $OUT/app.log $OUT/app_si.log
