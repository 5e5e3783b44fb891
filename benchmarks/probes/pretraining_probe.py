"""Issue 20 probe: a pretraining setting -> zero-shot accuracy on the 8 distinct-domain tasks, and
the accuracy of experts fine-tuned on a few of them.

Runs in one process, with the functions that the `pretrained` and `experts` stages call
(pretraining_mixture, pretrain, zero_shot_head, finetune), at seed 0 and data_seed 0. With the
default settings it gives probe 1's zero-shot figures in docs/benchmark.md to the digit. This file
records how those figures were made; the tests do not run it.

    PYTHONPATH=. python benchmarks/probes/pretraining_probe.py --lr 1e-3 --ink --out probe.json
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from catmerge.benchmark import sources
from catmerge.benchmark.pretraining import pretraining_mixture
from catmerge.benchmark.tasks import get_task
from catmerge.benchmark.training import TrainingBudget, finetune, pretrain, seed_everything
from catmerge.models import FrozenTextEncoder, create_clip, normalize_images, zero_shot_head

TASKS = ["mnist", "digits", "textures", "photos", "faces", "letters", "shapes", "charts"]


def ink_on_paper(rng: np.random.Generator) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Dark ink (each channel 0-89) on light paper (170-255), in place of any two colours."""
    background = tuple(int(v) for v in rng.integers(170, 256, size=3))
    foreground = tuple(int(v) for v in rng.integers(0, 90, size=3))
    return foreground, background


def accuracy(tower, head: torch.Tensor, pool) -> float:
    with torch.no_grad():
        embeddings = torch.nn.functional.normalize(tower(normalize_images(torch.from_numpy(pool.images))), dim=-1)
        return round(float(((embeddings @ head.T).argmax(1).numpy() == pool.labels).mean() * 100), 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200, help="pretraining steps (batch 256)")
    parser.add_argument("--lr", type=float, default=1e-3, help="pretraining lr")
    parser.add_argument("--name-rate", type=float, default=0.3, help="web captions: share that name the content")
    parser.add_argument("--ink", action="store_true", help="letters and shapes drawn by ink_on_paper")
    parser.add_argument("--ft-steps", type=int, default=300, help="fine-tuning steps (batch 64)")
    parser.add_argument("--ft-lr", type=float, default=3e-4)
    parser.add_argument("--ft-tasks", nargs="*", default=["letters", "shapes", "digits"])
    parser.add_argument("--model", default="mini-vit-minilm")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.ink:
        sources._two_colours = ink_on_paper

    start = time.time()
    generator = seed_everything(0)
    clip = create_clip(args.model)
    encoder = FrozenTextEncoder(clip, args.model)
    images, captions = pretraining_mixture(0, np.random.default_rng([0, 7]), "web", args.name_rate)
    distinct = sorted(set(captions))
    caption_ids = np.array([distinct.index(c) for c in captions])
    losses = pretrain(clip.visual, clip.text.proj, clip.logit_scale, images, encoder.pooled(distinct), caption_ids,
                      TrainingBudget(args.steps, 256, args.lr, 0.1, 30), generator)
    pretrain_seconds = time.time() - start
    logit_scale = float(clip.logit_scale.detach().exp())
    pretrained = copy.deepcopy(clip.visual.state_dict())

    pools, heads, zero_shot = {}, {}, {}
    for task in TASKS:
        spec = get_task(task)
        pools[task] = spec.build(0)
        heads[task] = zero_shot_head(clip.text.proj, encoder, spec.class_names, spec.templates)
        zero_shot[task] = accuracy(clip.visual, heads[task], pools[task]["test"])
    out = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
           "pretrain_s": round(pretrain_seconds, 1), "pretrain_loss_last": round(float(np.mean(losses[-10:])), 3),
           "logit_scale": round(logit_scale, 2), "zero_shot": zero_shot,
           "zero_shot_avg": round(float(np.mean(list(zero_shot.values()))), 1), "expert": {}}
    print(json.dumps(out), flush=True)

    for task in args.ft_tasks:
        clip.visual.load_state_dict(pretrained)
        train = pools[task]["train"]
        started = time.time()
        finetune(clip.visual, heads[task], logit_scale, torch.from_numpy(train.images), torch.from_numpy(train.labels),
                 TrainingBudget(args.ft_steps, 64, args.ft_lr, 0.1, 10), seed_everything(1))
        out["expert"][task] = accuracy(clip.visual, heads[task], pools[task]["test"])
        out[f"ft_s_{task}"] = round(time.time() - started, 1)
        print(task, out["expert"][task], flush=True)
    print("RESULT", json.dumps(out), flush=True)
    if args.out:
        args.out.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
