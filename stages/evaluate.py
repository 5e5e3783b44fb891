"""Stage `evaluate`: every merged model (hyperparameters chosen on validation by `select`) on every
task's test split, beside the pretrained model and the experts; writes the metrics JSON, a results
table, a bar chart, and the loss decomposition (catmerge/decomposition.py) of Task Arithmetic and,
before/after, of CAT Merging (its trimmed vectors at its chosen params)."""

from catmerge import cat
from catmerge.cli import run_stage
from catmerge.decomposition import decompose
from catmerge.evaluation import bar_chart, results_table, summarize
from catmerge.io import WeightsFile, write_json, write_text
from catmerge.layout import DECOMPOSITION, DECOMPOSITION_CAT, METRICS_DIR, checked_expert
from catmerge.params import load_params
from catmerge.selection import chosen_params, read_selection
from catmerge.workspace import Workspace


def main() -> None:
    params = load_params()
    tasks, methods = params.tasks, params.merge.methods
    ws = Workspace(params)
    # every input checked before the first score (the outputs of the last run stay until this one succeeds)
    ws.check_headers()  # cheap checks first: a task vector or features file of another task or dtype
    selection = read_selection(params)
    chosen = {method: chosen_params(params, selection, method) for method in methods}
    merged = {method: ws.checked_merged(method, chosen[method]) for method in methods}
    experts = {task: WeightsFile(checked_expert(task)) for task in tasks}  # read into the tower a tensor at a time
    ws.check_inputs(chosen, "test")
    # Reference rows are recomputed here rather than cached per task: a few seconds, one process less per task.
    per_task = {task: {} for task in tasks}
    for task, score in ws.score(ws.pretrained, "test").items():
        per_task[task]["pretrained"] = score
    for task in tasks:
        per_task[task]["expert"] = ws.score(experts[task], "test", [task])[task]
    for method in methods:
        for task, score in ws.score(merged[method], "test").items():
            per_task[task][method] = score
    metrics = summarize(per_task, methods)
    table = results_table(metrics)

    expert_scores = {t: per_task[t]["expert"] for t in tasks}
    alpha = chosen["task_arithmetic"].alpha if "task_arithmetic" in methods else params.task_arithmetic.alpha
    decomposition = decompose(ws, alpha, expert_scores)
    cat_decomposition = {}  # empty when CAT is not among the methods
    if "cat" in methods:
        cat_params = chosen["cat"]
        pieces, by_piece = ws.removals(cat_params)
        trimmed = cat.trimmed_vectors(pieces, ws.task_vectors, by_piece, cat_params.rescale)
        scored = {t: per_task[t]["cat"] for t in tasks}  # the merged file is theta_0 + alpha * sum of these
        cat_decomposition = decompose(ws, cat_params.alpha, expert_scores, vectors=trimmed, merged_scores=scored)
    # written last and together: a failure above leaves every output of the last run as it was
    write_json(metrics, METRICS_DIR / "metrics.json")
    write_text(table, METRICS_DIR / "results.md")
    bar_chart(metrics, METRICS_DIR / "accuracy.png")
    write_json(decomposition, DECOMPOSITION)
    write_json(cat_decomposition, DECOMPOSITION_CAT)
    print(table)
    avg = decomposition["average"]
    print(f"Task Arithmetic (alpha {alpha}) loses {avg['expert'] - avg['merged']:.1f} points to the experts: "
          f"dilution {avg['dilution']:.1f}, interference {avg['interference']:.1f}")


if __name__ == "__main__":
    run_stage("evaluate", main)
