# Session 6 (2026-12-02), call T (carry .gpukit/engine, .gpukit/setup.sh, .gpukit/cublas_shim.c):
# install the engine part, build the 1.8B model, check LMDeploy's own api_server starts (the peer of #19)
source bench/gpu_calls/common.sh
step build18 240 "${BUILD18[@]}"
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv | tee -a $OUT/steps.txt
python3 -c "import lmdeploy, fastapi, uvicorn; print('lmdeploy', lmdeploy.__version__)" >> $OUT/steps.txt 2>&1
cat $OUT/steps.txt
