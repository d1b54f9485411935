# Session 5 (2026-12-02), call S (carry .gpukit/ui ... after an engine-carry call on the same machine):
# /v1 on TurboMind: OpenAI parity (stop, streamed = not, penalties refused by name) and 50 vanished clients
source bench/gpu_calls/common.sh
step gpu_v1 300 python3 -m pytest -m gpu -q -p no:cacheprovider -rfE -s tests/gpu/test_gpu_v1.py
grep -h "passed\|failed\|TurboMind /v1\|Error" $OUT/gpu_v1.log | head -20
