# Fourth machine, call K (carry .gpukit/ui): the cancel storm three ways, side by side on one machine:
# as committed; with streams ending at LMDeploy's end marker and blocking closes (before 2026-11-26);
# without the Gradio session shim. Which change, if any, leaves TurboMind slower after a storm.
source bench/gpu_calls/common.sh
[ -f $M18/config.json ] || step build18 120 "${BUILD18[@]}"
T="python3 -m pytest -m gpu -q -p no:cacheprovider -rfE -s tests/gpu/test_gpu_app.py -k storm"
step storm 170 $T
step storm_wait_end 170 env TURBOSTUDIO_LMDEPLOY_WAIT_END=1 $T
step storm_no_shim 170 env TURBOSTUDIO_SESSION_SHIM=0 $T
grep -h "cancel storm\|passed\|failed" $OUT/storm*.log
