# The cross-corpus grid: which corpora, which are sources (stage 1), which are targets (stage 2).
#
# Read by slurm/cross_corpus.sh and slurm/shard.sh (sourced), and by `dser submit --grid FILE`
# (through bash). Copy it to make your own grid and pass the copy:
#
#   sbatch slurm/cross_corpus.sh my_grid.sh            dser submit --grid my_grid.sh
#
# CORPORA: one row per corpus, "NAME READER ROOT TRAIN VALID TEST [dser shard options…]"
#   NAME     shards go to $SHARDS_DIR/NAME; its test set is called NAME in metrics.json and the report
#   READER   a `dser shard` reader (iemocap, msp-podcast, crema-d, ravdess, emodb, manifest), or
#            synth-acted / synth-natural: the demo corpora, generated into ROOT by `dser synth`
#   ROOT     the corpus on disk (manifest: its CSV/JSONL file)
#   TRAIN VALID TEST   shard groups, comma-separated, e.g. Session1,Session2,Session3
CORPORA=(
  "demo-acted    synth-acted    data/demo/acted    train  valid  test  --max-shard-samples 64"
  "demo-natural  synth-natural  data/demo/natural  train  valid  test  --max-shard-samples 64"
  # "crema-d      crema-d      /data/CREMA-D                fold0,fold1,fold2     fold3        fold4"
  # "iemocap      iemocap      /data/IEMOCAP_full_release   Session1,Session2,Session3  Session4  Session5"
  # "msp-podcast  msp-podcast  /data/MSP-Podcast            Train                 Development  Test1"
)
SOURCES=(demo-acted)      # stage 1 on each (acted speech)
TARGETS=(demo-natural)    # stage 2 on each, from every source's stage 1 (natural speech)

# Run configs; the grid sets their data.train/valid/test, source, target and rehearsal shards.
STAGE1_CONFIG=dser/configs/demo_stage1.yaml
STAGE2_CONFIG=dser/configs/demo_stage2.yaml
SET=()                    # --set overrides for both stages, e.g. (optim.max_steps=2000 seed=1)
GRID_NAME=cross-corpus    # runs: $RUNS_DIR/$GRID_NAME/stage1-SOURCE, …/stage2-SOURCE-to-TARGET
