"""Stage `evaluate`: every merged model on every task's test split, beside the pretrained model
and the experts; writes the metrics JSON, a results table and a bar chart."""

from catmerge.cli import run_stage
from catmerge.data import read_split
from catmerge.evaluation import accuracy, bar_chart, load_head, results_table, summarize
from catmerge.io import write_json, write_text
from catmerge.layout import METRICS_DIR, PRETRAINED_TOWER, dataset_dir, expert_dir, merged_path
from catmerge.models import create_image_tower, load_into
from catmerge.params import load_params


def main() -> None:
    params = load_params()
    methods = params.merge.methods
    tower = create_image_tower(params.model)
    tests = {task: read_split(dataset_dir(task) / "test.parquet") for task in params.tasks}
    heads = {task: load_head(expert_dir(task) / "head.safetensors") for task in params.tasks}

    def test_accuracy(task: str) -> float:
        return accuracy(tower, heads[task], tests[task].images, tests[task].labels, params.evaluate.batch_size)

    # Reference rows are recomputed here rather than cached per task: a few seconds, one process less per task.
    per_task = {task: {} for task in params.tasks}
    load_into(tower, PRETRAINED_TOWER)
    for task in params.tasks:
        per_task[task]["pretrained"] = test_accuracy(task)
    for task in params.tasks:
        load_into(tower, expert_dir(task) / "expert.safetensors")
        per_task[task]["expert"] = test_accuracy(task)
    for method in methods:
        load_into(tower, merged_path(method))
        for task in params.tasks:
            per_task[task][method] = test_accuracy(task)
    metrics = summarize(per_task, methods)
    write_json(metrics, METRICS_DIR / "metrics.json")
    table = results_table(metrics)
    write_text(table, METRICS_DIR / "results.md")
    bar_chart(metrics, METRICS_DIR / "accuracy.png")
    print(table)


if __name__ == "__main__":
    run_stage("evaluate", main)
