#!/usr/bin/env bash
# The GPU checks of the platform in one run (issue 13): the `gpu` tests (engine on CUDA: greedy equals the
# reference, every tensor on the device, seeded sampling, an out-of-memory forward failing only its request, vision
# adapters with their device copies), full-size random-weight serving of Qwen-VL v1 in bf16
# (tokens/s with 8 adapters of rank 16 in the default slots of rank 64, which decode steps read cut to the batch's
# rank, with and without decode steps replayed from CUDA graphs, TTFT, the longest inter-token
# gap, at the GPU's default batch (64) and at 16; then, in a row of its own, the peak memory of 32
# concurrent 2000-token requests), full-size LoRA /
# Q-LoRA training steps of a 7B-class Qwen2.5-VL (s/it, peak memory), one sampling step at the full vocabulary,
# batched vs the row-by-row sampler before it (time, waits for the device), and the CUDA kernels a decode step
# launches (`bench/step_ops.py`). Prints one table (and writes it to
# $OUT/gpu_check.md when OUT is set), then exits with the number of failed checks. Budget: 9 minutes on one H200
# (the limits below add up to 595 s, plus the wheels' install; the first run, 2026-12-04, took 314 s with the serving
# row cut at its then 180 s before its memory part), inside the 600 s of one device call; each check has its own
# limit, so one that hangs cannot eat the others', and its row says "running" until it ends, so a run cut short from
# outside still shows which check it was in. A rerun in the same lease can name only the rows it needs
# (GPU_CHECK_ONLY="gpu_tests serve_v1_memory"; the environment row always runs). Rows beyond the budget run only
# when named: serve_qwen25vl_7b (Qwen2.5-VL-7B's LoRA rows with and without decode graphs; a second call, 240 s),
# fused_siblings (decode-step time of a small Qwen2.5-VL with its sibling layers fused and apart; 90 s),
# serve_v1_latency (the serving row's latency lines alone, if that row was cut before them; 150 s), engine_process
# (a small v1 in bf16, 64 streams, the engine in a thread vs a process of its own; 120 s), prep_beside_decode (a small
# Qwen2.5-VL in bf16 decoding 16 streams while image requests are prepared in its process or another; 150 s).
#
# The device machine has PyTorch but not every pinned package this project needs (transformers 5.24, peft,
# pydantic, llguidance, bitsandbytes, deepspeed): `bash bench/gpu_wheels.sh` here fetches them as Python 3.12 wheels into
# .whl/ (git-ignored); carry `.whl` with the run and they are installed into /tmp/site first. Before spending
# device time, `bash bench/gpu_dryrun.sh` runs this same script here, on the CPU with tiny presets, in an environment
# holding only what the device image holds.
#   device run:  bash bench/gpu_check.sh        (carry: [".whl"], timeout_s: 600)
# Settings (the dry run's): GPU_CHECK_ONLY (row names, space-separated; default all), GPU_CHECK_DEVICE (cuda),
# GPU_CHECK_SMOKE=1 (tiny presets, short runs), GPU_CHECK_LIMIT_SCALE (each check's limit times this; 1, or 5 in
# the dry run, where the limits only catch hangs: a loaded 2-core machine took over 40 s to import the environment
# row's packages), GPU_CHECK_WHEELS
# (.whl), GPU_CHECK_SITE (/tmp/site), GPU_CHECK_PYTEST_MARK (smoke only: a marker the gpu_tests row selects by),
# PYTHON (python3).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
device=${GPU_CHECK_DEVICE:-cuda}
wheels=${GPU_CHECK_WHEELS:-.whl}
site=${GPU_CHECK_SITE:-/tmp/site}
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
if [ -d "$wheels" ] && ls "$wheels"/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" "$wheels"/*.whl \
    && export PYTHONPATH="$site:$PWD" || { echo "installing the carried wheels failed"; exit 1; }
fi
scale=1
if [ "${GPU_CHECK_SMOKE:-0}" = 1 ]; then  # the dry run's sizes: every code path, tiny models, seconds each
  tests=(tests/serving/test_engine_devices.py tests/serving/test_engine_faults.py tests/serving/test_decode_graphs.py
    tests/serving/test_engine_vision_adapters.py tests/serving/test_lora_batch.py tests/core/test_registry_materialize.py
    tests/core/families/test_fused_rotary.py tests/serving/test_kv_cache.py tests/training/test_trainer_devices.py)
  # (the CPU cases too, unless GPU_CHECK_PYTEST_MARK selects (CI: gpu))
  [ -n "${GPU_CHECK_PYTEST_MARK:-}" ] && tests=(-m "$GPU_CHECK_PYTEST_MARK" "${tests[@]}")
  serve=(--preset qwen-vl-tiny --requests 8 --tokens 8 --latency-requests 8 --varied-tokens 2,8 --decode-graphs static
    --latency-batch 4)
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
  # latency rows at the GPU's default batch (64): whole prefills, then the CPU's and the GPU's default
  # prefill_chunk_tokens (512, 2048); then at the CPU's default batch (16, the GPU's before 2026-12-05)
  serve=(--preset qwen-vl-chat --requests 32 --tokens 32 --varied-tokens 4,32 --decode-graphs cuda --prefill-chunk 512,2048
    --latency-batch 16)
  serve_family=(--preset qwen2.5-vl-7b --requests 32 --tokens 32 --decode-graphs cuda)
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
OPT_IN="serve_qwen25vl_7b fused_siblings serve_v1_latency engine_process prep_beside_decode"  # rows run only when GPU_CHECK_ONLY names them (one call's
# 600 s are spent)
check() {  # check NAME LIMIT_S COMMAND...
  local name=$1 limit=$(($2 * ${GPU_CHECK_LIMIT_SCALE:-$scale})); shift 2
  local start=$SECONDS status=ok
  local named=0; [[ " ${GPU_CHECK_ONLY:-} " == *" $name "* ]] && named=1
  [[ " $OPT_IN " == *" $name "* ]] && [ "$named" = 0 ] && return 0  # rows beyond the budget: only when named
  [ "$name" = environment ] || [ -z "${GPU_CHECK_ONLY:-}" ] || [ "$named" = 1 ] || return 0
  echo "| $name | running (limit $limit s) | | |" >> "$table"
  timeout -k 10 "$limit" "$@" > "$logs/$name.log" 2>&1 || { status="FAILED ($?)"; failed=$((failed + 1)); }
  local row="| $name | $status | $((SECONDS - start)) | $(tail -n 4 "$logs/$name.log" | tr '\r\n|' '  /' | cut -c1-300) |"  # (\r: progress bars)
  grep -v "^| $name | running " "$table" > "$table.tmp"; echo "$row" >> "$table.tmp"; mv "$table.tmp" "$table"
}
# What the run imports, and from where: a package the image lacks fails here in seconds, not deep inside a check.
check environment 40 $PY -c "
import sys, torch, transformers, peft, pydantic, llguidance, bitsandbytes, deepspeed, safetensors, tiktoken, PIL
print(sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda,
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU',
      *(f'{m.__name__} {m.__version__}' for m in (transformers, peft, pydantic, bitsandbytes, deepspeed)))
torch.zeros(1, device='$device')"
check gpu_tests 120 $PY -m pytest -q -rP -p no:cacheprovider "${tests[@]}"
check sampling_step 20 $PY bench/sampling_step.py --device "$device" "${sampling[@]}"
check serve_v1_full_bf16 200 $PY bench/serving_throughput.py --device "$device" --dtype bfloat16 --adapters 8 \
  --rank 16 --repeats 1 --skip-loads --memory-requests 0 "${serve[@]}"
check serve_v1_memory 90 $PY bench/serving_throughput.py --device "$device" --dtype bfloat16 --memory-only \
  --before-rev "" "${memory[@]}"
check train_qwen25vl_7b 80 $PY bench/train_families.py --device "$device" --rounds 1 "${train[@]}"
# kernels per decode step, base / one adapter / 8 mixed (2-layer model: what a layer adds, fused rms_norm or not)
check step_kernels 45 $PY bench/step_ops.py --device "$device" --dtype bfloat16 --preset qwen-vl-tiny --before-rev "" \
  --steps-only
# opt-in (a second call of the lease): Qwen2.5-VL-7B serving, 8 adapters, with and without decode graphs
check serve_qwen25vl_7b 240 $PY bench/serving_throughput.py --device "$device" --dtype bfloat16 --adapters 8 \
  --rank 16 --repeats 1 --skip-loads --memory-requests 0 --lora-only "${serve_family[@]}"
# opt-in: decode-step time with the base's sibling layers as one matmul per group vs apart (fuse_siblings on / off)
check fused_siblings 90 $PY bench/fused_siblings.py --device "$device" "${fused[@]}"
# opt-in: the serving row's latency lines alone (TTFT and its parts, the longest gap, per prefill budget), for when
# that row ran out of its limit before them
check serve_v1_latency 150 $PY bench/serving_throughput.py --device "$device" --dtype bfloat16 --adapters 8 \
  --rank 16 --latency-only "${latency[@]}"
# opt-in: the engine in a thread vs a process of its own while the caller's loop works per item read, as a Serve
# replica's does (its GIL against the model thread's; no Ray on the device machine)
check engine_process 120 $PY bench/engine_process.py --device "$device" "${process[@]}"
# opt-in: image requests prepared in the engine's process (a thread, as its preprocessing pool does) vs in another
# (as a replica does for its engine's child): what the model thread loses to the preparation's hold on the GIL
check prep_beside_decode 150 $PY bench/prep_beside_decode.py --device "$device" "${prep[@]}"
cat "$table"
exit "$failed"
