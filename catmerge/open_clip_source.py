"""open_clip checkpoints (hub or disk): the pretrained CLIP by model name and pretrained tag
(e.g. ViT-B-32-quickgelu / openai), experts as open_clip files or the Task Arithmetic authors'
pickled `finetuned.pt` modules (only with `allow_pickle`, converted once: catmerge/checkpoints.py),
and zero-shot heads from the pretrained text tower.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from torch import nn

from .checkpoints import fetch_checkpoint
from .hub import HubFile
from .io import ArtifactError, StateDict, load_weights, save_weights

SAFETENSORS = ("open_clip_model.safetensors", "model.safetensors")
PICKLES = ("open_clip_pytorch_model.bin", "finetuned.pt", "zeroshot.pt", "pytorch_model.bin")
# Where the image tower sits in the checkpoints we read: an open_clip CLIP, a Task Arithmetic
# ImageEncoder (its CLIP under `model.`), or a bare tower.
VISUAL_PREFIXES = ("visual.", "model.visual.", "")
TEXT_TOWER = "text_tower.safetensors"


def pretrained_ref(model: str, repo: str, tag: str | None) -> str:
    """The hub repo of open_clip's pretrained tag `tag` for `model`, else `repo` as given."""
    if tag is None:
        return repo
    import open_clip

    from .configs import model_config

    config = open_clip.get_pretrained_cfg(model, tag)
    if not config or not config.get("hf_hub"):
        known = ", ".join(open_clip.list_pretrained_tags_by_model(model)) or "none"
        raise ArtifactError(f"open_clip has no hub checkpoint for model {model!r} with tag {tag!r} (hub.pretrained.tag); tags: {known}")
    if config.get("quick_gelu", False) != model_config(model).get("quick_gelu", False):
        raise ArtifactError(f"open_clip's {model!r} / {tag!r} weights were trained with quick_gelu={config.get('quick_gelu', False)}, "
                            f"but model config {model!r} uses the other activation; use model "
                            f"{model + '-quickgelu' if config.get('quick_gelu') else model.removesuffix('-quickgelu')!r}")
    return config["hf_hub"].rstrip("/")


def fetch_clip(ref: str, revision: str, sha256: str | None, allow_pickle: bool) -> tuple[StateDict, HubFile]:
    return fetch_checkpoint(ref, revision, sha256, allow_pickle, SAFETENSORS, PICKLES, modules=True)


def image_tower_weights(state: StateDict, expected: StateDict, source: str) -> StateDict:
    """The image tower's tensors under any of VISUAL_PREFIXES, checked against `expected`'s keys,
    shapes and dtypes (the error names `source`)."""
    for prefix in VISUAL_PREFIXES:
        tower = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if set(expected) <= set(tower):
            break
    else:
        missing = sorted(set(expected) - {k.removeprefix("visual.").removeprefix("model.visual.") for k in state})
        raise ArtifactError(f"{source}: no image tower that fits the model config; missing keys {missing[:5]}")
    for key, value in expected.items():
        got = tower[key]
        if got.shape != value.shape:
            raise ArtifactError(f"{source}: {key} has shape {tuple(got.shape)}, the model config expects {tuple(value.shape)}")
        if not got.is_floating_point() or not torch.isfinite(got).all():
            raise ArtifactError(f"{source}: {key} is not a finite float tensor")
    return {k: tower[k].to(v.dtype).contiguous() for k, v in expected.items()}


def text_tower_weights(state: StateDict) -> StateDict:
    """Everything but the image tower of a full open_clip CLIP state dict."""
    prefix = "model." if any(k.startswith("model.visual.") for k in state) else ""
    return {k[len(prefix):]: v.contiguous() for k, v in state.items() if k.startswith(prefix) and not k[len(prefix):].startswith("visual.")}


def zero_shot_head(model: str, text_file: str | Path, class_names: list[str], templates: list[str], cache_dir: str | Path | None) -> torch.Tensor:
    """(classes, embed_dim) unit-norm class embeddings from the CLIP text tower in `text_file`,
    prompts averaged per class; cached by the text tower's sha256, class names and templates."""
    from .models import create_full_clip

    text_file = Path(text_file)
    key = hashlib.sha256(text_file.read_bytes() + json.dumps([model, class_names, templates]).encode()).hexdigest()
    cached = Path(cache_dir) / f"{key}.safetensors" if cache_dir is not None else None
    if cached is not None and cached.is_file():
        return load_weights(cached)["weight"]
    clip, tokenizer = create_full_clip(model)
    missing, unexpected = clip.load_state_dict(load_weights(text_file), strict=False)
    missing = [k for k in missing if not k.startswith("visual.")]
    if missing or unexpected:
        raise ArtifactError(f"{text_file}: text tower does not fit model {model!r}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    with torch.no_grad():
        prompts = [t.format(name) for name in class_names for t in templates]
        embeddings = nn.functional.normalize(clip.encode_text(tokenizer(prompts)), dim=-1)
    per_class = embeddings.reshape(len(class_names), len(templates), -1).mean(dim=1)
    head = nn.functional.normalize(per_class, dim=-1).contiguous()
    if cached is not None:
        save_weights({"weight": head}, cached)
    return head
