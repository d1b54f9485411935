# Session 7 (2026-12-02), call W (carry .gpukit/ui, .gpukit/setup.sh, .gpukit/cublas_shim.c right after V):
# issue #17's targets through the app's /chat (and /v1): bf16 and FP8 on LMDeploy's PyTorch engine (the
# Hopper advice), then on TurboMind; raw pipeline.stream_infer beside each for the token count
source bench/gpu_calls/common.sh
Q=/tmp/turbostudio-quant-bench
R="python3 -m bench.bench_raw --users 1,16 --new-tokens 256 --rounds 2 --sides raw,chat,v1 --cache 0.3"
step pt_fp8 400 $R --backend pytorch --model $Q/models/llama2-7b-32k-fp8 --model-format fp8 --json $OUT/pt-fp8.json
step pt_bf16 200 $R --backend pytorch --model $Q/llama2-7b-32k-bf16 --json $OUT/pt-bf16.json --port 7891
step tm_fp8 120 $R --backend turbomind --model $Q/models/llama2-7b-32k-fp8 --model-format fp8 --json $OUT/tm-fp8.json --port 7895
step tm_bf16 120 $R --backend turbomind --model $Q/llama2-7b-32k-bf16 --json $OUT/tm-bf16.json --port 7897
for f in pt_fp8 pt_bf16 tm_fp8 tm_bf16; do echo "== $f"; grep -A3 "medians of" $OUT/$f.log; grep -i "error\|Traceback" $OUT/$f.log | head -3; done
cat $OUT/steps.txt
