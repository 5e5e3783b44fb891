"""Is the offline benchmark a faithful miniature of the paper's regime? Measure it.

Reads a built pipeline (the `data/` of a project after `dvc repro`), then for each run directory:
pretrained zero-shot and expert accuracy per task, weight averaging, and Task Arithmetic with
alpha chosen on the validation splits (never on test). Writes JSON and checks the criteria of
issue 2 (paper ViT-B/32: zero-shot 48.0, experts 90.5, weight averaging 65.8, TA 69.1):
- zero-shot average well under 60 %;
- every expert at least 15 points above zero-shot on its own task;
- TA at its validation-chosen alpha at least 10 points below the experts' average;
- weight averaging not above TA.

    python benchmarks/regime.py --run seed0=. --run seed1=../seed1 --out benchmarks/results/regime.json
    python benchmarks/regime.py --run tiny=MICRO_PROJECT --alphas 0.3 --out /tmp/regime.json   # tiny (tests)
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from built_project import BuiltProject, mean_sd

from catmerge.fidelity import experts_accuracy

ALPHAS = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 1.0]


def measure(project: Path, alphas: list[float] = ALPHAS) -> dict:
    built = BuiltProject.load(project)
    score = built.scorer()

    out = {"pretrained": score(built.theta0, "test"), "expert": experts_accuracy(built.workspace)}
    out["weight_averaging"] = score(built.merged("weight_averaging"), "test")
    val_curve = {}
    for alpha in alphas:
        val_curve[alpha] = statistics.mean(score(built.merged("task_arithmetic", alpha=alpha), "val").values())
    best = max(alphas, key=lambda a: (val_curve[a], -a))
    out["task_arithmetic"] = score(built.merged("task_arithmetic", alpha=best), "test")
    out["task_arithmetic_val_curve"] = val_curve
    out["task_arithmetic_alpha"] = best
    return out


def criteria(run: dict) -> dict:
    avg = {k: statistics.mean(run[k].values()) for k in ("pretrained", "expert", "weight_averaging", "task_arithmetic")}
    gains = {t: run["expert"][t] - run["pretrained"][t] for t in run["expert"]}
    return {
        "average": avg,
        "min_expert_gain": min(gains.values()),
        "zero_shot_under_60": avg["pretrained"] < 60,
        "every_expert_gains_15": min(gains.values()) >= 15,
        "ta_10_below_experts": avg["expert"] - avg["task_arithmetic"] >= 10,
        "wa_not_above_ta": avg["weight_averaging"] <= avg["task_arithmetic"],
    }


ROWS = ("pretrained", "expert", "weight_averaging", "task_arithmetic")


def markdown_summary(results: dict) -> str:
    """Per-task mean and sample standard deviation over runs, one row per model."""
    runs = list(results.values())
    tasks = list(runs[0]["expert"])

    cell = mean_sd

    lines = ["| model | " + " | ".join(tasks) + " | avg |", "|---" * (len(tasks) + 2) + "|"]
    for row in ROWS:
        cells = [cell([r[row][t] for r in runs]) for t in tasks]
        cells.append(cell([statistics.mean(r[row].values()) for r in runs]))
        label = row if row != "task_arithmetic" else "task_arithmetic (alpha on val)"
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    alphas = ", ".join(f"{name}: {r['task_arithmetic_alpha']}" for name, r in results.items())
    return "\n".join(lines) + f"\n\nTask Arithmetic alpha chosen on validation: {alphas}\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", action="append", required=True, help="NAME=PROJECT_DIR of a built pipeline")
    parser.add_argument("--alphas", type=float, nargs="+", default=ALPHAS, help="Task Arithmetic's alpha grid, chosen on val")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    results = {}
    for item in args.run:
        name, _, path = item.partition("=")
        run = measure(Path(path), args.alphas)
        run["criteria"] = criteria(run)
        results[name] = run
        print(name, json.dumps(run["criteria"], indent=1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(markdown_summary(results))


if __name__ == "__main__":
    main()
