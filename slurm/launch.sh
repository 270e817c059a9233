# slurm/launch.sh — run dser/train.py on every rank of this Slurm job; requeue it when preempted.
#
# Sourced by stage1.sh and stage2.sh, which call
#
#   dser_train_job STAGE RUN_DIR TRAIN_ARGS…        # TRAIN_ARGS: --config, --init-from, --set …
#
# Ranks: one srun task per rank, one rank per GPU (submit with --ntasks-per-node equal to
#   --gpus-per-node). On nodes without GPUs the same script trains on the CPU: one rank per
#   task, DS_ACCELERATOR=cpu, OMP_NUM_THREADS = --cpus-per-task.
# Rendezvous: the first host of the allocation (scontrol show hostnames "$SLURM_JOB_NODELIST"),
#   at its NodeAddr, on port 20000 + job id mod 20000 (MASTER_PORT overrides). Each rank gets
#   RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT: what
#   deepspeed.init_distributed reads, so train.py runs directly, without the DeepSpeed launcher.
# Resume: a RUN_DIR holding config.yaml but no finished.json is an unfinished run: continue it
#   (train.py --resume RUN_DIR, from checkpoints/latest). A finished RUN_DIR is left alone.
# Preemption: #SBATCH --signal=USR1@… (or scancel --signal=USR1, or Slurm's SIGTERM) reaches
#   every rank; each finishes its step, writes a checkpoint and exits 128 + the signal's number
#   (138 for USR1, 143 for TERM); train.stop_after_steps stops the same way with 75. Rank 0
#   then writes its "stopped at step N" line to DSER_STOP_FILE (a temporary file on this, the
#   first, node): that line, with one of those statuses, means "checkpointed before the end",
#   and the job requeues itself (scontrol requeue) and the restarted job resumes. The status
#   alone does not: when one rank fails, srun ends the others with SIGTERM and may report 143,
#   and a run that cannot start would requeue until DSER_MAX_REQUEUES. 0 is a finished run
#   (finished.json, which the recipe writes last: dser run-status RUN_DIR says "finished"); any
#   other outcome is a failure. DSER_MAX_REQUEUES (default 20) bounds the restarts.

dser_train_job() {
  local stage=$1 run_dir=$2
  shift 2
  if [[ $(dser_run_status "$run_dir") == finished ]]; then
    echo "dser: $run_dir has finished already (finished.json): nothing to do"
    return 0
  fi
  local args
  if [[ -f $run_dir/config.yaml ]]; then
    args=(--resume "$run_dir")       # requeued, or submitted again: continue from its checkpoint
  else
    args=(--stage "$stage" --run-dir "$run_dir" "$@")
  fi

  local hosts
  mapfile -t hosts < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
  MASTER_ADDR=$(scontrol show node "${hosts[0]}" -o | grep -oP '(^|\s)NodeAddr=\K\S+')
  export MASTER_ADDR=${MASTER_ADDR:-${hosts[0]}}
  export MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}

  local nodes=${SLURM_JOB_NUM_NODES:-1} tasks=${SLURM_NTASKS:-1}
  local per_node=$((tasks / nodes)) gpus=${DSER_GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-0}}
  local cpus=${SLURM_CPUS_PER_TASK:-1} device
  if ((gpus > 0)); then
    if ((per_node != gpus)); then
      echo "dser: error: $gpus GPUs but $per_node tasks per node: submit with --ntasks-per-node=$gpus" \
        "(one rank per GPU)" >&2
      return 2
    fi
    [[ ${DS_ACCELERATOR:-} == cpu ]] && unset DS_ACCELERATOR   # let DeepSpeed find the GPUs
    device="$gpus GPU(s)"
  else
    export DS_ACCELERATOR=cpu
    device="CPU, $cpus thread(s)"
  fi
  export OMP_NUM_THREADS=$cpus LOCAL_WORLD_SIZE=$per_node
  echo "dser: stage $stage, $tasks rank(s) on $nodes node(s) ($per_node per node, $device each);" \
    "rendezvous $MASTER_ADDR:$MASTER_PORT; restart ${SLURM_RESTART_COUNT:-0}"
  echo "dser: train.py ${args[*]}"

  local stop_file stopped=
  stop_file=$(mktemp "${TMPDIR:-/tmp}/dser-stop.XXXXXX") || return 1
  # Slurm 22.05's srun does not inherit --cpus-per-task from sbatch: pass it on.
  DSER_STOP_FILE=$stop_file srun --kill-on-bad-exit=1 --ntasks="$tasks" --cpus-per-task="$cpus" \
    bash -c 'export RANK=$SLURM_PROCID WORLD_SIZE=$SLURM_NTASKS LOCAL_RANK=$SLURM_LOCALID; exec "$@"' rank \
    "$PY" -u "$DSER_TRAIN" "${args[@]}"
  local rc=$?
  [[ -s $stop_file ]] && stopped=yes
  rm -f "$stop_file"
  case $rc in
    0)
      if [[ $(dser_run_status "$run_dir") == finished ]]; then
        echo "dser: stage $stage finished: $run_dir/metrics.json"
        return 0
      fi
      echo "dser: stage $stage exited 0 without $run_dir/finished.json; $run_dir is kept: submit the same" \
        "job again to resume" >&2
      return 1 ;;
    75 | 138 | 143)    # stopped with a checkpoint (train.stop_after_steps, SIGUSR1, SIGTERM)?
      if [[ -z $stopped ]]; then
        echo "dser: stage $stage failed (exit $rc, and no rank stopped at a checkpoint: one failed and srun" \
          "ended the others; its error is above); $run_dir is kept: submit the same job again to resume" >&2
        return "$rc"
      fi ;;
    *)
      echo "dser: stage $stage failed (exit $rc); $run_dir is kept: submit the same job again to resume" >&2
      return "$rc" ;;
  esac
  # Stopped early with a checkpoint (signal, or train.stop_after_steps): come back and resume.
  if ((${SLURM_RESTART_COUNT:-0} >= ${DSER_MAX_REQUEUES:-20})); then
    echo "dser: $run_dir stopped early again after ${SLURM_RESTART_COUNT} restarts (DSER_MAX_REQUEUES);" \
      "giving up: submit the same job again to resume" >&2
    return 3
  fi
  echo "dser: $run_dir checkpointed before the end: requeueing job $SLURM_JOB_ID to resume it"
  if ! scontrol requeue "$SLURM_JOB_ID"; then
    echo "dser: Slurm refused the requeue: submit the same job again to resume $run_dir" >&2
    return 3
  fi
  sleep 300   # the requeue ends this job; never report success for an unfinished run
  return 3
}
