#!/bin/bash
# Submit any script of this directory with the site's settings in one place: edit the block below once (or export
# the variables), then
#   examples/slurm/submit.sh [sbatch options] examples/slurm/<script>.sbatch [arguments for the job]
# e.g. CONFIG=examples/qwen2.5-vl-7b_papo_g.yaml examples/slurm/submit.sh examples/slurm/train.sbatch
# Run it from the repository root: the jobs run there and write logs/<job name>-<job id>.out.

# ---- site settings -----------------------------------------------------------------------------------------------
: "${ACCOUNT:=}"            # sbatch --account (empty: the cluster's default)
: "${PARTITION:=}"          # sbatch --partition (empty: the cluster's default)
: "${QOS:=}"                # sbatch --qos (empty: none)
: "${CONTAINER_IMAGE:=}"    # pyxis/enroot image, e.g. a squashfs made with `enroot import` (empty: no container)
: "${CONTAINER_MOUNTS:=}"   # extra pyxis mounts src:dst[,src:dst] (empty: the checkout at the same path)
: "${RUN_DIR:=}"            # checkpoints + tensorboard of training jobs (empty: the config's paths)
: "${TRAIN_SHARDS:=}"       # training shards (empty: the config's data.train_shards)
: "${MODEL_LOAD:=}"         # megatron checkpoint written by hf-to-mcore (empty: the config's model.load)
: "${TOKENIZER_DIR:=}"      # Hugging Face checkpoint directory with the tokenizer (empty: the config's)
# ------------------------------------------------------------------------------------------------------------------
set -euo pipefail
export CONTAINER_IMAGE CONTAINER_MOUNTS RUN_DIR TRAIN_SHARDS MODEL_LOAD TOKENIZER_DIR
args=()
[[ -n "${ACCOUNT}" ]] && args+=("--account=${ACCOUNT}")
[[ -n "${PARTITION}" ]] && args+=("--partition=${PARTITION}")
[[ -n "${QOS}" ]] && args+=("--qos=${QOS}")
mkdir -p logs   # sbatch does not create the directory of --output
exec sbatch "${args[@]}" "$@"
