# Session 11 (2026-12-03), call S11C on a fresh machine (engine carry): the 1.8B shape for S11D-F
source bench/gpu_calls/common.sh
step build18 150 "${BUILD18[@]}"
cat $OUT/steps.txt
