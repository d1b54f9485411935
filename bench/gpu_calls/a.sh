# Call A (carry .gpukit/engine): the kit's engine part; issue #7's refusal; issue #4 on the 32k-vocabulary 7B
source bench/gpu_calls/common.sh
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > $OUT/gpu.txt 2>&1; cat $OUT/gpu.txt
step build18 120 "${BUILD18[@]}"
step refused 120 python3 -m pytest -m gpu -q -p no:cacheprovider -rfE tests/gpu/test_gpu.py -k refused
step quant32k 400 python3 -m bench.bench_quantize --shape llama2-7b-32k --samples 8 --seqlen 256 --json $OUT/quant32k.json
tail -n 25 $OUT/quant32k.log
