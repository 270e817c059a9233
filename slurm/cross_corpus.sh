#!/bin/bash
# The paper's cross-corpus grid on Slurm: for every source (acted) corpus and every target
# (natural) corpus, stage 1 on the source, then stage 2 on the target once that stage 1 has
# succeeded, both evaluated on the test set of every corpus in the grid.
#
#   sbatch slurm/cross_corpus.sh [GRID_FILE]        # default slurm/grid.yaml: the demo corpora
#   sbatch --wait slurm/cross_corpus.sh             # … and return when the whole grid has ended
#   bash slurm/cross_corpus.sh my_grid.yaml         # from a login node: submit, print, return
#   dser report runs/cross-corpus                   # the table and heatmap (this job prints it too)
#
# Jobs it submits (ids and run directories are printed):
#   dser-shard          shard.sh, an array job: one task per corpus without $SHARDS_DIR/NAME/index.json
#   dser-s1-S           stage1.sh on source S                 --dependency=afterok:<dser-shard>
#   dser-s2-S-to-T      stage2.sh on target T, from S's run    --dependency=afterok:<dser-s1-S>
# Every run gets data.test = the TEST groups of all corpora in the grid (each named after its
# corpus), source = S and, in stage 2, target = T and rehearsal on S's training shards; each
# stage ends by evaluating its best weights on all of those test sets, so a run's metrics.json
# holds its half of the report row. A run directory that already finished is skipped, and an
# unfinished one resumes: submitting the grid again completes it.
#
# The grid file is data (YAML), never sourced or run: `dser grid GRID_FILE` checks it and both
# stage configs before anything is submitted, and `dser submit --grid GRID_FILE` plans and
# submits the jobs, the same ones `dser submit --grid GRID_FILE --dry-run` prints (text in the
# grid, $(…), `…`, ;, spaces, stays text). A bash grid (grid.sh, before) is refused with a line
# saying how to write it as YAML.
#
# As a batch job it then waits for them all (`dser submit --wait`, polling every GRID_POLL
# seconds, default 30), cancels stage-2 jobs whose stage 1 failed (they would pend forever with
# DependencyNeverSatisfied), prints each job's final state and the report, and exits non-zero
# if any part did not complete. GRID_WAIT=0/1 overrides whether it waits (default: only as a
# batch job). If this job ends early (time limit, preemption: it is never requeued, scancel),
# the jobs it submitted go on and `dser report` collects them afterwards; to stop the grid,
# scancel the job ids it printed. Do not submit the same grid again while they still run.
#
# Environment, besides slurm/env.sh's paths (LOGS_DIR: the jobs' logs): STAGE_SBATCH, extra
# sbatch options for the training jobs, e.g. "--gpus-per-node=4 --ntasks-per-node=4
# --partition=gpu --time=2-00:00:00" (dser submit --stage-sbatch); SHARD_SBATCH, the same for
# the shard tasks (--shard-sbatch); SYNTH_ARGS for the demo corpora (see slurm/shard.sh). This
# job itself only submits and waits: one CPU.
#
#SBATCH --job-name=dser-grid
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=1
#SBATCH --time=7-00:00:00
#SBATCH --no-requeue
#SBATCH --output=slurm/logs/%x-%j.out
set -uo pipefail

if [[ -z ${DSER_HOME:-} ]]; then
  # sbatch runs a spooled copy of this file; Slurm's record of the job names the original.
  me=${SLURM_JOB_ID:+$(scontrol show job "$SLURM_JOB_ID" | grep -oP '^\s*Command=\K\S+')}
  DSER_HOME=$(cd "$(dirname "${me:-${BASH_SOURCE[0]}}")/.." && pwd)
fi
source "$DSER_HOME/slurm/env.sh"

# Every decision is dser's: `dser grid` checks the grid and both stage configs of every run,
# then `dser submit --grid` (dser/submit.py, the one planner) plans, submits and, as a batch
# job, waits and judges. This script only passes the environment on.
grid=${1:-$DSER_HOME/slurm/grid.yaml}
[[ -f $grid ]] && grid=$(realpath "$grid")
"${DSER[@]}" grid "$grid" || exit 2   # the grid and every run's config; one line naming the key if not

wait=()
[[ ${GRID_WAIT:-${SLURM_JOB_ID:+1}} == 1 ]] && wait=(--wait --poll "${GRID_POLL:-30}")
exec "${DSER[@]}" submit --grid "$grid" --stage-sbatch "${STAGE_SBATCH:-}" --shard-sbatch "${SHARD_SBATCH:-}" "${wait[@]}"
