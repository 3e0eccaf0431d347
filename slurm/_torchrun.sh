#!/bin/bash
# Shared body of the sbatch scripts (sourced, not submitted). Expects CONFIG, STAGES, NPROC_PER_NODE
# and EXTRA_ARGS from the calling script; starts one torchrun per node with srun.
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}

# Rendezvous: the first host of the allocation, a port derived from the job id.
HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
PORT=$((20000 + SLURM_JOB_ID % 20000))
if [ "$NPROC_PER_NODE" = auto ]; then
    NPROC_PER_NODE=$("$PYTHON" -c "import torch; print(torch.cuda.device_count() or 1)")
fi
echo "job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $SLURM_JOB_NODELIST: $SLURM_NNODES node(s) x $NPROC_PER_NODE, rendezvous $HEAD_NODE:$PORT"

# Near the time limit SLURM sends USR1 to this shell (--signal=B:USR1@...): requeue the job. The
# requeue sends SIGTERM to the step; torchrun passes it to the ranks, which agree to stop, save and exit 0.
# The requeued job runs this script again with the same arguments, and the run resumes.
trap 'echo "time limit near: requeueing $SLURM_JOB_ID"; scontrol requeue "$SLURM_JOB_ID"' USR1

# Slurm 22.05-23.02 do not pass the job's --cpus-per-task on to srun: without it torchrun and its
# ranks would share one core. Pass it on explicitly when the job set it.
CPUS=()
if [ -n "${SLURM_CPUS_PER_TASK:-}" ]; then CPUS=(--cpus-per-task="$SLURM_CPUS_PER_TASK"); fi

srun --ntasks-per-node=1 ${CPUS[@]+"${CPUS[@]}"} --kill-on-bad-exit=1 \
    "$PYTHON" -m torch.distributed.run \
        --nnodes="$SLURM_NNODES" --nproc_per_node="$NPROC_PER_NODE" \
        --rdzv_backend=c10d --rdzv_endpoint="$HEAD_NODE:$PORT" --rdzv_id="$SLURM_JOB_ID" \
        run_experiments.py --config "$CONFIG" --stages "$STAGES" $EXTRA_ARGS &
STEP=$!
# `wait` returns early when a trapped signal arrives; keep waiting for the step itself.
while kill -0 "$STEP" 2>/dev/null; do
    wait "$STEP" && RC=0 || RC=$?
done
exit "${RC:-0}"
