# Fifth machine, call N (carry .gpukit/ui): the storm test as committed; app vs engine in alternating
# rounds with the event-driven Gradio queue and without it (side by side); Transformers 1 and 8 users
source bench/gpu_calls/common.sh
[ -f $M18/config.json ] || step build18 120 "${BUILD18[@]}"
step storm 150 python3 -m pytest -m gpu -q -p no:cacheprovider -rfE -s tests/gpu/test_gpu_app.py -k storm
A="python3 -m bench.bench_app --model $M18 --engine turbomind --users 1,16,64 --new-tokens 256 --client http --rounds 5"
step rounds_tm 170 $A --json $OUT/rounds_tm.json
step rounds_tm_poll 170 env TURBOSTUDIO_QUEUE_SHIM=0 $A --port 7873 --json $OUT/rounds_tm_poll.json
step rounds_hf 120 python3 -m bench.bench_app --model $M18 --engine transformers --users 1,8 --new-tokens 64 --client http --port 7877 --rounds 3 --json $OUT/rounds_hf.json
grep -h "cancel storm\|passed\|failed" $OUT/storm.log; for f in rounds_tm rounds_tm_poll rounds_hf; do echo "== $f"; grep -h "round \|users\|decode-only" $OUT/$f.log; done
