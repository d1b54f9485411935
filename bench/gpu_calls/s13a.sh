# Session 13 (written in session 12, 2026-12-03; not run yet), call S13A on a fresh machine (engine carry):
# the 1.8B shape, then the text made in the web process (TURBOSTUDIO_CORE_DETOKENIZE=1) against LMDeploy's
# own on both engines (tests/gpu/test_gpu.py -k web_process)
source bench/gpu_calls/common.sh
step build18 150 "${BUILD18[@]}"
step gpu_detok 300 python3 -m pytest -q -p no:cacheprovider -rfE tests/gpu/test_gpu.py -k web_process
tail -6 $OUT/gpu_detok.log; cat $OUT/steps.txt
