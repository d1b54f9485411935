# Last machine, call O (carry .gpukit/engine): the engine-level GPU tests on the final code
source bench/gpu_calls/common.sh
nvidia-smi --query-gpu=name --format=csv,noheader; step build18 120 "${BUILD18[@]}"
step engine_tests 400 python3 -m pytest -m gpu -q -p no:cacheprovider -rfE tests/engines/test_engine_contract.py tests/gpu/test_gpu.py
tail -n 3 $OUT/engine_tests.log
