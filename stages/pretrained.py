"""Stage `pretrained`: the pretrained image tower theta_0 and the text projection.

source `builtin`: contrastive pretraining of a tiny open_clip ViT against the frozen MiniLM text
tower, on generic captions over the training splits of every packaged image source.
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
    generator = seed_everything(params.seed)
    clip = create_clip(params.model)
    encoder = FrozenTextEncoder(clip, params.model)

    images, captions = pretraining_mixture(params.data_seed, np.random.default_rng([params.seed, 7]), params.pretrain.captions)
    distinct = sorted(set(captions))
    caption_ids = np.array([distinct.index(c) for c in captions], dtype=np.int64)
    caption_features = encoder.pooled(distinct)

    budget = TrainingBudget(**params.pretrain.model_dump(exclude={"captions"}))
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
