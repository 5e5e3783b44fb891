"""Stage `evaluate_experts@<task>`: test accuracy of the pretrained model (zero-shot) and of the expert."""

from catmerge.cli import check_task_argument, run_stage
from catmerge.data import read_split
from catmerge.evaluation import accuracy, load_head
from catmerge.io import write_json
from catmerge.layout import PRETRAINED_TOWER, dataset_dir, expert_dir, reference_scores_path
from catmerge.models import create_image_tower, load_into
from catmerge.params import load_params


def main(task: str) -> None:
    params = load_params()
    check_task_argument(params, task)
    test = read_split(dataset_dir(task) / "test.parquet")
    head = load_head(expert_dir(task) / "head.safetensors")
    tower = create_image_tower(params.model)
    scores = {}
    for row, path in (("pretrained", PRETRAINED_TOWER), ("expert", expert_dir(task) / "expert.safetensors")):
        load_into(tower, path)
        scores[row] = accuracy(tower, head, test.images, test.labels, params.evaluate.batch_size)
    write_json({"task": task, "test_images": len(test.labels), **scores}, reference_scores_path(task))
    print(f"{task}: pretrained {scores['pretrained']:.1f}, expert {scores['expert']:.1f}")


if __name__ == "__main__":
    run_stage("evaluate_experts", main)
