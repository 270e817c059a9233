#!/bin/bash
# Shard several corpora on Slurm: an array job, one task per corpus of a grid file's CORPORA table.
#
#   sbatch --array=0-N slurm/shard.sh [GRID_FILE]      # task i shards row i (default slurm/grid.sh)
#
#   sbatch --array=0-1 slurm/shard.sh                  # the two demo corpora
#   sbatch --array=0-4%2 --cpus-per-task=16 slurm/shard.sh my_grid.sh   # five, two at a time
#
# Row i of CORPORA (see slurm/grid.sh) is "NAME READER ROOT TRAIN VALID TEST [dser shard options…]";
# the task runs `dser shard READER ROOT $SHARDS_DIR/NAME --workers <cpus> [options]`. Readers
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

grid=${1:-$DSER_HOME/slurm/grid.sh}
[[ -f $grid ]] || { echo "dser: error: grid file $grid not found" >&2; exit 2; }
source "$grid"
task=${SLURM_ARRAY_TASK_ID:?submit as an array job: sbatch --array=0-$((${#CORPORA[@]} - 1)) slurm/shard.sh $grid}
if ((task >= ${#CORPORA[@]})); then
  echo "dser: error: array task $task but $grid has ${#CORPORA[@]} corpora (rows 0-$((${#CORPORA[@]} - 1)))" >&2
  exit 2
fi

read -r -a row <<<"${CORPORA[$task]}"
if ((${#row[@]} < 6)); then
  echo "dser: error: $grid CORPORA row $task is not" \
    "\"NAME READER ROOT TRAIN VALID TEST [options]\": ${CORPORA[$task]}" >&2
  exit 2
fi
name=${row[0]} reader=${row[1]} root=${row[2]} options=("${row[@]:6}")
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
      "${DSER[@]}" synth "$root" --style "$style" --seed "$seed" ${SYNTH_ARGS:-} || exit
    fi
    reader=manifest root=$root/manifest.jsonl
    ;;
esac

echo "dser: task $task: $name ($reader $root) -> $out"
"${DSER[@]}" shard "$reader" "$root" "$out" --workers "${SLURM_CPUS_PER_TASK:-1}" \
  $([[ ${RESHARD:-0} == 1 ]] && echo --overwrite) "${options[@]}"
