"""Models built from architecture configs (see configs.py): image towers of two families (open_clip
`VisionTransformer`, HF transformers CLIP vision model with its projection) and open_clip CLIP pairs.

A config's `family` says which: "open_clip" (the default) or "hf_clip". Either way the tower maps
normalized images (N, 3, H, W) to image embeddings, so training, scoring and capture code does
not care which family it runs.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from open_clip.model import CustomTextCLIP, _build_vision_tower
from torch import nn

from .configs import model_config
from .io import ArtifactError, WeightsFile
from .params import resolve_device  # noqa: F401 - public here, where the models are

IMAGE_MEAN = torch.tensor(OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
IMAGE_STD = torch.tensor(OPENAI_DATASET_STD).view(1, 3, 1, 1)


def create_image_tower(name: str) -> nn.Module:
    """The image tower of config `name`, randomly initialised, in eval mode."""
    config = model_config(name)
    if config.get("family", "open_clip") == "hf_clip":
        return hf_clip_image_tower(config).eval()
    tower = _build_vision_tower(config["embed_dim"], config["vision_cfg"], quick_gelu=config.get("quick_gelu", False))
    return tower.eval()


def hf_clip_image_tower(config: dict) -> nn.Module:
    """HF `CLIPVisionModelWithProjection` whose forward maps pixel values to image embeddings.

    Its state dict has the hub's CLIP keys (`vision_model.*`, `visual_projection.weight`), so a
    `CLIPModel` or `CLIPVisionModel` checkpoint loads into it by key, without renaming.
    """
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    class HFCLIPImageTower(CLIPVisionModelWithProjection):
        def forward(self, pixel_values):
            return super().forward(pixel_values=pixel_values).image_embeds

    vision = CLIPVisionConfig(projection_dim=config["embed_dim"], **config["vision_cfg"])
    return HFCLIPImageTower(vision)


def copy_weights(model: nn.Module, weights: Mapping[str, torch.Tensor]) -> nn.Module:
    """Load `weights` into `model` one tensor at a time, as strictly as load_state_dict (same keys,
    same shapes): a state dict read or computed lazily is never whole in memory beside the model.
    A floating-point tensor with NaN or Inf is refused (ArtifactError naming the file, when
    `weights` is one, and the key)."""
    own = model.state_dict()
    missing, extra = sorted(set(own) - set(weights)), sorted(set(weights) - set(own))
    if missing or extra:
        raise RuntimeError(f"keys differ from the model: missing {missing[:5]}, unexpected {extra[:5]}")
    source = getattr(weights, "path", None)
    with torch.no_grad():
        for name, target in own.items():
            value = weights[name]
            if value.shape != target.shape:
                raise RuntimeError(f"{name} is {tuple(value.shape)}, the model has {tuple(target.shape)}")
            if value.is_floating_point() and not torch.isfinite(value).all():
                raise ArtifactError(f"{source}: {name} contains NaN or Inf" if source else f"{name} contains NaN or Inf")
            target.copy_(value)
    return model


def load_into(model: nn.Module, path) -> nn.Module:
    """Load a safetensors state dict into `model`, naming the file if it does not fit."""
    try:
        copy_weights(model, WeightsFile(path))
    except RuntimeError as exc:
        if isinstance(exc, ArtifactError):
            raise
        raise ArtifactError(f"{path} does not fit the model architecture: {exc}") from None
    return model


def create_full_clip(name: str) -> tuple[nn.Module, object]:
    """(open_clip CLIP of config `name` with random weights, its tokenizer): for zero-shot heads
    from a checkpoint's text tower. Our configs with an HF text tower use `create_clip`."""
    import open_clip

    config = model_config(name)
    text_cfg = config.get("text_cfg", {})
    if "hf_model_name" in text_cfg:
        from open_clip.tokenizer import HFTokenizer

        return create_clip(name), HFTokenizer(text_cfg["hf_tokenizer_name"], context_length=text_cfg.get("context_length", 32))
    clip = open_clip.CLIP(config["embed_dim"], config["vision_cfg"], text_cfg, quick_gelu=config.get("quick_gelu", False))
    return clip.eval(), open_clip.tokenizer.SimpleTokenizer(context_length=text_cfg.get("context_length", 77))


def create_clip(name: str) -> CustomTextCLIP:
    """Image tower plus (pretrained, HF) text tower of config `name`."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the weight-loading bar says nothing about our stages
    config = model_config(name)  # a fresh dict per call: CustomTextCLIP may keep references
    return CustomTextCLIP(config["embed_dim"], config["vision_cfg"], config["text_cfg"])


def normalize_images(images_uint8: torch.Tensor) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) float, CLIP normalisation (the evaluation preprocessing)."""
    x = images_uint8.permute(0, 3, 1, 2).float().div_(255.0)
    return (x - IMAGE_MEAN) / IMAGE_STD


@torch.no_grad()
def encode_images(tower: nn.Module, images_uint8: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """L2-normalised image embeddings (on the CPU) for a uint8 image batch, computed on the
    tower's device."""
    tower.eval()
    device = next(tower.parameters()).device
    out = []
    for start in range(0, len(images_uint8), batch_size):
        x = normalize_images(images_uint8[start : start + batch_size]).to(device)
        out.append(nn.functional.normalize(tower(x), dim=-1).cpu())
    return torch.cat(out)


class FrozenTextEncoder:
    """Mean-pooled MiniLM features of strings (the frozen body of the text tower), cached.

    The trainable part of the text tower, its linear projection, is applied by the caller.
    """

    def __init__(self, clip: CustomTextCLIP, config_name: str):
        from open_clip.tokenizer import HFTokenizer

        text_cfg = model_config(config_name)["text_cfg"]
        self.text = clip.text
        self.tokenizer = HFTokenizer(text_cfg["hf_tokenizer_name"], context_length=text_cfg.get("context_length", 32))
        self._cache: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def pooled(self, strings: list[str]) -> torch.Tensor:
        missing = [s for s in dict.fromkeys(strings) if s not in self._cache]
        if missing:
            tokens = self.tokenizer(missing)
            mask = (tokens != self.text.config.pad_token_id).long()
            self.text.transformer.eval()
            hidden = self.text.transformer(input_ids=tokens, attention_mask=mask)
            pooled = self.text.pooler(hidden, mask)
            for s, row in zip(missing, pooled):
                self._cache[s] = row
        return torch.stack([self._cache[s] for s in strings])


def zero_shot_head(
    text_proj: nn.Module, encoder: FrozenTextEncoder, class_names: list[str], templates: list[str]
) -> torch.Tensor:
    """(num_classes, embed_dim) unit-norm class embeddings: prompts averaged per class (CLIP zero-shot)."""
    rows = []
    with torch.no_grad():
        for name in class_names:
            prompts = [t.format(name) for t in templates]
            emb = nn.functional.normalize(text_proj(encoder.pooled(prompts)), dim=-1)
            rows.append(nn.functional.normalize(emb.mean(0), dim=-1))
    return torch.stack(rows)
