"""HF transformers CLIP checkpoints (hub or disk): the pretrained image tower, experts, and
zero-shot heads from the pretrained text tower.

Checkpoints are read as safetensors state dicts, never through `from_pretrained` (which could run
a pickle or remote code); a `pytorch_model.bin`-only repo needs `allow_pickle` (catmerge/checkpoints.py).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import torch
from torch import nn

from .checkpoints import fetch_checkpoint, fetch_file, holds
from .hub import HubFile, head_cache_dir  # noqa: F401 - head_cache_dir: where the stages find it
from .io import ArtifactError, StateDict, atomic_path, load_weights, save_weights

SAFETENSORS, PICKLE = "model.safetensors", "pytorch_model.bin"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt")
VISION_PREFIX, PROJECTION = "vision_model.", "visual_projection.weight"
TEXT_PREFIX, TEXT_PROJECTION = "text_model.", "text_projection.weight"


def fetch_weights(ref: str, revision: str, sha256: str | None, allow_pickle: bool) -> tuple[StateDict, HubFile]:
    """A transformers checkpoint's tensors: `model.safetensors`, or (only with `allow_pickle`)
    `pytorch_model.bin`; `ref` is a hub repo id or a local directory or file."""
    return fetch_checkpoint(ref, revision, sha256, allow_pickle, (SAFETENSORS,), (PICKLE,))


def image_tower_weights(state: StateDict, expected: StateDict, source: str, projection: torch.Tensor | None = None) -> StateDict:
    """The image tower's tensors from a `CLIPModel`, `CLIPVisionModel(WithProjection)` state dict,
    with or without the `vision_model.` prefix (transformers 5 saves vision models without it).
    A vision-only checkpoint has no projection: `projection` (the pretrained one) fills it.
    Keys and shapes must be exactly those of `expected`; the error names `source` and the keys."""
    if not any(k.startswith(VISION_PREFIX) for k in state):
        state = {(k if k == PROJECTION else VISION_PREFIX + k): v for k, v in state.items()}
    tower = {k: v for k, v in state.items() if k.startswith(VISION_PREFIX) or k == PROJECTION}
    tower = {k: v for k, v in tower.items() if not k.endswith("position_ids")}  # a buffer older checkpoints kept
    if PROJECTION not in tower and projection is not None:
        tower[PROJECTION] = projection
    missing, extra = sorted(set(expected) - set(tower)), sorted(set(tower) - set(expected))
    if missing or extra:
        raise ArtifactError(f"{source}: does not fit the model config; missing keys {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                            f"unexpected keys {extra[:5]}{'...' if len(extra) > 5 else ''}")
    for key, value in tower.items():
        if value.shape != expected[key].shape:
            raise ArtifactError(f"{source}: {key} has shape {tuple(value.shape)}, the model config expects {tuple(expected[key].shape)}")
        if not value.is_floating_point():
            raise ArtifactError(f"{source}: {key} has dtype {value.dtype}, expected a float tensor")
        if not torch.isfinite(value).all():
            raise ArtifactError(f"{source}: {key} contains NaN or Inf")
    return {k: tower[k].to(expected[k].dtype).contiguous() for k in expected}


def save_text_tower(state: StateDict, config: dict, repo: str, revision: str, out: Path) -> list[HubFile]:
    """The text half of a `CLIPModel` checkpoint (weights, config, tokenizer files) into `out`, for
    zero-shot heads. Returns the tokenizer files fetched."""
    text = {k: v for k, v in state.items() if k.startswith(TEXT_PREFIX) or k in (TEXT_PROJECTION, "logit_scale")}
    text = {k: v for k, v in text.items() if not k.endswith("position_ids")}
    if TEXT_PROJECTION not in text or not any(k.startswith(TEXT_PREFIX) for k in text):
        raise ArtifactError(f"model repo {repo}: no text tower ({TEXT_PREFIX}*, {TEXT_PROJECTION}); the pretrained repo must be a "
                            f"full CLIPModel checkpoint to build zero-shot heads")
    out.mkdir(parents=True, exist_ok=True)
    save_weights(text, out / "text_tower.safetensors")
    with atomic_path(out / "config.json") as tmp:
        tmp.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    fetched = [fetch_file(repo, name, revision) for name in TOKENIZER_FILES if holds(repo, name, revision)]
    if not any(f.filename in ("tokenizer.json", "vocab.json") for f in fetched):
        raise ArtifactError(f"model repo {repo} (revision {revision}): no tokenizer (tokenizer.json or vocab.json + merges.txt)")
    for hub_file in fetched:
        with atomic_path(out / hub_file.filename) as tmp:
            shutil.copyfile(hub_file.path, tmp)
    return fetched


class TextTower:
    """A saved CLIP text tower: prompts -> unit-norm text embeddings."""

    def __init__(self, directory: str | Path):
        from transformers import AutoTokenizer, CLIPTextConfig, CLIPTextModelWithProjection

        directory = Path(directory)
        config = json.loads((directory / "config.json").read_text())
        text_config = CLIPTextConfig(**{**config.get("text_config", {}), "projection_dim": config.get("projection_dim", 512)})
        self.model = CLIPTextModelWithProjection(text_config).eval()
        weights = load_weights(directory / "text_tower.safetensors")
        wanted = set(self.model.state_dict())
        state = {k: v for k, v in weights.items() if k in wanted}
        missing = sorted(wanted - set(state) - {k for k in wanted if k.endswith("position_ids")})
        if missing:
            raise ArtifactError(f"{directory / 'text_tower.safetensors'}: missing text tower keys {missing[:5]}")
        try:
            self.model.load_state_dict(state, strict=False)
        except RuntimeError as exc:
            raise ArtifactError(f"{directory / 'text_tower.safetensors'} does not fit {directory / 'config.json'}: {exc}") from None
        self.tokenizer = AutoTokenizer.from_pretrained(str(directory))
        self.max_length = text_config.max_position_embeddings

    @torch.no_grad()
    def embed(self, prompts: list[str], batch_size: int = 256) -> torch.Tensor:
        out = []
        for start in range(0, len(prompts), batch_size):
            tokens = self.tokenizer(prompts[start : start + batch_size], padding=True, truncation=True,
                                    max_length=self.max_length, return_tensors="pt")
            out.append(self.model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]).text_embeds)
        return nn.functional.normalize(torch.cat(out), dim=-1)


def zero_shot_head(text_dir: str | Path, class_names: list[str], templates: list[str], cache_dir: str | Path | None) -> torch.Tensor:
    """(classes, embed_dim) unit-norm class embeddings, prompts averaged per class (CLIP zero-shot).

    Cached by the sha256 of the text tower's files, class names and templates, so a head is built
    once per backbone and label set whatever experts are merged (e.g. another expert revision)."""
    text_dir = Path(text_dir)
    key = hashlib.sha256()
    for path in sorted(p for p in text_dir.iterdir() if p.is_file()):
        key.update(path.name.encode() + b"\0" + path.read_bytes())
    key.update(json.dumps([class_names, templates]).encode())
    cached = Path(cache_dir) / f"{key.hexdigest()}.safetensors" if cache_dir is not None else None
    if cached is not None and cached.is_file():
        return load_weights(cached)["weight"]
    tower = TextTower(text_dir)
    embeddings = tower.embed([t.format(name) for name in class_names for t in templates])
    per_class = embeddings.reshape(len(class_names), len(templates), -1).mean(dim=1)
    head = nn.functional.normalize(per_class, dim=-1).contiguous()
    if cached is not None:
        save_weights({"weight": head}, cached)
    return head

