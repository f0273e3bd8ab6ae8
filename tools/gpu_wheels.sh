#!/usr/bin/env bash
# Wheels for tools/gpu_check.py on a GPU machine where only torch is installed and nothing can be downloaded:
# megatron-core and megatron_papo's Python dependencies (and transformers, the reference of check section 2),
# for one Python version and manylinux x86-64, into .gpu_wheels/ (git-ignored). `make gpu-check` installs
# from there with `pip install --no-index --find-links .gpu_wheels`, taking what the machine already has.
#
#   tools/gpu_wheels.sh                       # Python 3.12 (the lent H200 machines' python3)
#   GPU_PYTHON=3.11 tools/gpu_wheels.sh       # another target Python
#   GPU_WHEELS_HF=0 tools/gpu_wheels.sh       # without transformers (section 2 then fails where it is absent)
#
# torch and its own dependencies (sympy, mpmath, jinja2, networkx, filelock, fsspec, typing-extensions) are
# never downloaded: the target has them. --no-deps with an explicit list keeps pip from pulling a CUDA torch.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${GPU_WHEELS_DIR:-.gpu_wheels}
PY=${GPU_PYTHON:-3.12}
PIP=${PIP:-python3 -m pip}
# megatron-core without its dependencies (it asks for torch); everything else with them, resolved for the target
# (none of them asks for torch). tensorboard and pyarrow are not needed by the check: left out.
DEPS="numpy packaging pyyaml pillow psutil safetensors sentencepiece tqdm webdataset mathruler==0.1.0 pylatexenc"
HF="transformers>=5.0,<6"   # section 2 compares against transformers generate
[ "${GPU_WHEELS_HF:-1}" = 0 ] && HF=""
TARGET=(--only-binary=:all: --python-version "$PY" --implementation cp --platform manylinux_2_28_x86_64
        --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
        --platform manylinux1_x86_64 --platform any -d "$OUT")
mkdir -p "$OUT" && rm -f "$OUT"/*.whl
$PIP download -q --no-deps "${TARGET[@]}" megatron-core==0.16.1
# shellcheck disable=SC2086
$PIP download -q "${TARGET[@]}" $DEPS $HF
echo "$(ls "$OUT" | wc -l) wheels in $OUT: $(du -sm "$OUT" | cut -f1) MiB (the device runner carries at most 64 MiB with the tree)"
