# Fourth machine, call L (carry .gpukit/ui, warm): app vs engine in alternating rounds (medians), TurboMind and Transformers
source bench/gpu_calls/common.sh
[ -f $M18/config.json ] || step build18 120 "${BUILD18[@]}"
step rounds_tm 300 python3 -m bench.bench_app --model $M18 --engine turbomind --users 1,16,64 --new-tokens 256 --client http --rounds 5 --json $OUT/rounds_tm.json
step rounds_hf 240 python3 -m bench.bench_app --model $M18 --engine transformers --users 1,8 --new-tokens 64 --client http --port 7877 --rounds 3 --json $OUT/rounds_hf.json
grep -h "round\|users\|decode-only" $OUT/rounds_tm.log $OUT/rounds_hf.log
