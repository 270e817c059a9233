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
# stage configs before anything is submitted, and every value comes back from `dser grid
# GRID_FILE QUERY --null` into a bash array, so text in it ($(…), `…`, ;, spaces) stays text.
# A bash grid (grid.sh, before) is refused with a line saying how to write it as YAML.
#
# As a batch job it then waits for them all (polling squeue every GRID_POLL seconds, default
# 30), cancels stage-2 jobs whose stage 1 failed (they would pend forever with
# DependencyNeverSatisfied), prints each job's final state and the report, and exits non-zero
# if any part did not complete. GRID_WAIT=0/1 overrides whether it waits (default: only as a
# batch job). If this job ends early (time limit, preemption: it is never requeued, scancel),
# the jobs it submitted go on and `dser report` collects them afterwards; to stop the grid,
# scancel the job ids it printed. Do not submit the same grid again while they still run.
#
# Environment, besides slurm/env.sh's paths (LOGS_DIR: the jobs' logs): STAGE_SBATCH, extra
# sbatch options for the training jobs, e.g. "--gpus-per-node=4 --ntasks-per-node=4
# --partition=gpu --time=2-00:00:00"; SHARD_SBATCH, the same for the shard tasks; SYNTH_ARGS
# for the demo corpora (see slurm/shard.sh). This job itself only submits and waits: one CPU.
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

die() { echo "dser: error: $*" >&2; exit 2; }

grid=${1:-$DSER_HOME/slurm/grid.yaml}
[[ -f $grid ]] || die "grid file $grid not found"
grid=$(realpath "$grid")

# ---- the grid, checked ----------------------------------------------------------------------
"${DSER[@]}" grid "$grid" || exit 2   # the grid and every run's config; one line naming the key if not
grid_get() { # grid_get ARRAY QUERY…: the values of `dser grid $grid QUERY…`, one per element
  local -n _grid_values=$1
  mapfile -d '' -t _grid_values < <("${DSER[@]}" grid --null "$grid" "${@:2}")
  wait $! || exit 2
}
grid_get names corpora        # in file order: shard.sh's array task i is names[i]
grid_get sources sources
grid_get targets targets
grid_get value name; GRID_NAME=${value[0]}
grid_get value stage1_config; cfg1=${value[0]}   # a path, found here or in the checkout
grid_get value stage2_config; cfg2=${value[0]}
# set_args SOURCE [TARGET]: --set KEY=VALUE for each override of that run (the grid's `set` last)
set_args() {
  local -a sets
  local x
  grid_get sets sets "$@"
  run_sets=()
  for x in "${sets[@]}"; do run_sets+=(--set "$x"); done
}

read -r -a stage_sbatch <<<"${STAGE_SBATCH:-}"
read -r -a shard_sbatch <<<"${SHARD_SBATCH:-}"
runs=$RUNS_DIR/$GRID_NAME
mkdir -p "$runs" "$LOGS_DIR"

submitted=()
jobs_id=() jobs_what=() jobs_out=()
record() { # JOB WHAT OUTPUT: remember and print one submitted job
  submitted+=("$1") jobs_id+=("$1") jobs_what+=("$2") jobs_out+=("$3")
  printf '%-10s %-34s %s\n' "$1" "$2" "$3"
}
submit() { # sbatch ARGS… → prints the job id; on failure cancels the grid so far
  local out
  if ! out=$(sbatch --parsable "$@"); then
    ((${#submitted[@]})) && scancel "${submitted[@]}"
    die "sbatch $* failed; cancelled the jobs submitted so far"
  fi
  echo "${out%%;*}"
}
printf '%-10s %-34s %s\n' JOB WHAT "RUN DIRECTORY"

# ---- 1. shards that are missing: one array task each ----------------------------------------
need=() need_names=()
for i in "${!names[@]}"; do
  [[ -f $SHARDS_DIR/${names[$i]}/index.json ]] || { need+=("$i"); need_names+=("${names[$i]}"); }
done
after_shards=()
if ((${#need[@]})); then
  shard_job=$(submit --array="$(IFS=,; echo "${need[*]}")" --output="$LOGS_DIR/%x-%A_%a.out" \
    "${shard_sbatch[@]}" "$DSER_HOME/slurm/shard.sh" "$grid") || exit
  after_shards=(--dependency="afterok:$shard_job")
  record "$shard_job" "shard ${need_names[*]}" "$SHARDS_DIR/"
fi

# ---- 2. stage 1 on every source -------------------------------------------------------------
declare -A stage1_job
for s in "${sources[@]}"; do
  run1=$runs/stage1-$s
  set_args "$s"
  job=$(submit --job-name="dser-s1-$s" --output="$LOGS_DIR/%x-%j.out" "${after_shards[@]}" "${stage_sbatch[@]}" \
    "$DSER_HOME/slurm/stage1.sh" "$run1" "$cfg1" "${run_sets[@]}") || exit
  stage1_job[$s]=$job
  record "$job" "stage 1 $s" "$run1"
done

# ---- 3. stage 2 on every target, after its source's stage 1 succeeded -----------------------
for s in "${sources[@]}"; do
  for t in "${targets[@]}"; do
    [[ $s == "$t" ]] && continue
    run2=$runs/stage2-$s-to-$t
    set_args "$s" "$t"
    job=$(submit --job-name="dser-s2-$s-to-$t" --dependency="afterok:${stage1_job[$s]}" \
      --output="$LOGS_DIR/%x-%j.out" "${stage_sbatch[@]}" \
      "$DSER_HOME/slurm/stage2.sh" "$run2" "$cfg2" "$runs/stage1-$s" "${run_sets[@]}") || exit
    record "$job" "stage 2 $s -> $t" "$run2"
  done
done

# ---- 4. wait for the grid (as a batch job) ---------------------------------------------------
wait_default=0
[[ -n ${SLURM_JOB_ID:-} ]] && wait_default=1
if [[ ${GRID_WAIT:-$wait_default} != 1 ]]; then
  echo "dser: submitted ${#submitted[@]} jobs; afterwards: dser report $runs"
  exit 0
fi
declare -A ours
for j in "${submitted[@]}"; do ours[$j]=1; done
while :; do
  live=0
  while read -r base id state reason; do
    [[ -n ${ours[$base]:-} ]] || continue
    if [[ $state == PENDING && $reason == DependencyNeverSatisfied ]]; then
      echo "dser: job $id can never start (a job it depends on failed): cancelling it"
      scancel "$id"
    else
      live=$((live + 1))
    fi
  done < <(squeue -h -o '%F %i %T %r')
  ((live == 0)) && break
  sleep "${GRID_POLL:-30}"
done

# Job records expire (MinJobAge) and sacct needs slurmdbd: judge the grid by its outputs.
job_state() {
  local st
  st=$(scontrol show job -o "$1" 2>/dev/null | grep -oP '\sJobState=\K\S+' | sort | uniq -c | xargs)
  [[ -z $st ]] && st=$(sacct -n -X -j "$1" -o State 2>/dev/null | sort | uniq -c | xargs)
  echo "${st:-unknown}"
}
failed=0
echo
printf '%-10s %-34s %-22s %s\n' JOB WHAT "SLURM STATE" RESULT
for k in "${!jobs_id[@]}"; do
  out=${jobs_out[$k]} result=ok
  if [[ $out == "$SHARDS_DIR/" ]]; then
    for n in "${need_names[@]}"; do
      [[ -f $SHARDS_DIR/$n/index.json ]] || result="missing $SHARDS_DIR/$n/index.json"
    done
  elif [[ $(dser_run_status "$out") != finished ]]; then
    result="not finished: $(dser_run_status "$out") (no $out/finished.json)"
  fi
  [[ $result == ok ]] || failed=$((failed + 1))
  printf '%-10s %-34s %-22s %s\n' "${jobs_id[$k]}" "${jobs_what[$k]}" "$(job_state "${jobs_id[$k]}")" "$result"
done
echo
"${DSER[@]}" report "$runs" || failed=$((failed + 1))
if ((failed)); then
  echo "dser: $failed part(s) of the grid did not complete; logs: $LOGS_DIR, runs: $runs" >&2
  exit 1
fi
echo "dser: grid complete: $runs"
