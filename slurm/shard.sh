#!/bin/bash
# Shard several corpora on Slurm: an array job, one task per corpus of a grid file's corpora.
#
#   sbatch --array=0-N slurm/shard.sh [GRID_FILE]      # task i shards corpus i (default slurm/grid.yaml)
#
#   sbatch --array=0-1 slurm/shard.sh                  # the two demo corpora
#   sbatch --array=0-4%2 --cpus-per-task=16 slurm/shard.sh my_grid.yaml   # five, two at a time
#
# Corpus i is the i-th under `corpora:` (`dser grid GRID_FILE corpora` lists them in order).
# The task is `dser grid-shard GRID_FILE i`, which decides everything and runs
# `dser shard --workers <cpus> [its shard: options] -- READER ROOT $SHARDS_DIR/NAME`. The grid
# is data, never sourced (a bash grid, grid.sh, is refused). Readers synth-acted and
# synth-natural are the demo corpora: generated first with `dser synth` into ROOT (unless
# ROOT/manifest.jsonl exists; SYNTH_ARGS adds options, e.g. "--utterances 96"), then sharded
# with the manifest reader. A corpus whose $SHARDS_DIR/NAME/index.json exists is kept
# (RESHARD=1 rebuilds it). Check shards afterwards with `dser verify $SHARDS_DIR/NAME`.
#
# Overrides as in slurm/stage1.sh: sbatch options or SBATCH_* variables (SBATCH_TIMELIMIT, …).
# Preemption: the task is requeued and shards its corpus again from the start (dser shard
# publishes a corpus only when it is complete, so nothing half-written is ever kept).
#
#SBATCH --job-name=dser-shard
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=8
#SBATCH --time=12:00:00
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm/logs/%x-%A_%a.out
set -uo pipefail

if [[ -z ${DSER_HOME:-} ]]; then
  # sbatch runs a spooled copy of this file; Slurm's record of the job names the original.
  me=${SLURM_JOB_ID:+$(scontrol show job "$SLURM_JOB_ID" | grep -oP '^\s*Command=\K\S+')}
  DSER_HOME=$(cd "$(dirname "${me:-${BASH_SOURCE[0]}}")/.." && pwd)
fi
source "$DSER_HOME/slurm/env.sh"

# Every decision (which corpus, its reader, root and options, whether it exists) is dser's.
reshard=()
[[ ${RESHARD:-0} == 1 ]] && reshard=(--overwrite)
exec "${DSER[@]}" grid-shard --workers "${SLURM_CPUS_PER_TASK:-1}" --synth-args "${SYNTH_ARGS:-}" "${reshard[@]}" \
  -- "${1:-$DSER_HOME/slurm/grid.yaml}" "${SLURM_ARRAY_TASK_ID:-}"
