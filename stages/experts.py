"""Stage `experts@<task>`: task k's zero-shot head and its expert image tower theta_k.

source `builtin`: the head is built from the task's class-name prompts through the pretrained
text tower; the expert is the pretrained image tower fine-tuned on the task's train split
against that frozen head.
"""

import torch

from catmerge.benchmark.training import TrainingBudget, finetune, seed_everything, task_seed
from catmerge.cli import check_task_argument, run_stage
from catmerge.data import read_split
from catmerge.io import atomic_dir, file_record, load_weights, read_json, save_weights, write_json
from catmerge.layout import PRETRAINED_TEXT, PRETRAINED_TOWER, dataset_dir, expert_dir
from catmerge.models import FrozenTextEncoder, create_clip, load_into, zero_shot_head
from catmerge.params import load_params


def main(task: str) -> None:
    params = load_params()
    check_task_argument(params, task)
    info = read_json(dataset_dir(task) / "info.json")
    train = read_split(dataset_dir(task) / "train.parquet")
    generator = seed_everything(task_seed(params.seed, task))

    clip = create_clip(params.model)
    load_into(clip.visual, PRETRAINED_TOWER)
    text = load_weights(PRETRAINED_TEXT)
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
