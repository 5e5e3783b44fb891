"""Tiny hub checkpoints and datasets in a hub-layout cache (HF_HOME/hub), so `source: hf` runs
offline by repo id exactly as it would against the hub.

- openai/clip-vit-base-patch32: a tiny `CLIPModel` (the micro-hf-clip vision tower, a one-layer
  text tower, a 514-token byte-level CLIP tokenizer), saved by transformers.
- tanganke/clip-vit-base-patch32_<task>: experts = the pretrained vision tower fine-tuned for a
  few steps on the task's train images against its zero-shot head (so they beat the pretrained
  model); `mnist` saved by transformers 5 (keys without `vision_model.`), `eurosat` hub-style
  (with the prefix), `dtd` only as a pickle (`pytorch_model.bin`).
- ylecun/mnist, tanganke/eurosat, tanganke/dtd: parquet train/test files with Image + ClassLabel
  columns, at the registry's file paths, 40x48 images (so resize and crop are exercised).
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import torch

COMMIT = "0123456789abcdef0123456789abcdef01234567"
PRETRAINED = "openai/clip-vit-base-patch32"
EXPERT = "tanganke/clip-vit-base-patch32_{task}"
DATASETS = {"mnist": ("ylecun/mnist", "mnist/{split}-00000-of-00001.parquet", [str(d) for d in range(10)]),
            "eurosat": ("tanganke/eurosat", "data/{split}-00000-of-00001.parquet",
                        ["annual_crop", "forest", "herbaceous_vegetation", "highway", "industrial", "pasture",
                         "permanent_crop", "residential", "river", "sea_lake"]),
            "dtd": ("tanganke/dtd", "data/{split}-00000-of-00001.parquet", ["banded", "blotchy", "braided", "bubbly"])}


def snapshot(hf_home: Path, repo: str, kind: str = "model") -> Path:
    """The snapshot folder of `repo` at COMMIT, with refs/main pointing at it."""
    root = hf_home / "hub" / f"{kind}s--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / "main").write_text(COMMIT)
    path = root / "snapshots" / COMMIT
    path.mkdir(parents=True, exist_ok=True)
    return path


def tiny_clip():
    from transformers import CLIPConfig, CLIPModel

    from catmerge.configs import model_config

    vision = model_config("micro-hf-clip")
    text = {"vocab_size": 514, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
            "max_position_embeddings": 32, "bos_token_id": 512, "eos_token_id": 513, "pad_token_id": 513, "hidden_act": "gelu"}
    torch.manual_seed(0)
    return CLIPModel(CLIPConfig(text_config=text, vision_config=vision["vision_cfg"], projection_dim=vision["embed_dim"]))


def save_tokenizer(path: Path) -> None:
    from open_clip.tokenizer import bytes_to_unicode
    from transformers import CLIPTokenizer

    chars = list(bytes_to_unicode().values())
    vocab = {t: i for i, t in enumerate(chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"])}
    (path / "vocab.json").write_text(json.dumps(vocab))
    (path / "merges.txt").write_text("#version: 0.2\n")
    CLIPTokenizer(vocab=str(path / "vocab.json"), merges=str(path / "merges.txt")).save_pretrained(str(path))


def class_images(class_count: int, per_class: int, seed: int, size: tuple[int, int] = (40, 48)) -> tuple[np.ndarray, np.ndarray]:
    """Per class, images of one mean colour plus noise (so a class is learnable)."""
    rng = np.random.default_rng(seed)
    colours = np.random.default_rng(7).integers(30, 225, size=(class_count, 3))
    images = [np.clip(c + rng.normal(0, 25, size=(*size, 3)), 0, 255).astype(np.uint8) for c in colours for _ in range(per_class)]
    return np.stack(images), np.repeat(np.arange(class_count), per_class)


def expert_state(clip, text_dir: Path, task: str) -> dict[str, torch.Tensor]:
    """The vision tower (and projection) fine-tuned 40 steps on the task against its zero-shot head."""
    from catmerge.benchmark.training import TrainingBudget, finetune
    from catmerge.hf_clip import zero_shot_head
    from catmerge.hub_datasets import hub_task
    from catmerge.models import create_image_tower

    spec = hub_task(task)
    names = spec.class_names or [n.replace("_", " ") for n in DATASETS[task][2]]
    head = zero_shot_head(text_dir, names, spec.templates, None)
    tower = create_image_tower("micro-hf-clip")
    tower.load_state_dict({k: v for k, v in clip.state_dict().items() if k.startswith("vision_model.") or k == "visual_projection.weight"})
    images, labels = class_images(len(names), 12, sum(map(ord, task)), (32, 32))
    budget = TrainingBudget(steps=40, batch_size=32, lr=3e-3, weight_decay=0.0, warmup_steps=4)
    finetune(tower, head, 30.0, torch.from_numpy(images), torch.from_numpy(labels), budget, torch.Generator().manual_seed(0))
    return {k: v.detach().clone() for k, v in tower.state_dict().items() if k.startswith("vision_model.")}


def build_hub_cache(hf_home: Path, tasks=("mnist", "eurosat", "dtd"), images_per_class: int = 6) -> dict:
    """Everything above; returns {"clip": the CLIPModel, "experts": {task: vision state with prefix}}."""
    from safetensors.torch import save_file
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from catmerge.hf_clip import TEXT_PREFIX, TEXT_PROJECTION

    clip = tiny_clip()
    path = snapshot(hf_home, PRETRAINED)
    clip.save_pretrained(str(path))
    save_tokenizer(path)
    text_dir = hf_home / "text-tower-for-fine-tuning"  # what the pretrained stage extracts, for the experts' heads
    text_dir.mkdir(exist_ok=True)
    save_file({k: v.contiguous() for k, v in clip.state_dict().items() if k.startswith(TEXT_PREFIX) or k == TEXT_PROJECTION},
              str(text_dir / "text_tower.safetensors"))
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (text_dir / name).write_bytes((path / name).read_bytes())
    experts = {}
    for task in tasks:
        state = expert_state(clip, text_dir, task)
        experts[task] = state
        path = snapshot(hf_home, EXPERT.format(task=task))
        (path / "config.json").write_text(json.dumps(clip.config.vision_config.to_dict()))
        if task == "mnist":  # transformers 5 saves a CLIPVisionModel without the vision_model. prefix
            model = CLIPVisionModel(CLIPVisionConfig(**clip.config.vision_config.to_dict()))
            model.load_state_dict({k.removeprefix("vision_model."): v for k, v in state.items()})
            model.save_pretrained(str(path))
        elif task == "dtd":
            torch.save({k: v.clone() for k, v in state.items()}, path / "pytorch_model.bin")
        else:
            save_file({k: v.contiguous() for k, v in state.items()}, str(path / "model.safetensors"))
        repo, files, names = DATASETS[task]
        for split, count in (("train", images_per_class * 3), ("test", images_per_class)):
            write_parquet(snapshot(hf_home, repo, "dataset") / files.format(split=split), names, count, sum(map(ord, task + split)))
    return {"clip": clip, "experts": experts}


def write_parquet(path: Path, class_names: list[str], per_class: int, seed: int) -> None:
    """`class_images` as 40x48 RGB PNGs in a parquet file with Image + ClassLabel columns."""
    import datasets
    from PIL import Image

    rows = {"image": [], "label": []}
    for pixels, label in zip(*class_images(len(class_names), per_class, seed)):
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG")
        rows["image"].append({"bytes": buffer.getvalue(), "path": None})
        rows["label"].append(int(label))
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=class_names)})
    path.parent.mkdir(parents=True, exist_ok=True)
    datasets.Dataset.from_dict(rows, features=features).to_parquet(str(path))
