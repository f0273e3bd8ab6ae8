# megatron_papo on an NGC PyTorch container: the GPU stack (CUDA, cuDNN, NCCL, PyTorch, Transformer Engine, apex)
# comes from NVIDIA's image, this file adds only megatron-core and megatron_papo's pure-Python dependencies.
#
#   make docker                                  # = docker build -t megatron-papo:latest .
#   docker run --gpus all --ipc=host --rm -it -v "$PWD:/workspace/run" -w /workspace/run megatron-papo:latest \
#       megatron-papo train --config /opt/megatron_papo/examples/qwen2.5-vl-3b_papo_g.yaml --dry-run
# For SLURM + pyxis/enroot: `enroot import dockerd://megatron-papo:latest` makes a .sqsh file to pass as
# CONTAINER_IMAGE to examples/slurm/*.sbatch (docs/cluster.md, step 0).
#
# Base image pinned: nvcr.io/nvidia/pytorch:25.12-py3 is PyTorch 2.10.0a0+b4e4ee81d3 (NVIDIA build) on CUDA 13.1,
# Python 3.12, Ubuntu 24.04, and ships Transformer Engine (FP8) and apex (fused kernels). Their exact versions are
# printed during the build and kept in /opt/megatron_papo/BASE_VERSIONS. megatron-core 0.16.1 asks for torch >= 2.6
# and is tested upstream with Transformer Engine 2.9 - 2.11. Another tag: docker build --build-arg BASE_IMAGE=...
ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:25.12-py3
FROM ${BASE_IMAGE}

ENV PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    CUDA_DEVICE_MAX_CONNECTIONS=1

WORKDIR /opt/megatron_papo

# Record what the base image carries before anything is installed.
RUN python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" > BASE_VERSIONS \
    && (pip list 2>/dev/null | grep -iE '^(transformer[-_]engine|apex) ' >> BASE_VERSIONS || true) \
    && cat BASE_VERSIONS

# Dependencies first (a layer that survives code edits): install the package's requirements from setup.py alone.
# The NGC image's /etc/pip/constraint.txt (PIP_CONSTRAINT) pins torch and the other packages it ships, so pip may
# add packages but never replace NVIDIA's torch; a conflict fails the build here instead of breaking CUDA at run time.
COPY setup.py README.md ./
RUN mkdir megatron_papo && touch megatron_papo/__init__.py \
    && if [ -f /etc/pip/constraint.txt ]; then set -- -c /etc/pip/constraint.txt; fi \
    && pip install "$@" ".[hf]" \
    && pip uninstall -y megatron_papo \
    && rm -rf megatron_papo build

COPY megatron_papo ./megatron_papo
COPY tools ./tools
COPY examples ./examples
COPY tests ./tests
COPY benchmarks ./benchmarks
COPY docs ./docs
COPY Makefile pytest.ini ./
# The build has no GPU: check only what needs none (torch untouched, every example config valid, the CLI starts).
RUN pip install --no-deps . \
    && python -c "import torch, sys; v = open('BASE_VERSIONS').read().split()[1]; \
sys.exit(0 if torch.__version__ == v else f'pip replaced the base torch {v} by {torch.__version__}')" \
    && python -c "import glob; from megatron_papo.config import load_config; \
[load_config(p) for p in sorted(glob.glob('examples/*.yaml'))]" \
    && megatron-papo --help > /dev/null

WORKDIR /workspace
