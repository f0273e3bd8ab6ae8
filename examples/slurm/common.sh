# shellcheck shell=bash
# Sourced by the sbatch scripts in this directory (not run on its own). It holds what every job needs:
#   - the optional pyxis/enroot container flags for srun (CONTAINER_IMAGE set: on; empty: run on the host),
#   - the rendezvous address (first node of the allocation) and port,
#   - pre-emption handling: SIGUSR1 (sent by `#SBATCH --signal=B:USR1@<seconds>` before the time limit) and SIGTERM
#     are forwarded to the running step, whose trainer saves a checkpoint and exits; after a SIGUSR1 the job
#     requeues itself and the next start continues from that checkpoint with `--resume auto`,
#   - path overrides: each non-empty path variable becomes a `--set` of the trainer.
# Every variable can be set in the environment before `sbatch` (sbatch exports it to the job) or edited in the
# "site settings" block at the top of each script.

# Print a line to the job log with a time stamp.
mp_log() {
    echo "[$(date '+%Y-%m-%d %H:%M:%S')] $*"
}

# Fill MP_CONTAINER_ARGS with the srun flags of the pyxis plugin (empty when CONTAINER_IMAGE is empty).
mp_container_args() {
    MP_CONTAINER_ARGS=()
    if [[ -n "${CONTAINER_IMAGE:-}" ]]; then
        # The checkout is mounted at the same path so relative paths (configs, data, runs/) resolve identically.
        MP_CONTAINER_ARGS+=("--container-image=${CONTAINER_IMAGE}"
                            "--container-mounts=${CONTAINER_MOUNTS:-${MEGATRON_PAPO_DIR}:${MEGATRON_PAPO_DIR}}"
                            "--container-workdir=${MEGATRON_PAPO_DIR}")
    fi
}

# Export MASTER_ADDR (first host of the allocation) and MASTER_PORT (derived from the job id, as the platform
# layer does when it reads SLURM variables itself) unless already set.
mp_rendezvous() {
    if [[ -z "${MASTER_ADDR:-}" ]]; then
        MASTER_ADDR=$(scontrol show hostnames "${SLURM_JOB_NODELIST}" | head -n 1)
    fi
    MASTER_PORT=${MASTER_PORT:-$((20000 + ${SLURM_JOB_ID:-0} % 20000))}
    export MASTER_ADDR MASTER_PORT
}

# Fill MP_PATH_ARGS with `--set` overrides for every non-empty site path variable.
mp_path_overrides() {
    MP_PATH_ARGS=()
    [[ -n "${RUN_DIR:-}" ]] && MP_PATH_ARGS+=(--set "checkpoint.dir=${RUN_DIR}/checkpoints"
                                              --set "logging.tensorboard_dir=${RUN_DIR}/tensorboard")
    [[ -n "${TRAIN_SHARDS:-}" ]] && MP_PATH_ARGS+=(--set "data.train_shards=${TRAIN_SHARDS}")
    [[ -n "${VAL_SHARDS:-}" ]] && MP_PATH_ARGS+=(--set "data.val_shards=${VAL_SHARDS}")
    [[ -n "${MODEL_LOAD:-}" ]] && MP_PATH_ARGS+=(--set "model.load=${MODEL_LOAD}")
    [[ -n "${TOKENIZER_DIR:-}" ]] && MP_PATH_ARGS+=(--set "data.tokenizer.path=${TOKENIZER_DIR}")
    return 0
}

# One header per start of the job (a requeued job appends to the same log: --open-mode=append).
mp_header() {
    mp_log "job ${SLURM_JOB_ID:-?} (${SLURM_JOB_NAME:-?}) start $((${SLURM_RESTART_COUNT:-0} + 1)):" \
        "${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}} node(s) ${SLURM_JOB_NODELIST:-?}, ${SLURM_NTASKS:-?} task(s)," \
        "rendezvous ${MASTER_ADDR:-?}:${MASTER_PORT:-?}, container ${CONTAINER_IMAGE:-none}"
}

# Signal handler: remember the signal and pass it on to the step (srun forwards it to every task).
# MP_FORWARD_SIGNAL replaces the signal passed on (train_torchrun.sbatch: TERM, which every torchrun handles).
mp_on_signal() {
    MP_SIGNAL=$1
    local fwd=${MP_FORWARD_SIGNAL:-$1}
    mp_log "received SIG$1: sending SIG${fwd} to the training step so that it checkpoints and exits"
    if [[ -n "${MP_STEP_PID:-}" ]]; then
        kill -s "${fwd}" "${MP_STEP_PID}" 2>/dev/null || true
    fi
}

# Run a job step in the background so the batch shell can take signals while it runs (bash runs traps only
# between commands, and `wait` returns early when one arrives). Requeue after a SIGUSR1 (time limit near);
# a SIGTERM (scancel, or scheduler pre-emption, which requeues by itself with --requeue) only checkpoints.
# Returns the step's exit status.
mp_run_step() {
    MP_SIGNAL=""
    trap 'mp_on_signal USR1' USR1
    trap 'mp_on_signal TERM' TERM
    "$@" &
    MP_STEP_PID=$!
    local rc
    while true; do
        rc=0
        wait "${MP_STEP_PID}" || rc=$?
        # A status above 128 with the step still alive means a trapped signal interrupted `wait`.
        if (( rc > 128 )) && kill -0 "${MP_STEP_PID}" 2>/dev/null; then
            continue
        fi
        break
    done
    trap - USR1 TERM
    mp_log "step finished with status ${rc}"
    # 75 (EX_TEMPFAIL) is the trainer's "stopped by a signal after saving its checkpoint": resumable, not done.
    # It needs one RL step plus one checkpoint save of grace after the signal (#SBATCH --signal=B:USR1@<seconds>).
    if (( rc == 75 )) || { [[ -n "${MP_SIGNAL}" ]] && (( rc == 143 )); }; then
        mp_log "the trainer checkpointed and stopped early (pre-empted, exit 75); --resume auto continues it"
    fi
    if [[ "${MP_SIGNAL}" == "USR1" ]]; then
        if (( ${SLURM_RESTART_COUNT:-0} < ${MAX_REQUEUES:-20} )); then
            mp_log "requeueing job ${SLURM_JOB_ID}; the next start resumes from the newest checkpoint"
            scontrol requeue "${SLURM_JOB_ID}"
            # pre-empted, saved and requeued: this start did what it should (143: srun --kill-on-bad-exit ended
            # the peers of a rank that had already exited 75 after the shared save)
            if (( rc == 75 || rc == 143 )); then rc=0; fi
        else
            mp_log "not requeueing: already restarted ${SLURM_RESTART_COUNT} times (MAX_REQUEUES=${MAX_REQUEUES:-20})"
        fi
    fi
    return "${rc}"
}
