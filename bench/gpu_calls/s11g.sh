# Session 11, call S11G on a fresh machine (engine carry), the last ~300 s: where the adapter loses
# to raw stream_infer at 16 users on the PyTorch engine, one pipeline, four ways in (bench/probe_pytorch_gap.py).
# NOT RUN in session 11: too little device time was left to start a machine.
source bench/gpu_calls/common.sh
step build18 150 "${BUILD18[@]}"
step gap_pt 200 python3 -m bench.probe_pytorch_gap --model $M18 --backend pytorch --users 16 --rounds 8
tail -12 $OUT/gap_pt.log; cat $OUT/steps.txt
