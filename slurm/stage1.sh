#!/bin/bash
# Stage 1 of dser on Slurm: adaptors + head trained on a source (acted) corpus, on one node or many.
#
#   sbatch slurm/stage1.sh RUN_DIR CONFIG [--set KEY=VALUE …]
#
#   sbatch slurm/stage1.sh runs/demo-s1 dser/configs/demo_stage1.yaml
#   sbatch --nodes=2 --gpus-per-node=4 --ntasks-per-node=4 slurm/stage1.sh runs/s1 my.yaml   # 8 GPUs
#   sbatch --gpus-per-node=0 --ntasks-per-node=2 --cpus-per-task=4 slurm/stage1.sh …         # CPU, 2 ranks
#   SBATCH_TIMELIMIT=4:00:00 SBATCH_PARTITION=gpu sbatch slurm/stage1.sh …
#
# RUN_DIR is where the run writes (config.yaml, checkpoints/, tensorboard/, export/,
# metrics.json, finished.json last). Submitting again with the same RUN_DIR resumes it, or does nothing once it
# has finished. Stage 2 starts from it: slurm/stage2.sh … RUN_DIR.
#
# The #SBATCH lines below are defaults. Override them on the sbatch command line, or with
# Slurm's input variables set before sbatch (command line > environment > these lines):
# SBATCH_TIMELIMIT, SBATCH_PARTITION, SBATCH_ACCOUNT, SBATCH_QOS, SBATCH_GPUS_PER_NODE,
# SBATCH_SIGNAL, SBATCH_OUTPUT, SBATCH_JOB_NAME, SBATCH_EXPORT. Keep --ntasks-per-node equal
# to the GPUs per node (one rank per GPU). Paths and the venv: slurm/env.sh. How ranks start,
# resume and requeue: slurm/launch.sh.
#
#SBATCH --job-name=dser-stage1
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=1
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
#SBATCH --signal=USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm/logs/%x-%j.out
#
# (--cpus-per-task: per rank, for data-loader workers and OpenMP; --signal: 5 minutes before
# the time limit every rank checkpoints and the job requeues itself; --open-mode=append keeps
# one log across restarts.)
set -uo pipefail

if [[ -z ${DSER_HOME:-} ]]; then
  # sbatch runs a spooled copy of this file; Slurm's record of the job names the original.
  me=${SLURM_JOB_ID:+$(scontrol show job "$SLURM_JOB_ID" | grep -oP '^\s*Command=\K\S+')}
  DSER_HOME=$(cd "$(dirname "${me:-${BASH_SOURCE[0]}}")/.." && pwd)
fi
source "$DSER_HOME/slurm/env.sh"
source "$DSER_HOME/slurm/launch.sh"

if (($# < 2)) || [[ $1 == -* || $2 == -* ]]; then
  echo "usage: sbatch slurm/stage1.sh RUN_DIR CONFIG [--set KEY=VALUE …]" >&2
  exit 2
fi
run_dir=$1 config=$2
shift 2
dser_train_job 1 "$run_dir" --config "$config" "$@"
