# Third machine, call G (carry .gpukit/engine): the engine-level GPU tests after the sampler and
# stream-end changes (Transformers-CUDA and TurboMind through the engine contract), and the 1.8B model
source bench/gpu_calls/common.sh
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > $OUT/gpu.txt 2>&1; cat $OUT/gpu.txt
step build18 120 "${BUILD18[@]}"
step engine_tests 420 python3 -m pytest -m gpu -q -p no:cacheprovider -rfE tests/engines/test_engine_contract.py tests/gpu/test_gpu.py
tail -n 6 $OUT/engine_tests.log
