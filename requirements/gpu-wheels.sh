#!/usr/bin/env bash
# Wheels of the packages vascdist needs that a GPU node's image may lack, for a node that has torch, torchaudio,
# h5py, scipy, scikit-learn and tensorboard but cannot reach a package index (a device machine of this workplace).
# Run here, from anywhere in the repository; carry the folder along and install it there with
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
# Versions are those of requirements/lock.txt. DeepSpeed publishes only a source archive: its wheel is built here
# (pure Python; its CUDA ops are compiled on first use, and ZeRO-2 with vascdist's optimisers needs none); the others
# are fetched for the node's Python (GPU_PYTHON, default 3.12) and x86-64 Linux.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-.whl}
python=${GPU_PYTHON:-3.12}
# What the image lacks: DeepSpeed and its pydantic/hjson, submitit, soundfile and its cffi. typing_extensions
# travels too: pydantic needs a recent one, and a newer one serves everything an older one did.
fetched=(hjson pydantic pydantic_core annotated-types typing-inspection typing_extensions submitit soundfile cffi pycparser)
pin() { grep -i -m1 "^$1==" requirements/lock.txt || { echo "gpu-wheels: $1 is not in requirements/lock.txt" >&2; exit 2; }; }
rm -rf "$out" && mkdir -p "$out"
python3 -m pip wheel -q --no-deps --no-build-isolation -w "$out" "$(pin deepspeed)"
pins=(); for p in "${fetched[@]}"; do pins+=("$(pin "$p")"); done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$python" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d "$out" "${pins[@]}"
echo "wrote $(ls "$out" | wc -l) wheels ($(du -sh "$out" | cut -f1)) to $out for Python $python:"
ls "$out"
