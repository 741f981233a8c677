"""The demo's learning chain checked outside masm's trainer: a plain PyTorch loop.

Full fine-tuning of a CLIP vision tower plus a linear head on the pooled feature, on forgeries made on the
fly from real photo crops (``masm.data.pseudo_fakes``, the generator the demo trains with), scored on a
fixed, seeded in-distribution set. It answers one question before any masm machinery is involved: can
this backbone learn these forgeries within the demo's budget? If it cannot, no trainer setting will help.

    python benchmarks/chain_check.py [--backbone DIR] [--steps 600] [--lr 1e-4] [--out chain.json]

Prints the in-distribution AUC every ``--eval-every`` steps and, per forgery family, at the end.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score
from transformers import CLIPVisionModel

from masm.data import synth
from masm.data.pseudo_fakes import PseudoFakeConfig, PseudoFakeMaker
from masm.demo.experiment import DEFAULT_TRAIN_FAMILIES
from masm.demo.photos import demo_photos
from masm.demo.pretrain_data import to_model_input
from masm.models.backbones import packaged_demo_backbone_dir


def batch(maker, photos, seed: int, step: int, size: int, n: int):
    """``n`` crops, each a pseudo-fake with the maker's probability; seeded by (seed, step, index)."""
    images, labels = [], []
    for i in range(n):
        rng = np.random.default_rng([seed, step, i])
        crop = synth.to_uint8(synth.random_crop(photos, rng, size))
        image, label, _ = maker(crop, rng)
        images.append(image)
        labels.append(label)
    return to_model_input(np.stack(images)), torch.tensor(labels)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", type=Path, default=packaged_demo_backbone_dir())
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-4, help="backbone learning rate")
    parser.add_argument("--head-lr", type=float, default=1e-3)
    parser.add_argument("--schedule", choices=["constant", "cosine"], default="cosine")
    parser.add_argument("--warmup", type=int, default=50, help="linear warm-up steps")
    parser.add_argument("--strength", type=float, default=3.0)
    parser.add_argument("--families", default=",".join(DEFAULT_TRAIN_FAMILIES))
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--eval-size", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="write the curve as JSON here")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    photos, _ = demo_photos()
    families = args.families.split(",")

    def maker(probability: float, fams: list[str]) -> PseudoFakeMaker:
        config = PseudoFakeConfig(
            probability=probability, families=fams, strength=args.strength, region="random", post_process=True
        )
        return PseudoFakeMaker(config, donors=photos)

    model = CLIPVisionModel.from_pretrained(args.backbone)
    size = model.config.image_size
    head = torch.nn.Linear(model.config.hidden_size, 2)
    train_maker = maker(0.5, families)
    eval_sets = [
        batch(train_maker, photos, 10_000 + args.seed, k, size, 100) for k in range(args.eval_size // 100)
    ]
    optimizer = torch.optim.AdamW(
        [{"params": model.parameters(), "lr": args.lr}, {"params": head.parameters(), "lr": args.head_lr}],
        weight_decay=0.0,
    )

    @torch.no_grad()
    def scores(x: torch.Tensor) -> torch.Tensor:
        return F.softmax(head(model(pixel_values=x).pooler_output), -1)[:, 1]

    def evaluate() -> float:
        model.eval()
        y = torch.cat([t for _, t in eval_sets]).numpy()
        s = torch.cat([scores(x) for x, _ in eval_sets]).numpy()
        model.train()
        return float(roc_auc_score(y, s))

    def lr_factor(step: int) -> float:  # the trainer's schedule: linear warm-up, then cosine to 0
        if step < args.warmup:
            return (step + 1) / args.warmup
        if args.schedule == "constant":
            return 1.0
        return 0.5 * (1 + math.cos(math.pi * (step - args.warmup) / max(1, args.steps - args.warmup)))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    curve = []
    start = time.perf_counter()
    model.train()
    for step in range(1, args.steps + 1):
        x, y = batch(train_maker, photos, args.seed, step, size, args.batch_size)
        loss = F.cross_entropy(head(model(pixel_values=x).pooler_output), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % args.eval_every == 0 or step == args.steps:
            auc = evaluate()
            curve.append(
                {"step": step, "auc": round(auc, 4), "seconds": round(time.perf_counter() - start, 1)}
            )
            print(
                f"step {step:5d}  in-distribution AUC {auc:.4f}  ({curve[-1]['seconds']:.0f} s)", flush=True
            )

    model.eval()
    reals = torch.cat([x[t == 0] for x, t in eval_sets])
    real_scores = scores(reals).numpy()
    per_family = {}
    for family in synth.FAMILIES:
        fakes, _ = batch(maker(1.0, [family]), photos, 20_000 + args.seed, 0, size, 200)
        fake_scores = scores(fakes).numpy()
        y = np.r_[np.zeros(len(real_scores)), np.ones(len(fake_scores))]
        per_family[family] = round(float(roc_auc_score(y, np.r_[real_scores, fake_scores])), 4)
    seen = ", ".join(f"{f} {a:.3f}" for f, a in per_family.items() if f in families)
    unseen = ", ".join(f"{f} {a:.3f}" for f, a in per_family.items() if f not in families)
    print(f"per family (trained on): {seen}\nper family (held out): {unseen}")
    if args.out:
        result = {
            "args": {k: str(v) for k, v in vars(args).items()},
            "curve": curve,
            "per_family": per_family,
        }
        args.out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
