# Fifth machine, call M (carry .gpukit/engine): setup and the model
source bench/gpu_calls/common.sh
nvidia-smi --query-gpu=name --format=csv,noheader; step build18 120 "${BUILD18[@]}"
