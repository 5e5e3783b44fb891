"""CAT Merging next to Task Arithmetic and weight averaging over an alpha grid, on a built pipeline.

Reads a project's `data/` after `dvc repro` (task vectors, CAT's bases as computed with the
project's `cat` params, heads, val and test splits). For each alpha: the average validation
accuracy of TA and CAT and their per-task test accuracy. The alpha of each method is chosen on
validation only; test accuracy at that alpha is what the summary reports. Writes JSON.

    python benchmarks/alpha_grid.py --project . --out benchmarks/results/alpha_grid_seed0.json
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from catmerge.data import read_split
from catmerge.evaluation import accuracy
from catmerge.io import load_weights
from catmerge.merging import merge_method
from catmerge.merging.cat import read_removals
from catmerge.models import create_image_tower
from catmerge.params import load_params

ALPHAS = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 1.0]


def measure(project: Path, alphas: list[float]) -> dict:
    params = load_params(project / "params.yaml")
    data = project / "data"
    tasks = params.tasks
    tower = create_image_tower(params.model)
    theta0 = load_weights(data / "pretrained/image_tower.safetensors")
    tvs = [load_weights(data / f"task_vectors/{t}.safetensors") for t in tasks]
    heads = {t: load_weights(data / f"experts/{t}/head.safetensors")["weight"] for t in tasks}
    splits = {(t, s): read_split(data / f"datasets/{t}/{s}.parquet") for t in tasks for s in ("val", "test")}
    removals = read_removals(data / "bases", tasks)

    def score(weights, split):
        tower.load_state_dict(weights)
        return {t: accuracy(tower, heads[t], splits[t, split].images, splits[t, split].labels) for t in tasks}

    def merged(method, alpha):
        if method == "cat":
            return merge_method("cat")(theta0, tvs, params.cat.model_copy(update={"alpha": alpha}), removals)
        return merge_method(method)(theta0, tvs, params.merge.model_copy(update={"alpha": alpha}))

    out = {"params": {"tasks": tasks, "seed": params.seed, "cat": params.cat.model_dump(by_alias=True)}}
    out["pretrained"] = score(theta0, "test")
    out["weight_averaging"] = score(merge_method("weight_averaging")(theta0, tvs), "test")
    for method in ("task_arithmetic", "cat"):
        curve = {}
        for alpha in alphas:
            weights = merged(method, alpha)
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--project", type=Path, default=Path("."))
    parser.add_argument("--alphas", type=float, nargs="+", default=ALPHAS)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    result = measure(args.project, args.alphas)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["summary"], indent=2))


if __name__ == "__main__":
    main()
