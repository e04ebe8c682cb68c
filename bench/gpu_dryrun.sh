#!/usr/bin/env bash
# The dry run of bench/gpu_check.sh, here, before any device time is spent: the same script on the CPU with tiny
# presets (GPU_CHECK_DEVICE=cpu GPU_CHECK_SMOKE=1), every pass, in a virtual environment that holds only what the
# device image holds (bench/device_packages.txt) plus the wheels bench/gpu_wheels.sh fetches (a Python 3.11 set of
# the same packages, installed by gpu_check.sh exactly as on the device). A package the image lacks, a wheel that will not
# install, or an argument a benchmark no longer takes fails here in about two minutes instead of on the device.
#   bash bench/gpu_dryrun.sh            (the environment is kept in $DRYRUN_VENV, default /tmp/qwenvl-device-like)
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${DRYRUN_VENV:-/tmp/qwenvl-device-like}
wanted=$(sha256sum bench/device_packages.txt | cut -d' ' -f1)
if [ "$(cat "$venv/.packages" 2>/dev/null)" != "$wanted" ]; then  # new, or the package list changed: rebuilt
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --no-deps torch==2.13.0 -r bench/device_packages.txt
  echo "$wanted" > "$venv/.packages"
fi
rm -rf "$venv/wheels" "$venv/site"
bash bench/gpu_wheels.sh "$venv/wheels" 3.11 > /dev/null
OUT=${OUT:-$venv/out} PYTHON="$venv/bin/python" GPU_CHECK_WHEELS="$venv/wheels" GPU_CHECK_SITE="$venv/site" \
  GPU_CHECK_DEVICE=cpu GPU_CHECK_SMOKE=1 GPU_CHECK_PASS="${GPU_CHECK_PASS:-1 2 3 4}" bash bench/gpu_check.sh
