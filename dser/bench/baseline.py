"""The usual hand-written finetuning script, as the yardstick ``dser bench`` measures dser against.

This is deliberately *not* dser: what a researcher writes in an afternoon with ``transformers``,
``peft`` and PyTorch — a ``Dataset`` that reads one WAV file per clip, a ``DataLoader`` of
random batches with a fixed clip count padded to the longest clip, an audio-classification
model from ``transformers`` (projector → masked mean pooling → classifier), LoRA from ``peft``,
plain ``torch.optim.AdamW``, one process, fp32 (or bf16 autocast). It imports nothing from dser,
so ``dser bench`` compares two independent pipelines on the same model, data and step count::

    python dser/bench/baseline.py --manifest corpus/manifest.jsonl --backbone-config wavlm_dir \\
        --batch-size 8 --max-seconds 6 --steps 8 --out baseline.json

``--backbone-config`` is a directory holding a transformers ``config.json`` (dser bench writes
the config of the backbone dser trains, e.g. WavLM Base+ with LayerDrop and SpecAugment off);
the weights are random, as in the dser run.
``--lora-targets`` names the modules LoRA wraps. Note that in transformers 5.23 WavLM's
attention passes ``q_proj.weight`` … straight to ``F.multi_head_attention_forward``, so LoRA on
the attention projections is silently bypassed in a stock model (only the head would train);
the benchmark therefore adapts the feed-forward projections, which both pipelines call as
modules, and this script records how many ``lora_B`` tensors received a gradient on the first step to prove it.

``--out`` gets one JSON object: the settings, the trainable parameter count, and one record per
optimizer step (wall seconds since the previous step ended, clips, real audio seconds, padded
audio seconds), from which ``dser bench`` takes the rate after its warm-up steps.

``WavDataset`` and ``pad_collate`` are also the "plain ``torch.utils.data.Dataset``" that the
loader benchmark reads the same clips through.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

# Run as a script, Python puts this file's directory (dser/bench/, whose section files include a
# peft.py) first on sys.path; drop it so `import peft` finds the library, not dser's section.
if sys.path and Path(sys.path[0] or ".").resolve() == Path(__file__).resolve().parent:
    del sys.path[0]

import soundfile as sf
import torch
from torch.utils.data import DataLoader, Dataset

CLASSES = ["neutral", "happy", "angry", "sad"]


class WavDataset(Dataset):
    """One WAV file per item: ``(audio (T,) float32, label)``, randomly cropped to ``max_samples``."""

    def __init__(self, rows: list[dict], root: Path, max_samples: int | None = None):
        self.paths = [str(root / r["path"]) for r in rows]
        self.labels = [CLASSES.index(r["emotion"]) for r in rows]
        self.max_samples = max_samples

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        audio, _ = sf.read(self.paths[i], dtype="float32")  # (T,)
        if self.max_samples is not None and len(audio) > self.max_samples:
            start = random.randint(0, len(audio) - self.max_samples)
            audio = audio[start: start + self.max_samples]
        return torch.from_numpy(audio), self.labels[i]


def pad_collate(items: list[tuple[torch.Tensor, int]]) -> dict:
    """Pad a list of clips to the longest: ``audio`` (B, T), ``attention_mask`` (B, T) long,
    ``labels`` (B,), ``lengths`` (B,)."""
    lengths = torch.tensor([len(a) for a, _ in items])
    audio = torch.zeros(len(items), int(lengths.max()))  # (B, T)
    mask = torch.zeros(len(items), int(lengths.max()), dtype=torch.long)  # (B, T)
    for i, (a, _) in enumerate(items):
        audio[i, : len(a)] = a
        mask[i, : len(a)] = 1
    return {"audio": audio, "attention_mask": mask, "labels": torch.tensor([y for _, y in items]),
            "lengths": lengths}


def read_manifest(path: Path) -> list[dict]:
    """The rows of a JSONL manifest (``path`` relative to its directory, ``emotion``)."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="the usual transformers + peft finetuning loop (dser bench's baseline)")
    p.add_argument("--manifest", type=Path, required=True, help="JSONL with path (relative) and emotion per clip")
    p.add_argument("--backbone-config", type=Path, required=True, help="directory with a transformers config.json")
    p.add_argument("--batch-size", type=int, default=8, help="clips per batch")
    p.add_argument("--max-seconds", type=float, default=6.0, help="random crop of longer clips")
    p.add_argument("--steps", type=int, default=10, help="optimizer steps")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--lora-targets", default="intermediate_dense,output_dense",
                   help="comma-separated module names for peft's LoRA")
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--precision", choices=["fp32", "bf16-autocast"], default="fp32")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)

    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForAudioClassification

    if args.threads:
        torch.set_num_threads(args.threads)
    random.seed(args.seed)
    torch.manual_seed(args.seed)

    # ---- model: the transformers classifier, CNN frozen, LoRA via peft -----------------------
    config = AutoConfig.from_pretrained(str(args.backbone_config))
    config.num_labels = len(CLASSES)
    config.classifier_proj_size = 256
    config.use_weighted_layer_sum = False
    model = AutoModelForAudioClassification.from_config(config)
    model.freeze_feature_encoder()
    lora = LoraConfig(r=args.lora_rank, lora_alpha=2 * args.lora_rank, lora_dropout=0.0,
                      target_modules=args.lora_targets.split(","), modules_to_save=["projector", "classifier"])
    model = get_peft_model(model, lora)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=args.lr)

    # ---- data: one WAV per clip, random batches padded to the longest ------------------------
    rows = read_manifest(args.manifest)
    dataset = WavDataset(rows, args.manifest.parent, int(args.max_seconds * 16000))
    loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=True, drop_last=True,
                        num_workers=args.num_workers, collate_fn=pad_collate, persistent_workers=args.num_workers > 0)
    autocast = torch.autocast("cpu" if not torch.cuda.is_available() else "cuda", dtype=torch.bfloat16,
                              enabled=args.precision == "bf16-autocast")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)

    # ---- loop --------------------------------------------------------------------------------
    records = []
    lora_b_with_grad = 0
    batches = iter(loader)
    t_prev = time.perf_counter()
    for step in range(args.steps):
        batch = next(batches, None)
        if batch is None:
            batches = iter(loader)
            batch = next(batches)
        with autocast:
            out = model(input_values=batch["audio"].to(device), attention_mask=batch["attention_mask"].to(device),
                        labels=batch["labels"].to(device))
        out.loss.backward()
        if step == 0:
            # lora_B starts at zero, so only it gets a gradient on the first step (lora_A's is
            # B^T-shaped zero); a bypassed LoRA module gets none at all.
            lora_b_with_grad = sum(1 for n, q in model.named_parameters()
                                   if "lora_B" in n and q.grad is not None and bool(q.grad.abs().sum() > 0))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        now = time.perf_counter()
        b, t = batch["audio"].shape
        records.append({"step": step + 1, "seconds": now - t_prev, "samples": b,
                        "audio_seconds": float(batch["lengths"].sum()) / 16000, "padded_seconds": b * t / 16000,
                        "loss": float(out.loss)})
        t_prev = now

    lora_b_tensors = sum(1 for n, _ in model.named_parameters() if "lora_B" in n)
    args.out.write_text(json.dumps({
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "threads": torch.get_num_threads(),
        "layerdrop": config.layerdrop, "mask_time_prob": config.mask_time_prob,
        "trainable_params": sum(q.numel() for q in trainable),
        "lora_b_tensors": lora_b_tensors, "lora_b_tensors_with_grad": lora_b_with_grad,
        "steps": records,
    }, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
