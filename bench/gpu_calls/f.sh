# Second machine, call F (carry .gpukit/ui, warm): a second app run (run-to-run spread), the remote hop
source bench/gpu_calls/common.sh
[ -f $M18/config.json ] || step build18 120 "${BUILD18[@]}"
step app2 150 python3 -m bench.bench_app --model $M18 --engine turbomind --users 1,16,64 --new-tokens 256 --client http --port 7873 --json $OUT/app2.json
step remote 200 python3 -m bench.bench_remote --model $M18 --users 1,16 --new-tokens 256 --json $OUT/remote.json
step hf2 150 python3 -m bench.bench_app --model $M18 --engine transformers --users 1,8 --new-tokens 64 --client http --port 7879 --json $OUT/hf2.json
grep -h "users\|decode-only\|server alone\|note:" $OUT/app2.log $OUT/remote.log $OUT/hf2.log
