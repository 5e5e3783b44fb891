"""Training for the offline benchmark: contrastive pretraining of the image tower, then experts.

Pretraining aligns the image tower with the frozen MiniLM text tower on generic captions
(only the text tower's linear projection and the logit scale learn beside the image tower).
Experts are fine-tuned from it, image tower only, against their task's frozen zero-shot head,
as the paper's experts were.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..models import normalize_images
from ..progress import progress


@dataclass(frozen=True)
class TrainingBudget:
    steps: int
    batch_size: int
    lr: float
    weight_decay: float
    warmup_steps: int


def task_seed(seed: int, task: str) -> int:
    """A per-task seed that does not depend on the order or number of tasks."""
    return seed * 1_000_003 + zlib.crc32(task.encode())


def seed_everything(seed: int) -> torch.Generator:
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)
    return torch.Generator().manual_seed(seed)


def _optimizer(params, budget: TrainingBudget):
    opt = torch.optim.AdamW(params, lr=budget.lr, weight_decay=budget.weight_decay)

    def schedule(step: int) -> float:  # linear warmup, cosine decay
        if step < budget.warmup_steps:
            return (step + 1) / budget.warmup_steps
        progress = (step - budget.warmup_steps) / max(1, budget.steps - budget.warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, schedule)


def _train(model: nn.Module, params, batch_loss, n: int, budget: TrainingBudget, generator: torch.Generator, desc: str):
    """AdamW steps on batches drawn with replacement from n items; returns the loss per step."""
    opt, sched = _optimizer(params, budget)
    model.train()
    losses = []
    for _ in progress(range(budget.steps), desc):
        idx = torch.randint(0, n, (min(budget.batch_size, n),), generator=generator)
        loss = batch_loss(idx)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    model.eval()
    return losses


def pretrain(
    visual: nn.Module,
    text_proj: nn.Module,
    logit_scale: nn.Parameter,
    images: np.ndarray,
    caption_features: torch.Tensor,
    caption_ids: np.ndarray,
    budget: TrainingBudget,
    generator: torch.Generator,
    desc: str = "pretrain",
) -> list[float]:
    """Image-to-text contrastive training against the bank of all distinct captions.

    With few distinct captions, in-batch CLIP loss would treat copies of the same caption as
    negatives; scoring each image against every distinct caption avoids that false-negative noise.
    """
    images_t = torch.from_numpy(images)
    targets = torch.from_numpy(caption_ids)

    def batch_loss(idx: torch.Tensor) -> torch.Tensor:
        img = nn.functional.normalize(visual(normalize_images(images_t[idx])), dim=-1)
        txt = nn.functional.normalize(text_proj(caption_features), dim=-1)
        logits = logit_scale.exp().clamp(max=100) * img @ txt.T
        return nn.functional.cross_entropy(logits, targets[idx])

    params = list(visual.parameters()) + list(text_proj.parameters()) + [logit_scale]
    return _train(visual, params, batch_loss, len(images_t), budget, generator, desc)


def finetune(
    visual: nn.Module,
    head: torch.Tensor,
    logit_scale: float,
    images: torch.Tensor,
    labels: torch.Tensor,
    budget: TrainingBudget,
    generator: torch.Generator,
    desc: str = "finetune",
) -> list[float]:
    """Cross-entropy fine-tuning of the image tower against a frozen zero-shot head."""

    def batch_loss(idx: torch.Tensor) -> torch.Tensor:
        emb = nn.functional.normalize(visual(normalize_images(images[idx])), dim=-1)
        return nn.functional.cross_entropy(logit_scale * emb @ head.T, labels[idx])

    return _train(visual, visual.parameters(), batch_loss, len(images), budget, generator, desc)
