#!/usr/bin/env bash
# The GPU checks of the platform in one run (issue 13): the `gpu` tests (engine on CUDA: greedy equals the
# reference, every tensor on the device, seeded sampling), full-size random-weight serving of Qwen-VL v1 in bf16
# (tokens/s with 8 adapters, TTFT), and full-size LoRA / Q-LoRA training steps of a 7B-class Qwen2.5-VL (s/it, peak
# memory). Prints one table (and writes it to $OUT/gpu_check.md when OUT is set). Budget: under 10 minutes on one
# H200; each check has its own time limit so one that hangs cannot eat the others'.
#
# The device machine has PyTorch but not every pinned package this project needs (transformers 5.24, peft,
# llguidance, bitsandbytes, ...): `bash bench/gpu_wheels.sh` here downloads them as Python 3.12 wheels into .whl/
# (git-ignored); carry `.whl` with the run and they are installed into /tmp/site first.
#   device run:  bash bench/gpu_check.sh        (carry: [".whl"], timeout_s: 600)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="/tmp/site:$PWD" || { echo "installing the carried wheels failed"; exit 1; }
fi
table=${OUT:-/tmp}/gpu_check.md
logs=${OUT:-/tmp}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | sed 's/^/GPU: /'
echo "| check | result | seconds | output (last lines) |" > "$table"
echo "|---|---|---|---|" >> "$table"
check() {  # check NAME LIMIT_S COMMAND...
  local name=$1 limit=$2; shift 2
  local start=$SECONDS status=ok
  timeout "$limit" "$@" > "$logs/$name.log" 2>&1 || status="FAILED ($?)"
  echo "| $name | $status | $((SECONDS - start)) | $(tail -n 4 "$logs/$name.log" | tr '\n|' ' /' | cut -c1-300) |" >> "$table"
}
check gpu_tests 150 $PY -m pytest -m gpu -q -p no:cacheprovider tests/serving/test_engine_devices.py
check serve_v1_full_bf16 200 $PY bench/serving_throughput.py --preset qwen-vl-chat --device cuda --dtype bfloat16 \
  --adapters 8 --requests 32 --tokens 32 --repeats 1 --load-rounds 1
check train_qwen25vl_7b 200 $PY bench/train_families.py --device cuda --preset qwen2.5-vl-7b --rounds 1
cat "$table"
