"""Stage `experts@<task>`: task k's zero-shot head and its expert image tower theta_k.

source `builtin`: the head is built from the task's class-name prompts through the pretrained
text tower; the expert is the pretrained image tower fine-tuned on the task's train split
against that frozen head.
source `hf` / `local` / `open_clip`: the expert is the task's checkpoint (`hub.experts`: a hub
repo id or local path, `{task}` filled in; a transformers vision-only checkpoint gets the
pretrained visual projection; an open_clip one may be a Task Arithmetic `finetuned.pt` pickle,
with `hub.allow_pickle`), checked against theta_0's keys and shapes; the head is built from the
pretrained CLIP text tower, cached per text tower and label set.
"""

import torch

from catmerge.benchmark.training import TrainingBudget, finetune, seed_everything, task_seed
from catmerge.cli import check_task_argument, run_stage
from catmerge.data import read_split
from catmerge.io import (
    atomic_dir,
    file_record,
    load_tensor,
    load_weights,
    save_weights,
    verify_manifest,
    write_json,
)
from catmerge.layout import (
    PRETRAINED_TEXT,
    PRETRAINED_TOWER,
    checked_dataset_info,
    checked_pretrained,
    checked_split,
    expert_dir,
)
from catmerge.models import FrozenTextEncoder, create_clip, load_into, zero_shot_head
from catmerge.params import load_params


def main(task: str) -> None:
    params = load_params()
    check_task_argument(params, task)
    source = {"builtin": builtin, "hf": from_hub, "local": from_hub, "open_clip": from_open_clip}[params.source]
    source(params, task, checked_dataset_info(task))


def from_open_clip(params, task: str, info: dict) -> None:
    from catmerge import open_clip_source
    from catmerge.hf_clip import head_cache_dir
    from catmerge.layout import PRETRAINED_DIR

    hub = params.hub.experts
    ref, revision = hub.repo.format(task=task), hub.revisions.get(task, hub.revision)
    state, weights_file = open_clip_source.fetch_clip(ref, revision, hub.sha256.get(task), params.hub.allow_pickle)
    verify_manifest(PRETRAINED_DIR)  # the tower and the text side the head comes from
    pretrained = load_weights(PRETRAINED_TOWER)
    expert = open_clip_source.image_tower_weights(state, pretrained, f"{ref}/{weights_file.filename}")
    text_file = PRETRAINED_DIR / open_clip_source.TEXT_TOWER
    head = open_clip_source.zero_shot_head(params.model, text_file, info["class_names"], info["templates"], head_cache_dir())
    logit_scale = load_tensor(text_file, "logit_scale", torch.tensor(4.6052)).exp()
    write_expert(params, task, info, expert, head, logit_scale, weights_file, f"open_clip:{ref}@{weights_file.revision}", {})


def from_hub(params, task: str, info: dict) -> None:
    from catmerge.hf_clip import PROJECTION, fetch_weights, head_cache_dir, image_tower_weights, zero_shot_head
    from catmerge.layout import PRETRAINED_DIR

    hub = params.hub.experts
    repo, revision = hub.repo.format(task=task), hub.revisions.get(task, hub.revision)
    state, weights_file = fetch_weights(repo, revision, hub.sha256.get(task), params.hub.allow_pickle)
    verify_manifest(PRETRAINED_DIR)  # the tower and the text side the head comes from
    pretrained = load_weights(PRETRAINED_TOWER)
    expert = image_tower_weights(state, pretrained, f"{repo}/{weights_file.filename}", projection=pretrained.get(PROJECTION))
    head = zero_shot_head(PRETRAINED_DIR / "text", info["class_names"], info["templates"], head_cache_dir())
    logit_scale = load_tensor(PRETRAINED_DIR / "text" / "text_tower.safetensors", "logit_scale", torch.tensor(4.6052)).exp()
    extra = {"projection_from_pretrained": PROJECTION not in state}
    write_expert(params, task, info, expert, head, logit_scale, weights_file, f"hf:{repo}@{weights_file.revision}", extra)


def write_expert(params, task, info, expert, head, logit_scale, weights_file, origin: str, extra: dict) -> None:
    meta = {"model": params.model, "task": task}
    with atomic_dir(expert_dir(task)) as out:
        save_weights(expert, out / "expert.safetensors", meta)
        save_weights({"weight": head, "logit_scale": logit_scale.reshape(1)}, out / "head.safetensors", meta)
        write_json(
            {
                "task": task,
                "source": params.source,
                "model": params.model,
                "class_names": info["class_names"],
                "templates": info["templates"],
                "hub": [weights_file.record()],
                **extra,
                "files": [
                    file_record(out / "expert.safetensors", out, origin),
                    file_record(out / "head.safetensors", out, f"{params.source}:zero-shot-head"),
                ],
            },
            out / "manifest.json",
        )


def builtin(params, task: str, info: dict) -> None:
    train = read_split(checked_split(task, "train"))
    generator = seed_everything(task_seed(params.seed, task))

    clip = create_clip(params.model)
    load_into(clip.visual, checked_pretrained())
    text = load_weights(checked_pretrained(PRETRAINED_TEXT.name))
    clip.text.proj.load_state_dict({"weight": text["proj.weight"]})
    logit_scale = float(text["logit_scale"])
    head = zero_shot_head(clip.text.proj, FrozenTextEncoder(clip, params.model), info["class_names"], info["templates"])

    budget = TrainingBudget(**params.finetune.model_dump())
    losses = finetune(clip.visual, head, logit_scale, train.images, train.labels, budget, generator, desc=f"expert {task}")
    print(f"{task}: fine-tuning loss first {losses[0]:.3f}, last {sum(losses[-10:]) / len(losses[-10:]):.3f}")

    meta = {"model": params.model, "task": task}
    with atomic_dir(expert_dir(task)) as out:
        save_weights(clip.visual.state_dict(), out / "expert.safetensors", meta)
        save_weights({"weight": head, "logit_scale": torch.tensor([logit_scale])}, out / "head.safetensors", meta)
        write_json(
            {
                "task": task,
                "source": params.source,
                "model": params.model,
                "class_names": info["class_names"],
                "templates": info["templates"],
                "seed": params.seed,
                "finetune": params.finetune.model_dump(),
                "files": [
                    file_record(out / "expert.safetensors", out, "builtin:finetune"),
                    file_record(out / "head.safetensors", out, "builtin:zero-shot-head"),
                ],
            },
            out / "manifest.json",
        )


if __name__ == "__main__":
    run_stage("experts", main)
