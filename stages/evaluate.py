"""Stage `evaluate`: every merged model (hyperparameters chosen on validation by `select`) on every
task's test split, beside the pretrained model and the experts; writes the metrics JSON, a results
table, a bar chart, and the loss decomposition of Task Arithmetic (catmerge/decomposition.py)."""

from catmerge.cli import run_stage
from catmerge.decomposition import decompose
from catmerge.evaluation import bar_chart, results_table, summarize
from catmerge.io import load_weights, read_json, write_json, write_text
from catmerge.layout import DECOMPOSITION, METRICS_DIR, SELECTION, expert_dir, merged_path
from catmerge.params import load_params
from catmerge.selection import chosen_params
from catmerge.workspace import Workspace


def main() -> None:
    params = load_params()
    tasks, methods = params.tasks, params.merge.methods
    ws = Workspace(params)
    # Reference rows are recomputed here rather than cached per task: a few seconds, one process less per task.
    per_task = {task: {} for task in tasks}
    for task, score in ws.score(ws.pretrained, "test").items():
        per_task[task]["pretrained"] = score
    for task in tasks:
        expert = load_weights(expert_dir(task) / "expert.safetensors")
        per_task[task]["expert"] = ws.score(expert, "test", [task])[task]
    for method in methods:
        for task, score in ws.score(load_weights(merged_path(method)), "test").items():
            per_task[task][method] = score
    metrics = summarize(per_task, methods)
    write_json(metrics, METRICS_DIR / "metrics.json")
    table = results_table(metrics)
    write_text(table, METRICS_DIR / "results.md")
    bar_chart(metrics, METRICS_DIR / "accuracy.png")

    alpha = chosen_params(params, read_json(SELECTION), "task_arithmetic").alpha if "task_arithmetic" in methods else params.merge.alpha
    decomposition = decompose(ws, alpha, {t: per_task[t]["expert"] for t in tasks})
    write_json(decomposition, DECOMPOSITION)
    print(table)
    avg = decomposition["average"]
    print(f"Task Arithmetic (alpha {alpha}) loses {avg['expert'] - avg['merged']:.1f} points to the experts: "
          f"dilution {avg['dilution']:.1f}, interference {avg['interference']:.1f}")


if __name__ == "__main__":
    run_stage("evaluate", main)
