#!/bin/bash
# Shard several corpora on Slurm: an array job, one task per corpus of a grid file's corpora.
#
#   sbatch --array=0-N slurm/shard.sh [GRID_FILE]      # task i shards corpus i (default slurm/grid.yaml)
#
#   sbatch --array=0-1 slurm/shard.sh                  # the two demo corpora
#   sbatch --array=0-4%2 --cpus-per-task=16 slurm/shard.sh my_grid.yaml   # five, two at a time
#
# Corpus i is the i-th under `corpora:` (`dser grid GRID_FILE corpora` lists them in order);
# the task runs `dser shard --workers <cpus> [its shard: options] -- READER ROOT $SHARDS_DIR/NAME`.
# The grid is data, never sourced: each value comes from `dser grid GRID_FILE QUERY --null`
# into a bash array, so text in it stays text; a bash grid (grid.sh) is refused. Readers
# synth-acted and synth-natural are the demo corpora: generated first with `dser synth` into
# ROOT (unless ROOT/manifest.jsonl exists; SYNTH_ARGS adds options, e.g. "--utterances 96"),
# then sharded with the manifest reader. A corpus whose $SHARDS_DIR/NAME/index.json exists is
# kept (RESHARD=1 rebuilds it). Check shards afterwards with `dser verify $SHARDS_DIR/NAME`.
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

grid=${1:-$DSER_HOME/slurm/grid.yaml}
[[ -f $grid ]] || { echo "dser: error: grid file $grid not found" >&2; exit 2; }
grid_get() { # grid_get ARRAY QUERY…: the values of `dser grid $grid QUERY…`, one per element
  local -n _grid_values=$1
  mapfile -d '' -t _grid_values < <("${DSER[@]}" grid --null "$grid" "${@:2}")
  wait $! || exit 2
}
grid_get names corpora
task=${SLURM_ARRAY_TASK_ID:?submit as an array job: sbatch --array=0-$((${#names[@]} - 1)) slurm/shard.sh $grid}
if [[ ! $task =~ ^[0-9]+$ ]] || ((task >= ${#names[@]})); then
  echo "dser: error: array task $task but $grid has ${#names[@]} corpora (tasks 0-$((${#names[@]} - 1)))" >&2
  exit 2
fi

name=${names[$task]}
grid_get value corpus "$name" reader; reader=${value[0]}
grid_get value corpus "$name" root; root=${value[0]}
grid_get options corpus "$name" shard    # --option=value each: never read as another option
out=$SHARDS_DIR/$name
if [[ -f $out/index.json && ${RESHARD:-0} != 1 ]]; then
  echo "dser: $out exists (index.json): kept (RESHARD=1 rebuilds it)"
  exit 0
fi

case $reader in
  synth-acted | synth-natural)
    style=${reader#synth-}
    seed=$([[ $style == acted ]] && echo 1 || echo 2)   # the seeds `dser demo` uses
    if [[ ! -f $root/manifest.jsonl ]]; then
      # shellcheck disable=SC2086  # SYNTH_ARGS is a list of options
      "${DSER[@]}" synth --style "$style" --seed "$seed" ${SYNTH_ARGS:-} -- "$root" || exit
    fi
    reader=manifest root=$root/manifest.jsonl
    ;;
esac

echo "dser: task $task: $name ($reader $root) -> $out"
overwrite=()
[[ ${RESHARD:-0} == 1 ]] && overwrite=(--overwrite)
# `--`: a root that begins with '-' is still a path
"${DSER[@]}" shard --workers "${SLURM_CPUS_PER_TASK:-1}" "${overwrite[@]}" "${options[@]}" -- "$reader" "$root" "$out"
