#!/usr/bin/env bash
# The wheels the GPU test machine lacks (../shared/notes/gpu.md: Python 3.12, torch 2.11+cu130,
# transformers 5.17; no pydantic, bitsandbytes, deepspeed, liger-kernel), at the pins of
# hack/constraints.txt, into one folder (default .gpu-wheels, under 64 MiB) for bench/gpu_check.py.
# There:  pip install --no-index --no-deps --target /tmp/site .gpu-wheels/*.whl
#         PYTHONPATH=/tmp/site:contract:operator:trainer:hack python bench/gpu_check.py --out /tmp/r.json
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-.gpu-wheels}
PY=${PY:-$HOME/.cache/kubetune/venv/bin/python}
pin() { grep -i "^$1==" hack/constraints.txt | head -1; }
mkdir -p "$OUT"
PKGS=(bitsandbytes liger-kernel pydantic pydantic_core annotated-types typing-inspection hjson transformers peft
      nvidia-ml-py safetensors tokenizers huggingface_hub)
PINS=()
for p in "${PKGS[@]}"; do PINS+=("$(pin "$p")"); done
"$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d "$OUT" "${PINS[@]}"
# DeepSpeed has no wheel on PyPI: build a pure-Python one from the sdist, ops not prebuilt (torch_adam).
if ! ls "$OUT"/deepspeed-*.whl >/dev/null 2>&1; then
  tmp=$(mktemp -d)
  "$PY" -m pip download --no-deps --no-binary=:all: -d "$tmp" "$(pin deepspeed)"
  DS_BUILD_OPS=0 "$PY" -m pip wheel --no-deps --no-build-isolation -w "$OUT" "$tmp"/deepspeed-*.tar.gz
  rm -rf "$tmp"
fi
du -sh "$OUT"
