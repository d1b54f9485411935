# Call C (carry .gpukit/ui, warm): where the 64-user time goes, the remote hop, Transformers batching, int4 kernels
source bench/gpu_calls/common.sh
[ -f $M18/config.json ] || step build18 120 "${BUILD18[@]}"
step app64_prof 100 env TURBOSTUDIO_PROFILE=$OUT/prof64.txt TURBOSTUDIO_PROFILE_DEPTH=14 python3 -m bench.bench_app --model $M18 --engine turbomind --users 64 --new-tokens 256 --client http --port 7875
step remote 200 python3 -m bench.bench_remote --model $M18 --users 1,16 --new-tokens 256 --json $OUT/remote.json
step hf 150 python3 -m bench.bench_app --model $M18 --engine transformers --users 1,8 --new-tokens 64 --client http --port 7877 --json $OUT/hf.json
if [ -d /tmp/turbostudio-quant-bench/models/llama2-7b-32k-w4a16 ]; then
  step tune 110 env TM_GEMM_TUNE=top_k=0 python3 -m bench.bench_quantize --shape llama2-7b-32k --skip memory,kv --speed-models w4a16 --tag " TM_GEMM_TUNE=top_k=0"
fi
grep -h "users\|decode-only\|server alone" $OUT/app64_prof.log $OUT/remote.log $OUT/hf.log; grep -h '"model"' $OUT/tune.log
