# Session 11, call S11F (ui, inline): the app-level GPU tests on the push path (cancel storm, stop,
# out of memory, Quantize page, /v1 parity and vanished clients)
source bench/gpu_calls/common.sh
step gpu_app 560 python3 -m pytest -m gpu -q -p no:cacheprovider -rfE tests/gpu/test_gpu_app.py tests/gpu/test_gpu_v1.py
tail -6 $OUT/gpu_app.log; cat $OUT/steps.txt
