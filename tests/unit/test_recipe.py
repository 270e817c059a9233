"""The training recipe in-process, on one rank (a gloo process group of one), with a tiny model.

Its parts are checked one by one, against what they must equal:

- ``train_step``'s losses are those of a plain PyTorch loop (AdamW, the LR schedule, gradient
  clipping) over the same batches from the same weights: the first exactly, later ones to
  float rounding;
- the learning rate follows ``lr_lambda`` step by step (warm-up, cosine decay);
- with rehearsal, each batch comes from the stream ``TrainStream.source`` names, at the
  configured share;
- ``TrainState`` round-trips through ``state_dict``, and through ``save()`` / ``load()`` in a
  second recipe, which then takes the same next step as the first;
- ``run()`` trains to the end and writes metrics.json and the export;
- ``model.adaptors: [ia3]`` trains in stage 1, and a fresh IA³ set over the frozen one in stage 2.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import pytest
import torch
import torch.distributed as dist
import yaml
from fixtures_shards import write_test_shards

from dser import distributed, startup, train
from dser.model.build import build_model
from dser.runconfig import default_config_path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def process_group():
    """A gloo process group of one rank, as the launcher would set it up."""
    import datetime as dt

    import deepspeed

    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "RANK": "0", "WORLD_SIZE": "1",
           "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    distributed.init_process_group(deepspeed, dt.timedelta(minutes=5))
    yield deepspeed
    dist.destroy_process_group()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("recipe-shards")
    write_test_shards(root / "target", 24, 3, group="train", seed=1, durations=(0.4, 1.0))
    write_test_shards(root / "target", 8, 1, group="valid", seed=2, prefix="v-", durations=(0.4, 1.0))
    write_test_shards(root / "source", 24, 3, group="train", seed=3, prefix="src-", styles=("acted",),
                      durations=(0.4, 1.0))
    return root


def config_file(tmp_path: Path, shards: Path, **sections) -> Path:
    """The demo's stage-1 config on the test shards, a tiny WavLM, fp32, no dropout."""
    cfg = yaml.safe_load(default_config_path(1).read_text())
    cfg.update(source=None, target=None)
    cfg["data"].update(train=[str(shards / "target" / "train")], valid=[str(shards / "target" / "valid")],
                       test={}, num_workers=0, max_batch_seconds=4.0, shuffle_buffer=16, bucket_buffer=8,
                       max_seconds=1.0, eval_max_seconds=2.0)
    cfg["model"] = {"backbone": {"name": "tiny-wavlm"}, "adaptors": ["lora", "weighted_sum"],
                    "lora": {"rank": 4, "alpha": 8}, "head": {"projector_dim": 16, "dropout": 0.0}}
    cfg["optim"].update(max_steps=6, warmup_steps=2, lr=1e-2)
    cfg["train"].update(log_every=2, eval_every=3, save_every=100, progress=False)
    cfg["deepspeed"]["precision"] = "fp32"
    for name, values in sections.items():
        cfg.setdefault(name, {}).update(values)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def make_recipe(deepspeed, argv: list[str]) -> train.Recipe:
    args = train.parse_args(argv)
    stage, cfg, recorded, _, warnings = startup.check_config(args)
    return train.Recipe(args, stage, cfg, recorded, warnings, deepspeed=deepspeed, device=torch.device("cpu"))


def reference_losses(recipe: train.Recipe, state: dict, batches: list[dict]) -> tuple[list[float], list[float]]:
    """The same steps as a plain PyTorch loop: the recipe's model and optimizer, written out."""
    cfg = recipe.cfg
    model = build_model(cfg.model, num_classes=recipe.num_classes, task=cfg.task)
    model.load_state_dict(state)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW([{"params": [p for p in trainable if p.ndim >= 2], "weight_decay": cfg.optim.weight_decay},
                             {"params": [p for p in trainable if p.ndim < 2], "weight_decay": 0.0}],
                            lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, train.lr_lambda(cfg))
    losses, lrs = [], []
    for i, batch in enumerate(batches):
        torch.manual_seed(100 + i)
        out = model(batch["audio"], batch["attention_mask"])
        loss, _ = model.loss(out, batch)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, cfg.optim.grad_clip)
        opt.step()
        sched.step()
        losses.append(loss.item())
        lrs.append(sched.get_last_lr()[0])
    return losses, lrs


def test_train_step_equals_a_plain_loop_and_the_schedule_is_lr_lambda(process_group, shards, tmp_path):
    recipe = make_recipe(process_group, ["--stage", "1", "--config", str(config_file(tmp_path, shards)),
                                         "--run-dir", str(tmp_path / "run")])
    try:
        recipe.setup()
        start = {k: v.clone() for k, v in recipe.model.state_dict().items()}
        batches = [recipe.stream.next() for _ in range(5)]
        losses, lrs = [], []
        for i, batch in enumerate(batches):
            torch.manual_seed(100 + i)
            r = recipe.train_step(batch)
            assert r["skipped"] is None and not r["stop"] and r["new_bad"] == 0
            assert r["parts"]["ce"] == pytest.approx(r["loss"])  # categorical: the loss is its CE part
            losses.append(r["loss"])
            lrs.append(recipe.scheduler.get_last_lr()[0])
    finally:
        recipe.cleanup()
    want_losses, want_lrs = reference_losses(recipe, start, batches)
    assert losses[0] == want_losses[0]  # same weights, same batch: the same number
    assert losses == pytest.approx(want_losses, rel=1e-5, abs=1e-6)
    assert losses[-1] < losses[0] - 0.01  # it learns: lr 1e-2 on one small set
    assert lrs == pytest.approx(want_lrs, rel=1e-9)
    f = train.lr_lambda(recipe.cfg)
    assert lrs == pytest.approx([1e-2 * f(s) for s in range(1, 6)], rel=1e-9)
    assert f(0) == 0.5 and f(1) == 1.0 and f(6) == pytest.approx(0.0 + recipe.cfg.optim.min_lr_ratio)


def test_rehearsal_batches_come_from_the_source_the_stream_names(process_group, shards, tmp_path):
    cfg = config_file(tmp_path, shards, data={"rehearsal": {"shards": [str(shards / "source" / "train")],
                                                            "share": 0.4}})
    recipe = make_recipe(process_group, ["--stage", "1", "--config", str(cfg), "--run-dir", str(tmp_path / "run")])
    try:
        recipe.setup()
        assert recipe.stream.cfgs["rehearsal"].seed == recipe.cfg.seed + 1  # its own crops and order
        n = 40
        got = ["rehearsal" if recipe.stream.next()["utt_id"][0].startswith("src-") else "main" for _ in range(n)]
    finally:
        recipe.cleanup()
    assert got == [recipe.stream.source(i) for i in range(n)]
    assert 0.25 <= got.count("rehearsal") / n <= 0.55


def test_train_state_round_trips(process_group, shards, tmp_path):
    state = train.TrainState(step=7, best=0.5, evals_since_best=2, history=[{"step": 5, "ua": 0.5}],
                             skipped=[{"step": 3, "why": "non-finite loss"}], bad_total=4,
                             stream={"pos": {"main": [1, 2], "rehearsal": [0, 0]}, "drawn": 9, "bad_samples": ["x"]},
                             rng=train.rng_state())
    again = train.TrainState().load_state_dict(state.state_dict())
    assert again.state_dict().keys() == state.state_dict().keys()
    for k, v in state.state_dict().items():
        assert str(getattr(again, k)) == str(v), k
    with pytest.raises(train.RecipeError, match="lacks bad_total"):
        train.TrainState().load_state_dict({k: v for k, v in state.state_dict().items() if k != "bad_total"})

    # save() in one recipe, load() in another: the same state, and the same next step
    run = tmp_path / "run"
    first = make_recipe(process_group, ["--stage", "1", "--config", str(config_file(tmp_path, shards)),
                                        "--run-dir", str(run)])
    try:
        first.setup()
        for _ in range(3):
            first.train_step(first.stream.next())
            first.state.step += 1
        first.state.history.append({"step": 3, "ua": 0.25})
        first.save()
        saved = first.state.state_dict()
        torch.manual_seed(5)
        next_batch = first.stream.next()
        want = first.train_step(next_batch)["loss"]
    finally:
        first.cleanup()
    assert (run / "checkpoints" / "latest").read_text().strip() == "step00000003"
    second = make_recipe(process_group, ["--resume", str(run)])
    try:
        second.setup()
        assert second.state.step == 3 and second.state.history == [{"step": 3, "ua": 0.25}]
        assert second.state.stream == saved["stream"] and second.stream.state_dict() == saved["stream"]
        torch.manual_seed(5)
        batch = second.stream.next()
        assert batch["utt_id"] == next_batch["utt_id"]
        assert second.train_step(batch)["loss"] == pytest.approx(want, rel=1e-6)
    finally:
        second.cleanup()


def test_run_trains_to_the_end_and_writes_metrics_export_and_finished_json_with_provenance(process_group, shards,
                                                                                          tmp_path):
    import hashlib
    import json
    import signal
    from importlib import metadata

    from dser.provenance import config_sha256
    from dser.rundir import RunDir

    run = tmp_path / "run"
    recipe = make_recipe(process_group, ["--stage", "1", "--config", str(config_file(tmp_path, shards)),
                                         "--run-dir", str(run)])
    assert recipe.run() == 0
    m = json.loads((run / "metrics.json").read_text())
    assert m["steps"] == 6 and [h["step"] for h in m["valid_history"]] == [3, 6]
    assert set(m["eval"]) == {"valid"} and (run / "export" / "export.json").is_file()
    assert recipe.writer is None and recipe.bar is None  # cleanup closed them
    assert signal.getsignal(signal.SIGTERM) != recipe._on_signal  # handlers put back

    # finished.json, last: the one marker; it and metrics.json carry the provenance
    done = json.loads((run / "finished.json").read_text())
    assert RunDir(run).status() == "finished" and done["stage"] == 1 and done["steps"] == 6
    assert (run / "finished.json").stat().st_mtime_ns >= (run / "export" / "export.json").stat().st_mtime_ns
    p = done["provenance"]
    assert p == m["provenance"]
    assert p["versions"]["torch"] == torch.__version__ and p["versions"]["deepspeed"] == metadata.version("deepspeed")
    assert p["versions"]["transformers"] == metadata.version("transformers")
    assert p["versions"]["peft"] == metadata.version("peft") and p["versions"]["dser"]
    assert p["precision"] == "fp32" and "fp32" in p["precision_reason"] and p["ranks"] == 1 and p["device"]
    assert p["config_sha256"] == config_sha256(m["config"]) != config_sha256({**m["config"], "seed": 1})
    indexes = {str((shards / "target" / "index.json").resolve())}
    assert set(p["shard_indexes"]) == indexes
    assert all(h == hashlib.sha256(Path(f).read_bytes()).hexdigest() for f, h in p["shard_indexes"].items())
    assert p["git_commit"] is None or len(p["git_commit"].removesuffix("+dirty")) == 40

    # the loss's parts reach TensorBoard beside the loss (categorical: its cross-entropy, the same numbers)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    assert "train/loss/ce" in acc.Tags()["scalars"] and "train/loss/ccc_loss" not in acc.Tags()["scalars"]
    loss, ce = ([(e.step, e.value) for e in acc.Scalars(t)] for t in ("train/loss", "train/loss/ce"))
    assert [s for s, _ in ce] == [s for s, _ in loss] == [2, 4, 6]
    assert [v for _, v in ce] == pytest.approx([v for _, v in loss])


def test_a_crash_between_metrics_and_export_leaves_an_unfinished_run_that_resumes(process_group, shards, tmp_path,
                                                                               monkeypatch):
    import json

    from click.testing import CliRunner

    from dser.cli import main
    from dser.report import collect
    from dser.rundir import RunDir

    run = tmp_path / "runs" / "crashed"
    argv = ["--stage", "1", "--config", str(config_file(tmp_path, shards)), "--run-dir", str(run)]
    real_export = train.export_model

    def crash(model, out, **kw):  # the export half written, then the process dies
        Path(out).mkdir(parents=True)
        (Path(out) / "config.yaml").write_text("stage: 1\n")
        raise KeyboardInterrupt("killed while exporting")

    monkeypatch.setattr(train, "export_model", crash)
    with pytest.raises(KeyboardInterrupt):
        make_recipe(process_group, argv).run()
    assert (run / "metrics.json").is_file() and not (run / "finished.json").exists()
    # (train.save_every is clamped to the run's 6 steps: its last checkpoint is the end)
    assert RunDir(run).status() == "stopped at step00000006" and not RunDir(run).finished()

    # nothing takes it for finished: run-status (the Slurm scripts), stage 2, predict, report
    r = CliRunner().invoke(main, ["run-status", str(run)])
    assert r.exit_code == 0 and r.output.strip() == "stopped at step00000006"
    with pytest.raises(train.RecipeError, match="that stage-1 run stopped before its end"):
        startup.check_config(train.parse_args(["--stage", "2", "--init-from", str(run), "--config",
                                               str(config_file(tmp_path, shards)), "--run-dir", str(tmp_path / "s2")]))
    clip = tmp_path / "clip.wav"
    import numpy as np
    import soundfile as sf

    sf.write(clip, np.zeros(16000, dtype=np.float32), 16000)
    r = CliRunner().invoke(main, ["predict", str(run), str(clip)])
    assert r.exit_code == 1 and "that run stopped before its end" in r.output, r.output
    (left,) = collect(tmp_path / "runs").left_out
    assert "no finished.json" in left.reason and f"dser train --resume {run}" in left.reason

    # --resume finishes it (from the checkpoint at its last step: evaluation and export only)
    monkeypatch.setattr(train, "export_model", real_export)
    assert make_recipe(process_group, ["--resume", str(run)]).run() == 0
    assert RunDir(run).status() == "finished" and json.loads((run / "metrics.json").read_text())["steps"] == 6
    assert CliRunner().invoke(main, ["run-status", str(run)]).output.strip() == "finished"


def test_dser_evaluate_gives_the_numbers_of_the_runs_own_final_evaluation(process_group, shards, tmp_path):
    """The run batches by data.max_batch_seconds=1.5 (48 is the default) and filters one test set
    by style; dser evaluate reads both from the run (fp32 here: the same numbers)."""
    import json

    from click.testing import CliRunner

    from dser.cli import main

    test = str(shards / "target" / "valid")
    run = tmp_path / "run"
    cfg = config_file(tmp_path, shards, data={"test": {"all": [test], "acted_only": [test]},
                                              "test_styles": {"acted_only": ["acted"]},
                                              "max_batch_seconds": 1.5, "eval_max_seconds": 1.5})
    assert make_recipe(process_group, ["--stage", "1", "--config", str(cfg), "--run-dir", str(run)]).run() == 0
    want = json.loads((run / "metrics.json").read_text())["eval"]
    assert want["acted_only"]["samples"] < want["all"]["samples"]
    for name, styles in (("all", []), ("acted_only", ["--styles", "acted"])):
        r = CliRunner().invoke(main, ["evaluate", str(run), "--shards", test, *styles, "--json"])
        assert r.exit_code == 0, r.output
        got = json.loads(r.output)
        assert got.keys() == want[name].keys()
        for k, v in want[name].items():
            assert got[k] == (pytest.approx(v, abs=1e-6) if isinstance(v, float) else v), (name, k)


@pytest.mark.parametrize("rate", [8000, 48000])
def test_shards_at_8_and_48_khz_train(process_group, tmp_path, rate):
    """dser shard --sample-rate 8000 wrote shards the loader called corrupt; now the loader
    resamples them (the index says their rate) to the backbone's 16 kHz."""
    import json

    root = tmp_path / "shards"
    write_test_shards(root / "target", 16, 2, group="train", seed=1, durations=(0.4, 1.0), sample_rate=rate)
    write_test_shards(root / "target", 8, 1, group="valid", seed=2, prefix="v-", durations=(0.4, 1.0),
                      sample_rate=rate)
    run = tmp_path / "run"
    recipe = make_recipe(process_group, ["--stage", "1", "--config", str(config_file(tmp_path, root)),
                                         "--run-dir", str(run)])
    assert recipe.run() == 0
    m = json.loads((run / "metrics.json").read_text())
    assert m["bad_samples"]["count"] == 0 and m["eval"]["valid"]["samples"] > 0
    batch = recipe.stream.next()
    assert batch["duration_s"] == pytest.approx(float(batch["lengths"].sum()) / 16000)
    assert int(batch["lengths"].max()) <= 16000  # data.max_seconds=1.0 at 16 kHz


def test_ia3_trains_in_stage_1_and_a_fresh_set_over_it_in_stage_2(process_group, shards, tmp_path):
    """``model.adaptors: [ia3]`` through the recipe: stage 1 trains the vectors and exports them
    (also in peft's format); stage 2 loads them, freezes them and trains a fresh set on top."""
    import json

    from dser.model.checkpoint_io import load_exported

    s1, s2 = tmp_path / "s1", tmp_path / "s2"
    cfg1 = config_file(tmp_path, shards, model={"adaptors": ["ia3"]})
    assert make_recipe(process_group, ["--stage", "1", "--config", str(cfg1), "--run-dir", str(s1)]).run() == 0
    params = json.loads((s1 / "metrics.json").read_text())["params"]
    assert params["ia3"] == {"trainable": 512, "total": 512}  # 2 layers · (key 64 + value 64 + activations 128)
    assert (s1 / "export" / "ia3" / "adapter_config.json").is_file()
    first, _, _ = load_exported(s1 / "export")
    trained = {n: p.detach().clone() for n, p in first.named_parameters() if n.startswith("ia3_")}
    assert len(trained) == 6 and all(not torch.equal(p, torch.ones_like(p)) for p in trained.values())

    cfg2 = config_file(tmp_path, shards, model={"adaptors": ["ia3"]},
                       stage2={"fresh_adaptors": ["ia3"], "freeze": ["ia3_vectors.default"]})
    recipe = make_recipe(process_group, ["--stage", "2", "--init-from", str(s1), "--config", str(cfg2),
                                         "--run-dir", str(s2)])
    assert recipe.run() == 0
    params = json.loads((s2 / "metrics.json").read_text())["params"]
    assert params["ia3"] == {"trainable": 0, "total": 512} and params["ia3 (stage2)"]["trainable"] == 512
    assert (s2 / "export" / "ia3" / "stage2" / "adapter_config.json").is_file()
    second, _, _ = load_exported(s2 / "export")
    vectors = dict(second.named_parameters())
    assert all(torch.equal(vectors[n], p) for n, p in trained.items())  # frozen: as stage 1 left them
    fresh = [p for n, p in vectors.items() if n.startswith("ia3_vectors.stage2.")]
    assert len(fresh) == 6 and all(not torch.equal(p, torch.ones_like(p)) for p in fresh)


def test_class_weights_from_the_tables_equal_those_from_reading_the_clips(tmp_path):
    from dser.data import LoaderConfig

    write_test_shards(tmp_path, 30, 2)
    indexed = LoaderConfig(shards=[str(tmp_path)], label_set="4class", train=False, num_workers=0)
    loose = LoaderConfig(shards=[str(tmp_path / "fold0" / "*.tar")], label_set="4class", train=False, num_workers=0)
    from_tables = train._class_weights(indexed, 4)
    torch.testing.assert_close(from_tables, train._class_weights(loose, 4))
    assert len(set(from_tables.tolist())) > 1  # the classes are not balanced: the weights differ
