"""``dser bench``: how much audio dser pushes through a machine, measured in one run.

Seven sections, each measuring rates and ratios side by side in the same run on the same machine,
on audio generated here (speech-like clips from ``dser.corpora.synthetic``, cut to IEMOCAP-like
lengths: log-normal, median 3.5 s, mean ≈ 4.5 s, 0.6–30 s). One file each::

    sharding.py   dser shard (build_shards) in × real time: 16 kHz and 48 kHz (soxr-resampled)
                  WAV input, 1 and 2 encoding workers
    loading.py    the streaming loader (decode FLAC, bucket, pad) in × real time per worker, against
                  the same clips as WAV files through a plain torch Dataset + DataLoader
    padding.py    real (non-padded) share of the samples in training batches: dser's plan against
                  random batches of a fixed clip count, on 20 000 IEMOCAP-like lengths
    peft.py       the recipe through the DeepSpeed launcher on the WavLM Base+ architecture with
                  full, lora and lora+bottleneck+weighted_sum+weight_gating: samples/s, peak memory
                  per rank, optimizer-state and checkpoint bytes, each also as a ratio to full
    pipeline.py   audio-seconds/s of a dser training run against baseline.py (transformers + peft +
                  DataLoader over WAV files, one process) on the same model, data and steps
    soak.py       resident memory of each rank over a long tiny-model run: growth after warm-up
    balance.py    how evenly a step's ranks are loaded (mean / max padded seconds) at 2, 4 and 8
                  simulated ranks: the per-rank planner (dser's before the global plan; loose tars' still) against the global epoch plan

and the parts they share::

    sizes.py      BenchSizes (QUICK, FULL), the audio constants, BenchError
    corpus.py     the generated corpora and their shards
    training.py   a measured run of the recipe (rates from its TensorBoard, bytes of its checkpoint)
    memory.py     PeakMemory: the rank processes' resident memory, polled from /proc
    baseline.py   the usual hand-written finetuning script (imports nothing from dser; run as a script)
    goals.py      GOALS, the one table of goals: checked against every run, and BENCHMARKS.md's
                  goals part is generated from it
    console.py    the fixed-width console tables
    run.py        run_bench (every section in order, machine, versions, goals) and format_table

Every training run trains in the precision ``deepspeed.precision: auto`` picks on this machine
(bf16 only where the GPU or CPU has it natively, else fp16 on a GPU, fp32 on a CPU) and every
figure is labelled with the precision it was measured in. Rates of training runs leave out their
first ``warmup_steps`` steps (start-up, first batches, kernel selection). ``--quick`` shrinks every
size so the whole bench finishes in a few minutes on a 2-core machine; the numbers in
BENCHMARKS.md come from a run without it.

Usage::

    dser bench --quick --out bench.json             # console table + JSON
    results = run_bench(Path("bench.json"), quick=True)
    print(format_table(results))
"""

from dser.bench.balance import bench_balance
from dser.bench.corpus import iemocap_like_lengths, write_bench_corpus
from dser.bench.goals import GOALS, Goal, check_goals, check_goals_file, read_results, write_goals
from dser.bench.loading import bench_loading
from dser.bench.memory import PeakMemory
from dser.bench.padding import bench_padding
from dser.bench.peft import bench_peft, saved_activation_bytes
from dser.bench.pipeline import bench_pipeline
from dser.bench.run import FORMAT, SECTION_MODULES, SECTIONS, format_table, run_bench
from dser.bench.sharding import bench_sharding
from dser.bench.sizes import FULL, QUICK, BenchError, BenchSizes
from dser.bench.soak import bench_soak

__all__ = ["FORMAT", "FULL", "GOALS", "QUICK", "SECTIONS", "SECTION_MODULES", "BenchError", "BenchSizes", "Goal",
           "PeakMemory", "bench_balance", "bench_loading", "bench_padding", "bench_peft", "bench_pipeline",
           "bench_sharding", "bench_soak", "check_goals", "check_goals_file", "format_table", "iemocap_like_lengths",
           "read_results", "run_bench", "saved_activation_bytes", "write_bench_corpus", "write_goals"]
