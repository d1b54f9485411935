# Session 9 (2026-12-02), call S9D on a fresh machine (engine carry): the 1.8B shape for S9E
source bench/gpu_calls/common.sh
step build18 150 "${BUILD18[@]}"
cat $OUT/steps.txt
