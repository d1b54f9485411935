# Fourth machine, call J (carry .gpukit/engine): setup and the model only (the tests need the ui part)
source bench/gpu_calls/common.sh
nvidia-smi --query-gpu=name --format=csv,noheader; step build18 120 "${BUILD18[@]}"
