"""Every method's test accuracy over several built projects (seeds), mean ± sample sd, with the
hyperparameters each project's `select` stage chose on validation. Reads each project's
metrics/metrics.json and metrics/selection.json (after `dvc repro`); writes JSON and prints markdown.

    python benchmarks/methods_table.py --run seed0=. --run seed1=../seed1 --run seed2=../seed2 \
        --out benchmarks/results/methods.json
    python benchmarks/methods_table.py --run tiny=MICRO_PROJECT --out /tmp/methods.json   # tiny (tests)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from built_project import mean_sd


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", action="append", required=True, help="NAME=PROJECT_DIR, once per built project")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    runs = {}
    for spec in args.run:
        name, _, directory = spec.partition("=")
        metrics = json.loads((Path(directory) / "metrics/metrics.json").read_text())
        selection = json.loads((Path(directory) / "metrics/selection.json").read_text())
        runs[name] = {
            "accuracy": metrics["accuracy"],
            "average": metrics["average"],
            "normalized_average": metrics["normalized_average"],
            "chosen": {m: e["chosen"] for m, e in selection["methods"].items()},
            "val_average": {m: e["average"] for m, e in selection["methods"].items()},
        }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(runs, indent=2) + "\n")

    first = next(iter(runs.values()))
    tasks, rows = list(first["accuracy"]), list(first["average"])
    lines = ["| model | " + " | ".join(tasks) + " | avg | normalized avg |", "|---" * (len(tasks) + 3) + "|"]
    for row in rows:
        cells = [mean_sd([r["accuracy"][t][row] for r in runs.values()]) for t in tasks]
        cells += [mean_sd([r["average"][row] for r in runs.values()]), mean_sd([r["normalized_average"][row] for r in runs.values()])]
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    methods = list(first["chosen"])
    lines += ["", "| run | " + " | ".join(methods) + " |", "|---" * (len(methods) + 1) + "|"]
    for name, r in runs.items():
        chosen = [", ".join(f"{k}={v}" for k, v in r["chosen"][m].items()) or "fixed" for m in methods]
        lines.append(f"| {name} | " + " | ".join(chosen) + " |")
    lines += ["", "| run | " + " | ".join(methods) + " |", "|---" * (len(methods) + 1) + "|"]
    for name, r in runs.items():
        lines.append(f"| {name} (test avg) | " + " | ".join(f"{r['average'][m]:.1f}" for m in methods) + " |")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
