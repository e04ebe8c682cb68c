#!/usr/bin/env bash
# Downloads (here, where PyPI is reachable) the Python 3.12 x86-64 wheels that bench/gpu_check.sh installs on the
# device machine, whose image has PyTorch but not these pins. Into .whl/ (ignored by git via .git/info/exclude).
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
mkdir -p .whl
platforms=()
for n in 2_17 2_27 2_28 2_34; do platforms+=(--platform "manylinux_${n}_x86_64"); done
platforms+=(--platform manylinux2014_x86_64 --platform any)
# bitsandbytes (Q-LoRA) is left out: its wheel alone is near the 64 MiB a device call carries.
for pkg in transformers==5.24.0 peft==0.21.2 llguidance==1.9.1 huggingface_hub==2.4.0 tokenizers==0.23.3; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" -d .whl "$pkg"
done
du -sh .whl
