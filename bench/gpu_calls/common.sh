# sourced by the call scripts: the kit, the caches, and a step runner that keeps each log in $OUT
source .gpukit/setup.sh .gpukit > /tmp/kit.log 2>&1
export TURBOSTUDIO_TEST_CACHE=/tmp/tscache PYTHONUNBUFFERED=1
M18=/tmp/turbostudio-bench-1.8b
step() {  # step NAME SECONDS CMD...: run CMD with a time limit, its output in $OUT/NAME.log
  local name=$1 secs=$2; shift 2
  local t0=$(date +%s)
  timeout -k 5 "$secs" "$@" > "$OUT/$name.log" 2>&1
  echo "[$name] rc=$? $(( $(date +%s) - t0 )) s" | tee -a "$OUT/steps.txt"
}
BUILD18=(python3 -c "from bench.models import build_llama; build_llama('$M18','1.8b',device='cuda',dtype='bfloat16')")
