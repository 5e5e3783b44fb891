"""CAT Merging next to Task Arithmetic and weight averaging over an alpha grid, on a built pipeline.

Reads a project's `data/` after `dvc repro` (task vectors, CAT's bases as computed with the
project's `cat` params, heads, val and test splits). For each alpha: the average validation
accuracy of TA and CAT and their per-task test accuracy. The alpha of each method is chosen on
validation only; test accuracy at that alpha is what the summary reports. Writes JSON.

    python benchmarks/alpha_grid.py --project . --out benchmarks/results/alpha_grid_seed0.json
    python benchmarks/alpha_grid.py --summarize benchmarks/results/alpha_grid_seed*.json   # markdown tables
    python benchmarks/alpha_grid.py --project MICRO_PROJECT --alphas 0.3 --out /tmp/alpha_grid.json   # tiny (tests)
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from built_project import BuiltProject, mean_sd

ALPHAS = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 1.0]


def measure(project: Path, alphas: list[float]) -> dict:
    built = BuiltProject.load(project)
    params, tasks = built.params, built.params.tasks
    score = built.scorer()

    out = {"params": {"tasks": tasks, "seed": params.seed, "cat": params.cat.model_dump(by_alias=True)}}
    out["pretrained"] = score(built.theta0, "test")
    out["weight_averaging"] = score(built.merged("weight_averaging"), "test")
    for method in ("task_arithmetic", "cat"):  # CAT with the bases stage's removals (the project's `cat` block)
        curve = {}
        for alpha in alphas:
            weights = built.merged(method, alpha=alpha)
            val, test = score(weights, "val"), score(weights, "test")
            curve[str(alpha)] = {"val_average": statistics.mean(val.values()), "test": test, "test_average": statistics.mean(test.values())}
            print(f"{method} alpha {alpha}: val {curve[str(alpha)]['val_average']:.1f} test {curve[str(alpha)]['test_average']:.1f}", flush=True)
        best = max(alphas, key=lambda a: (curve[str(a)]["val_average"], -a))
        out[method] = {"alpha": best, "test": curve[str(best)]["test"], "curve": curve}
    out["summary"] = {
        "pretrained": statistics.mean(out["pretrained"].values()),
        "weight_averaging": statistics.mean(out["weight_averaging"].values()),
        **{m: {"alpha": out[m]["alpha"], "test_average": statistics.mean(out[m]["test"].values())} for m in ("task_arithmetic", "cat")},
    }
    return out


def summarize(paths: list[Path]) -> str:
    """Mean ± sample sd over runs at each method's validation-chosen alpha, and the curves."""
    runs = [json.loads(p.read_text()) for p in paths]
    tasks = runs[0]["params"]["tasks"]

    cell = mean_sd

    def row_of(run, method):
        return run[method]["test"] if method in ("task_arithmetic", "cat") else run[method]

    lines = ["| model | " + " | ".join(tasks) + " | avg |", "|---" * (len(tasks) + 2) + "|"]
    for method in ("pretrained", "weight_averaging", "task_arithmetic", "cat"):
        cells = [cell([row_of(r, method)[t] for r in runs]) for t in tasks]
        cells.append(cell([statistics.mean(row_of(r, method).values()) for r in runs]))
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    alphas = list(runs[0]["task_arithmetic"]["curve"])
    lines += ["", "| run | method | chosen alpha | test avg | " + " | ".join(f"val {a}" for a in alphas) + " |"]
    lines.append("|---" * (len(alphas) + 4) + "|")
    for path, run in zip(paths, runs):
        for method in ("task_arithmetic", "cat"):
            curve = run[method]["curve"]
            vals = " | ".join(f"{curve[a]['val_average']:.1f}" for a in alphas)
            test = statistics.mean(run[method]["test"].values())
            lines.append(f"| {path.stem} | {method} | {run[method]['alpha']} | {test:.1f} | {vals} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--project", type=Path, default=Path("."))
    parser.add_argument("--alphas", type=float, nargs="+", default=ALPHAS)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--summarize", type=Path, nargs="+", help="print tables from earlier JSON outputs")
    args = parser.parse_args()
    if args.summarize:
        print(summarize(args.summarize))
        return
    if args.out is None:
        parser.error("--out is required unless --summarize is given")
    result = measure(args.project, args.alphas)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["summary"], indent=2))


if __name__ == "__main__":
    main()
