# Second machine, call E (carry .gpukit/ui, right after D): the fixed GPU tests, then issue #6's figures
source bench/gpu_calls/common.sh
[ -f $M18/config.json ] || step build18 120 "${BUILD18[@]}"
step gpu_app 240 python3 -m pytest -m gpu -q -p no:cacheprovider -rfE -s tests/gpu/test_gpu_app.py -k "out_of_memory or concurrent or stop_frees"
step web 100 python3 -m bench.bench_web --users 1,16,64 --new-tokens 256 --json $OUT/web.json
step app 150 python3 -m bench.bench_app --model $M18 --engine turbomind --users 1,16,64 --new-tokens 256 --client http --json $OUT/app.json
step hf 150 python3 -m bench.bench_app --model $M18 --engine transformers --users 1,8 --new-tokens 64 --client http --port 7877 --json $OUT/hf.json
tail -n 4 $OUT/gpu_app.log; grep -h "users\|decode-only\|note:" $OUT/web.log $OUT/app.log $OUT/hf.log
