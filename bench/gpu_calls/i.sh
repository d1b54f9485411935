# Third machine, call I (carry .gpukit/ui, warm): app vs engine again (run-to-run spread), Transformers 1 and 8 users
source bench/gpu_calls/common.sh
[ -f $M18/config.json ] || step build18 120 "${BUILD18[@]}"
step app2 120 python3 -m bench.bench_app --model $M18 --engine turbomind --users 1,16,64 --new-tokens 256 --client http --port 7873 --json $OUT/app2.json
step app3 120 python3 -m bench.bench_app --model $M18 --engine turbomind --users 1,16,64 --new-tokens 256 --client http --port 7875 --json $OUT/app3.json
step hf3 150 python3 -m bench.bench_app --model $M18 --engine transformers --users 1,8 --new-tokens 64 --client http --port 7879 --json $OUT/hf3.json
grep -h "users\|decode-only\|note:" $OUT/app2.log $OUT/app3.log $OUT/hf3.log
