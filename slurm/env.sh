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
# An installed dser (pip install dser) ships these scripts as package data, in
# VENV/lib/pythonX.Y/site-packages/dser/slurm/: submit them from there (dser submit does). Then
# DSER_HOME is that dser/ package directory (it holds slurm/), DSER_VENV defaults to the VENV
# holding it, LOGS_DIR to slurm/logs in the job's working directory, and the ranks run the
# installed dser/train.py. A job you submit yourself from there still logs to slurm/logs/ where
# you submit (mkdir it first, or pass --output).
#
# Relative paths are relative to the job's working directory: where you ran sbatch (or its
# --chdir). A job you submit yourself logs to slurm/logs/ there (its #SBATCH --output line), so
# submit from the checkout or pass --output; jobs that cross_corpus.sh and dser submit submit
# log to LOGS_DIR.

if [[ -f $DSER_HOME/dser/__init__.py ]]; then   # a checkout
  : "${DSER_VENV:=$DSER_HOME/.venv}"
  : "${LOGS_DIR:=$DSER_HOME/slurm/logs}"
  DSER_TRAIN=$DSER_HOME/dser/train.py
  export PYTHONPATH="$DSER_HOME${PYTHONPATH:+:$PYTHONPATH}"   # dser importable without pip install
elif [[ -f $DSER_HOME/__init__.py ]]; then     # an installed package: DSER_HOME is …/site-packages/dser
  : "${DSER_VENV:=$(cd "$DSER_HOME/../../../.." && pwd)}"
  : "${LOGS_DIR:=slurm/logs}"                  # never into site-packages
  DSER_TRAIN=$DSER_HOME/train.py
else
  echo "dser: DSER_HOME=$DSER_HOME is neither a dser checkout (dser/) nor an installed dser package: set DSER_HOME" >&2
  exit 2
fi
: "${SHARDS_DIR:=shards}"
: "${RUNS_DIR:=runs}"

if [[ -n ${DSER_MODULES:-} ]]; then
  module load $DSER_MODULES   # word splitting intended: a list of modules
fi
if [[ ! -x $DSER_VENV/bin/python ]]; then
  echo "dser: no Python at DSER_VENV=$DSER_VENV: create it (make setup) or set DSER_VENV" >&2
  exit 2
fi

export DSER_HOME DSER_VENV SHARDS_DIR RUNS_DIR LOGS_DIR
export PATH="$DSER_VENV/bin:$PATH"
PY=$DSER_VENV/bin/python

# "finished", "stopped at TAG", "started" or "none": RUN_DIR/finished.json (written last) decides.
dser_run_status() { "$PY" -m dser.cli run-status "$1"; }
DSER=("$PY" -m dser.cli)                                    # the dser command line
