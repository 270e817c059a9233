# slurm/env.sh — the one place where dser's Slurm scripts learn where things are.
#
# Sourced by every script in slurm/ once it knows DSER_HOME. Change the defaults here, or set
# the variables before sbatch (sbatch passes your environment on to the job):
#
#   DSER_HOME     the dser checkout (holds dser/ and slurm/)   [found from the job's script path]
#   DSER_VENV     its virtual environment                      [$DSER_HOME/.venv]
#   SHARDS_DIR    where corpora are sharded to                 [shards]
#   RUNS_DIR      where run directories are created            [runs]
#   LOGS_DIR      logs of the jobs cross_corpus.sh submits     [$DSER_HOME/slurm/logs]
#   DSER_MODULES  environment modules loaded first             [none]; e.g. "cuda/12.4 nccl"
#
# Relative paths are relative to the job's working directory: where you ran sbatch (or its
# --chdir). A job you submit yourself logs to slurm/logs/ there (its #SBATCH --output line), so
# submit from the checkout or pass --output; jobs that cross_corpus.sh and dser submit submit
# log to LOGS_DIR.

: "${DSER_VENV:=$DSER_HOME/.venv}"
: "${SHARDS_DIR:=shards}"
: "${RUNS_DIR:=runs}"
: "${LOGS_DIR:=$DSER_HOME/slurm/logs}"

if [[ -n ${DSER_MODULES:-} ]]; then
  module load $DSER_MODULES   # word splitting intended: a list of modules
fi
if [[ ! -x $DSER_VENV/bin/python ]]; then
  echo "dser: no Python at DSER_VENV=$DSER_VENV: create it (make setup) or set DSER_VENV" >&2
  exit 2
fi

export DSER_HOME DSER_VENV SHARDS_DIR RUNS_DIR LOGS_DIR
export PATH="$DSER_VENV/bin:$PATH"
export PYTHONPATH="$DSER_HOME${PYTHONPATH:+:$PYTHONPATH}"   # dser importable without pip install
PY=$DSER_VENV/bin/python

# "finished", "stopped at TAG", "started" or "none": RUN_DIR/finished.json (written last) decides.
dser_run_status() { "$PY" -m dser.cli run-status "$1"; }
DSER=("$PY" -m dser.cli)                                    # the dser command line
