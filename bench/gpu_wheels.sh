#!/usr/bin/env bash
# Downloads (here, where PyPI is reachable) the wheels that bench/gpu_check.sh installs on the device machine: what
# its image lacks or holds at another version (bench/device_packages.txt lists what it holds). Default: Python 3.12
# x86-64 wheels into .whl/ (git-ignored through .git/info/exclude), carried with the device run.
#   bash bench/gpu_wheels.sh [DIR] [PYTHON_VERSION]      (bench/gpu_dryrun.sh: a 3.11 set for the dry run here)
# The device image has huggingface_hub 1.33 and tokenizers 0.23.2, which transformers 5.24 accepts; carrying newer
# ones would pull packages the image lacks (huggingface_hub 2 needs httpx2). bitsandbytes (Q-LoRA) is stripped to
# its CUDA 13 and CPU libraries (the image's torch is built for CUDA 13.0): 7 MB instead of 43 MB, so that the wheels
# and the working tree stay under the 64 MiB a device call carries.
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${1:-.whl}
pyver=${2:-3.12}
if [ "$dir" = .whl ]; then
  grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
fi
mkdir -p "$dir"
platforms=()
for n in 2_17 2_24 2_27 2_28 2_31 2_34 2_35; do platforms+=(--platform "manylinux_${n}_x86_64"); done
platforms+=(--platform manylinux2014_x86_64 --platform any)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$pyver" --implementation cp \
  "${platforms[@]}" -d "$dir" transformers==5.24.0 peft==0.21.2 llguidance==1.9.1 pydantic==2.14.4 \
  pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 bitsandbytes==0.50.2 hjson==3.1.0
# DeepSpeed (ZeRO-2 / ZeRO-3 training) ships only as a source package: built here into a pure-Python wheel (its ops
# compile on first use, none of which our trainer needs), with the project's environment (make install) for torch.
"${BUILD_PYTHON:-.venv/bin/python}" -m pip wheel -q --no-deps --no-build-isolation -w "$dir" deepspeed==0.19.8
for wheel in "$dir"/bitsandbytes-*.whl; do
  unwanted=$(python3 -m zipfile -l "$wheel" | awk '{print $1}' | grep -E '\.so$' | grep -vE '_cuda13[0-9]\.so$|_cpu\.so$' || true)
  [ -z "$unwanted" ] || zip -q -d "$wheel" $unwanted
done
# The "before" side of bench/sampling_step.py's A/B: the device copy of the tree has no git history.
git show c039973:qwenvl_core/generation.py > "$dir/generation-before.py"
ls "$dir"
du -sh "$dir"
