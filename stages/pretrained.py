"""Stage `pretrained`: the pretrained image tower theta_0, and what zero-shot heads need of the text side.

source `builtin`: contrastive pretraining of a tiny open_clip ViT against the frozen MiniLM text
tower, on generic captions over the training splits of every packaged image source.
source `hf` / `local`: the image and text towers of a transformers `CLIPModel` checkpoint
(`hub.pretrained`: a hub repo id, or a local directory), checked against the model config.
source `open_clip`: an open_clip CLIP checkpoint (`hub.pretrained.tag`, e.g. openai, resolved by
open_clip to its hub repo; or `hub.pretrained.repo`).
"""

import numpy as np
import torch

from catmerge.benchmark.pretraining import pretraining_mixture
from catmerge.benchmark.training import TrainingBudget, pretrain, seed_everything
from catmerge.cli import run_stage
from catmerge.io import atomic_dir, file_record, save_weights, write_json
from catmerge.layout import PRETRAINED_DIR, PRETRAINED_TEXT, PRETRAINED_TOWER
from catmerge.models import FrozenTextEncoder, create_clip
from catmerge.params import load_params


def main() -> None:
    params = load_params()
    {"builtin": builtin, "hf": from_hub, "local": from_hub, "open_clip": from_open_clip}[params.source](params)


def from_open_clip(params) -> None:
    from catmerge import open_clip_source
    from catmerge.models import create_image_tower

    hub = params.hub.pretrained
    ref = open_clip_source.pretrained_ref(params.model, hub.repo, hub.tag)
    state, weights_file = open_clip_source.fetch_clip(ref, hub.revision, hub.sha256, params.hub.allow_pickle)
    expected = create_image_tower(params.model).state_dict()
    tower = open_clip_source.image_tower_weights(state, expected, f"{ref}/{weights_file.filename}")
    meta = {"model": params.model}
    with atomic_dir(PRETRAINED_DIR) as out:
        save_weights(tower, out / PRETRAINED_TOWER.name, meta)
        save_weights(open_clip_source.text_tower_weights(state), out / open_clip_source.TEXT_TOWER, meta)
        written = [out / PRETRAINED_TOWER.name, out / open_clip_source.TEXT_TOWER]
        write_json(
            {
                "source": params.source,
                "model": params.model,
                "hub": [weights_file.record()],
                "torch": torch.__version__,
                "files": [file_record(p, out, f"open_clip:{ref}@{weights_file.revision}") for p in written],
            },
            out / "manifest.json",
        )


def from_hub(params) -> None:
    from catmerge.checkpoints import fetch_file
    from catmerge.hf_clip import fetch_weights, image_tower_weights, save_text_tower
    from catmerge.io import read_json
    from catmerge.models import create_image_tower

    hub = params.hub.pretrained
    config_file = fetch_file(hub.repo, "config.json", hub.revision)
    state, weights_file = fetch_weights(hub.repo, hub.revision, hub.sha256, params.hub.allow_pickle)
    expected = create_image_tower(params.model).state_dict()
    tower = image_tower_weights(state, expected, f"{hub.repo}/{weights_file.filename}")
    with atomic_dir(PRETRAINED_DIR) as out:
        save_weights(tower, out / PRETRAINED_TOWER.name, {"model": params.model})
        tokenizer = save_text_tower(state, read_json(config_file.path), hub.repo, hub.revision, out / "text")
        written = [out / PRETRAINED_TOWER.name, *sorted((out / "text").iterdir())]
        write_json(
            {
                "source": params.source,
                "model": params.model,
                "hub": [f.record() for f in (weights_file, config_file, *tokenizer)],
                "torch": torch.__version__,
                "files": [file_record(p, out, f"hf:{hub.repo}@{weights_file.revision}") for p in written],
            },
            out / "manifest.json",
        )


def builtin(params) -> None:
    generator = seed_everything(params.seed)
    clip = create_clip(params.model)
    encoder = FrozenTextEncoder(clip, params.model)

    images, captions = pretraining_mixture(params.data_seed, np.random.default_rng([params.seed, 7]), params.pretrain.captions,
                                           params.pretrain.name_rate)
    distinct = sorted(set(captions))
    caption_ids = np.array([distinct.index(c) for c in captions], dtype=np.int64)
    caption_features = encoder.pooled(distinct)

    budget = TrainingBudget(**params.pretrain.model_dump(exclude={"captions", "name_rate"}))
    losses = pretrain(clip.visual, clip.text.proj, clip.logit_scale, images, caption_features, caption_ids, budget, generator)
    print(f"pretraining loss: first {losses[0]:.3f}, last {np.mean(losses[-10:]):.3f}")

    meta = {"model": params.model}
    with atomic_dir(PRETRAINED_DIR) as out:
        save_weights(clip.visual.state_dict(), out / PRETRAINED_TOWER.name, meta)
        text = {"proj.weight": clip.text.proj.weight, "logit_scale": clip.logit_scale.detach().exp().reshape(1)}
        save_weights(text, out / PRETRAINED_TEXT.name, meta)
        files = [file_record(out / p.name, out, "builtin:pretraining") for p in (PRETRAINED_TOWER, PRETRAINED_TEXT)]
        write_json(
            {
                "source": params.source,
                "model": params.model,
                "seed": params.seed,
                "data_seed": params.data_seed,
                "pretrain": params.pretrain.model_dump(),
                "images": len(images),
                "captions": distinct,
                "final_loss": float(np.mean(losses[-10:])),
                "torch": torch.__version__,
                "files": files,
            },
            out / "manifest.json",
        )


if __name__ == "__main__":
    run_stage("pretrained", main)
