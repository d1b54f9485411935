# Session 5 (2026-12-02), call Q (carry .gpukit/engine, .gpukit/setup.sh, .gpukit/cublas_shim.c): the
# engine-level GPU tests on the one-request-path code (contract + abort in every state on TurboMind,
# LMDeploy-PyTorch and Transformers-CUDA), then the 1.8B model the app tests need
source bench/gpu_calls/common.sh
nvidia-smi --query-gpu=name --format=csv,noheader
step engine_tests 420 python3 -m pytest -m gpu -q -p no:cacheprovider -rfE tests/engines/test_engine_contract.py tests/engines/test_engine_states.py
tail -n 3 $OUT/engine_tests.log
step build18 120 "${BUILD18[@]}"
