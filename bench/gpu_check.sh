#!/usr/bin/env bash
# The GPU checks of the platform (issue 13), in passes of about 5 minutes each: a lease is 15 minutes of device
# time, the machine's start (1-2 minutes) included, so it holds passes 1 and 2 and a short rerun of what failed, and
# the decisions that wait for a GPU come first.
#   pass 1 (default): the `gpu` tests (engine on CUDA: greedy equals the reference, every tensor on the device,
#     seeded sampling, decode steps replayed from CUDA graphs, an out-of-memory forward failing only its request,
#     vision adapters, the trainer under DDP / ZeRO); full-size random-weight Qwen-VL v1 in bf16: tokens/s with 8
#     adapters of rank 16 (in the default slots of rank 64, which decode steps read cut to the batch's rank), one
#     adapter and the base, with and without CUDA graphs, against per-request swapping and static batches (equal and
#     varied lengths); the decode step of a small Qwen2.5-VL with its sibling layers fused and apart
#     (`fuse_siblings`).
#   pass 2 (GPU_CHECK_PASS=2): v1's latency rows (TTFT and its parts, the longest inter-token gap, at the GPU's
#     default batch (64) with whole prefills and budgets of 512 / 2048 tokens, then at 16 rows); the engine in a
#     thread vs a process of its own while the caller's loop works per item (as a Serve replica's does); LoRA /
#     Q-LoRA training steps of a 7B-class Qwen2.5-VL (s/it, peak memory); one sampling step at the full vocabulary,
#     batched vs the row-by-row sampler before it.
#   pass 3 (GPU_CHECK_PASS=3, when the lease has room): the peak memory of 32 concurrent 2000-token requests; the
#     CUDA kernels a decode step launches (`bench/step_ops.py`); image requests prepared beside the model thread.
#   pass 4 (GPU_CHECK_PASS=4): Qwen2.5-VL-7B's serving rows with and without decode graphs.
# Each pass's limits add up to at most 360 s (plus the wheels' install, skipped on a warm machine that has them), so
# a call with timeout_s 420 holds it. The first run of the checks (2026-12-04, one call) took 314 s with its serving
# row cut at 180 s. Each check has its own limit, so one that hangs cannot eat the others', and its row says
# "running" until it ends, so a run cut short from outside still shows which check it was in. Prints one table (and
# writes it to $OUT/gpu_check.md when OUT is set), then exits with the number of failed checks. A rerun can name
# only the rows it needs, from any pass (GPU_CHECK_ONLY="gpu_tests serve_v1_memory"; the environment row always
# runs).
#
# The device machine has PyTorch but not every pinned package this project needs (transformers 5.24, peft,
# pydantic, llguidance, bitsandbytes, deepspeed): `bash bench/gpu_wheels.sh` here fetches them as Python 3.12 wheels into
# .whl/ (git-ignored); carry `.whl` with the run and they are installed into /tmp/site first. Before spending
# device time, `bash bench/gpu_dryrun.sh` runs this same script here, on the CPU with tiny presets, in an environment
# holding only what the device image holds.
#   device runs: bash bench/gpu_check.sh, then GPU_CHECK_PASS=2 bash bench/gpu_check.sh   (carry: [".whl"],
#                timeout_s: 420 each, the second at once, on the machine still warm)
# Settings (the dry run's): GPU_CHECK_PASS (the passes to run, space-separated; default 1), GPU_CHECK_ONLY (row
# names, space-separated: those rows alone, whatever their pass), GPU_CHECK_DEVICE (cuda),
# GPU_CHECK_SMOKE=1 (tiny presets, short runs), GPU_CHECK_LIMIT_SCALE (each check's limit times this; 1, or 5 in
# the dry run, where the limits only catch hangs: a loaded 2-core machine took over 40 s to import the environment
# row's packages), GPU_CHECK_WHEELS
# (.whl), GPU_CHECK_SITE (/tmp/site), GPU_CHECK_PYTEST_MARK (smoke only: a marker the gpu_tests row selects by),
# PYTHON (python3).
set -uo pipefail
cd "$(dirname "$0")/.."
passes=" ${GPU_CHECK_PASS:-1} "
for pass in $passes; do
  case $pass in 1|2|3|4) ;; *) echo "GPU_CHECK_PASS: no pass '$pass' (the passes are 1, 2, 3 and 4)"; exit 2 ;; esac
done
PY=${PYTHON:-python3}
device=${GPU_CHECK_DEVICE:-cuda}
wheels=${GPU_CHECK_WHEELS:-.whl}
site=${GPU_CHECK_SITE:-/tmp/site}
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
if [ -d "$wheels" ] && ls "$wheels"/*.whl >/dev/null 2>&1; then
  stamp=$(cat "$wheels"/*.whl | sha256sum | cut -d' ' -f1)  # the next pass, on the machine still warm, skips it
  if [ "$(cat "$site/.wheels" 2>/dev/null)" != "$stamp" ]; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" "$wheels"/*.whl \
      && echo "$stamp" > "$site/.wheels" || { echo "installing the carried wheels failed"; exit 1; }
  fi
  export PYTHONPATH="$site:$PWD"
fi
scale=1
if [ "${GPU_CHECK_SMOKE:-0}" = 1 ]; then  # the dry run's sizes: every code path, tiny models, seconds each
  tests=(tests/serving/test_engine_devices.py tests/serving/test_engine_faults.py tests/serving/test_decode_graphs.py
    tests/serving/test_engine_vision_adapters.py tests/serving/test_lora_batch.py tests/core/test_registry_materialize.py
    tests/core/families/test_fused_rotary.py tests/serving/test_kv_cache.py tests/training/test_trainer_devices.py)
  # (the CPU cases too, unless GPU_CHECK_PYTEST_MARK selects (CI: gpu))
  [ -n "${GPU_CHECK_PYTEST_MARK:-}" ] && tests=(-m "$GPU_CHECK_PYTEST_MARK" "${tests[@]}")
  serve=(--preset qwen-vl-tiny --requests 8 --tokens 8 --varied-tokens 2,8 --decode-graphs static)
  serve_family=(--preset qwen2.5-vl-tiny --requests 8 --tokens 8 --decode-graphs static)
  latency=(--preset qwen-vl-tiny --latency-requests 8 --tokens 8 --latency-batch 4)
  memory=(--preset qwen-vl-tiny --memory-requests 4 --memory-prompt 256)
  train=(--preset qwen2.5-vl-tiny --seq-len 96 --image-px 112 --steps 1 --warmup 1)
  [ "$device" = cpu ] && train+=(--steps-on-cpu)
  sampling=(--vocab 1152 --repeats 3)
  fused=(--preset qwen2.5-vl-tiny --rounds 1 --steps 2)
  process=(--preset qwen-vl-tiny --rows 8 --tokens 8 --rounds 1)
  prep=(--preset qwen2.5-vl-tiny --rows 4 --tokens 8 --prep-per-s 5 --image-px 320x240 --rounds 1)
  scale=5
else
  tests=(-m gpu tests/serving/test_engine_devices.py tests/serving/test_engine_faults.py tests/serving/test_decode_graphs.py
    tests/serving/test_engine_vision_adapters.py tests/serving/test_lora_batch.py tests/core/test_registry_materialize.py
    tests/core/families/test_fused_rotary.py tests/serving/test_kv_cache.py tests/training/test_trainer_devices.py)
  # (per-request swapping: 8 requests, one at a time at ~20 tok/s on the H200, 2026-12-04; 16 took ~25 s)
  serve=(--preset qwen-vl-chat --requests 32 --tokens 32 --varied-tokens 4,32 --decode-graphs cuda --swap-requests 8)
  serve_family=(--preset qwen2.5-vl-7b --requests 32 --tokens 32 --decode-graphs cuda)
  # latency rows at the GPU's default batch (64): whole prefills, then the CPU's and the GPU's default
  # prefill_chunk_tokens (512, 2048); then at the CPU's default batch (16, the GPU's before 2026-12-05)
  latency=(--preset qwen-vl-chat --latency-requests 32 --tokens 32 --prefill-chunk 512,2048 --latency-batch 16)
  memory=(--preset qwen-vl-chat --memory-requests 32 --memory-prompt 2000)
  train=(--preset qwen2.5-vl-7b)
  sampling=(--greedy 16 --repeats 20)
  fused=(--preset qwen2.5-vl-small --dtype bfloat16 --rounds 5 --steps 32)
  process=(--preset qwen-vl-small --dtype bfloat16 --rows 64 --tokens 128 --item-work-ms 0,0.2,0.6 --rounds 3)
  prep=(--preset qwen2.5-vl-small --dtype bfloat16 --rows 16 --tokens 128 --prep-per-s 20 --rounds 3)
fi
if [ -f "$wheels/generation-before.py" ]; then  # the sampler before it was batched (gpu_wheels.sh writes it)
  sampling+=(--before-file "$wheels/generation-before.py")
elif [ "${GPU_CHECK_SMOKE:-0}" = 1 ]; then
  sampling+=(--before-rev "")
fi
table=${OUT:-/tmp}/gpu_check.md
logs=${OUT:-/tmp}
mkdir -p "$logs"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | sed 's/^/GPU: /'
echo "| check | result | seconds | output (last lines) |" > "$table"
echo "|---|---|---|---|" >> "$table"
failed=0
check() {  # check NAME PASS LIMIT COMMAND...: runs when its pass is asked for, or GPU_CHECK_ONLY names it
  local name=$1 pass=$2 limit=$(($3 * ${GPU_CHECK_LIMIT_SCALE:-$scale})); shift 3
  local start=$SECONDS status=ok
  if [ -n "${GPU_CHECK_ONLY:-}" ]; then
    [ "$name" = environment ] || [[ " $GPU_CHECK_ONLY " == *" $name "* ]] || return 0
  else
    [ "$name" = environment ] || [[ "$passes" == *" $pass "* ]] || return 0
  fi
  echo "| $name | running (limit $limit s) | | |" >> "$table"
  timeout -k 10 "$limit" "$@" > "$logs/$name.log" 2>&1 || { status="FAILED ($?)"; failed=$((failed + 1)); }
  local row="| $name | $status | $((SECONDS - start)) | $(tail -n 4 "$logs/$name.log" | tr '\r\n|' '  /' | cut -c1-300) |"  # (\r: progress bars)
  grep -v "^| $name | running " "$table" > "$table.tmp"; echo "$row" >> "$table.tmp"; mv "$table.tmp" "$table"
}
# What the run imports, and from where: a package the image lacks fails here in seconds, not deep inside a check.
check environment 0 40 $PY -c "
import sys, torch, transformers, peft, pydantic, llguidance, bitsandbytes, deepspeed, safetensors, tiktoken, PIL
print(sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda,
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU',
      *(f'{m.__name__} {m.__version__}' for m in (transformers, peft, pydantic, bitsandbytes, deepspeed)))
torch.zeros(1, device='$device')"
# ----- pass 1 (limits 40 + 110 + 170 + 40 = 360 s)
check gpu_tests 1 110 $PY -m pytest -q -rP -p no:cacheprovider "${tests[@]}"
# v1 full size: mixed / single / base and swapping, with and without decode graphs; engine vs static batches
check serve_v1_full_bf16 1 170 $PY bench/serving_throughput.py --device "$device" --dtype bfloat16 --adapters 8 \
  --rank 16 --repeats 1 --skip-loads --memory-requests 0 --latency-requests 0 "${serve[@]}"
# decode-step time with the base's sibling layers as one matmul per group vs apart (fuse_siblings on / off)
check fused_siblings 1 40 $PY bench/fused_siblings.py --device "$device" "${fused[@]}"
# ----- pass 2 (limits 40 + 130 + 70 + 70 + 20 = 330 s)
# the serving latency lines: TTFT and its parts, the longest gap, per prefill budget and batch
check serve_v1_latency 2 130 $PY bench/serving_throughput.py --device "$device" --dtype bfloat16 --adapters 8 \
  --rank 16 --latency-only "${latency[@]}"
# the engine in a thread vs a process of its own while the caller's loop works per item read, as a Serve
# replica's does (its GIL against the model thread's; no Ray on the device machine)
check engine_process 2 70 $PY bench/engine_process.py --device "$device" "${process[@]}"
check train_qwen25vl_7b 2 70 $PY bench/train_families.py --device "$device" --rounds 1 "${train[@]}"
check sampling_step 2 20 $PY bench/sampling_step.py --device "$device" "${sampling[@]}"
# ----- pass 3 (limits 40 + 80 + 45 + 150 = 315 s)
check serve_v1_memory 3 80 $PY bench/serving_throughput.py --device "$device" --dtype bfloat16 --memory-only \
  --before-rev "" "${memory[@]}"
# kernels per decode step, base / one adapter / 8 mixed (2-layer model: what a layer adds, fused rms_norm or not)
check step_kernels 3 45 $PY bench/step_ops.py --device "$device" --dtype bfloat16 --preset qwen-vl-tiny --before-rev "" \
  --steps-only
# image requests prepared in the engine's process (a thread, as its preprocessing pool does) vs in another (as a
# replica does for its engine's child): what the model thread loses to the preparation's hold on the GIL
check prep_beside_decode 3 150 $PY bench/prep_beside_decode.py --device "$device" "${prep[@]}"
# ----- pass 4 (limits 40 + 240 s): Qwen2.5-VL-7B serving, 8 adapters, with and without decode graphs
check serve_qwen25vl_7b 4 240 $PY bench/serving_throughput.py --device "$device" --dtype bfloat16 --adapters 8 \
  --rank 16 --repeats 1 --skip-loads --memory-requests 0 --lora-only "${serve_family[@]}"
cat "$table"
exit "$failed"
