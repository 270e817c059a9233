#!/bin/bash
# Stage 2 of dser on Slurm: adapt a finished stage-1 run to a target (natural) corpus.
#
#   sbatch [--dependency=afterok:STAGE1_JOB] slurm/stage2.sh RUN_DIR CONFIG STAGE1_RUN_DIR [--set KEY=VALUE …]
#
#   s1=$(sbatch --parsable slurm/stage1.sh runs/demo-s1 dser/configs/demo_stage1.yaml)
#   sbatch --dependency=afterok:$s1 slurm/stage2.sh runs/demo-s2 dser/configs/demo_stage2.yaml runs/demo-s1
#
# With --dependency=afterok the job starts only once stage 1 has succeeded; if stage 1 fails it
# stays pending (Reason=DependencyNeverSatisfied) until cancelled. It also refuses to start
# from a stage-1 run that has not finished (no finished.json). RUN_DIR, resuming, requeueing and the #SBATCH
# defaults work as in slurm/stage1.sh (overrides: sbatch options or SBATCH_* variables).
#
#SBATCH --job-name=dser-stage2
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=1
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
#SBATCH --signal=USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm/logs/%x-%j.out
set -uo pipefail

if [[ -z ${DSER_HOME:-} ]]; then
  # sbatch runs a spooled copy of this file; Slurm's record of the job names the original.
  me=${SLURM_JOB_ID:+$(scontrol show job "$SLURM_JOB_ID" | grep -oP '^\s*Command=\K\S+')}
  DSER_HOME=$(cd "$(dirname "${me:-${BASH_SOURCE[0]}}")/.." && pwd)
fi
source "$DSER_HOME/slurm/env.sh"
source "$DSER_HOME/slurm/launch.sh"

if (($# < 3)) || [[ $1 == -* || $2 == -* || $3 == -* ]]; then
  echo "usage: sbatch slurm/stage2.sh RUN_DIR CONFIG STAGE1_RUN_DIR [--set KEY=VALUE …]" >&2
  exit 2
fi
run_dir=$1 config=$2 init_from=$3
shift 3
if [[ $(dser_run_status "$init_from") != finished ]]; then
  echo "dser: error: stage-1 run $init_from has not finished (no finished.json): run stage 1 first" >&2
  exit 2
fi
dser_train_job 2 "$run_dir" --config "$config" --init-from "$init_from" "$@"
