# Second machine, call D (carry .gpukit/engine): the kit's engine part and the 1.8B model, nothing else
source bench/gpu_calls/common.sh
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > $OUT/gpu.txt 2>&1; cat $OUT/gpu.txt
step build18 120 "${BUILD18[@]}"
cat $OUT/steps.txt
