"""Which part of CAT moves accuracy? Recompute the removals in-process with other CAT settings.

Reads a built project's `data/` (task vectors, features, val splits, heads) and, for each setting
given as `key=value,...` (fields of catmerge.cat.Settings plus `qkv`, `conv` and `rescale`), prints
and records the average validation accuracy of the CAT merge at each alpha. Nothing is written
under `data/`.

    python benchmarks/cat_ablation.py --out benchmarks/results/cat_ablation_seed0.json \\
        "c=0" "rescale=False" "c_norm=0,c_shift=0" "c=0,c_norm=2,c_shift=0" "c=0,c_norm=0,c_shift=2" \\
        "lam=0.0" "lam=5.0" "lam=20.0" "lam=100.0" "qkv='fused'" "c=1"
    python benchmarks/cat_ablation.py --project MICRO_PROJECT --alphas 0.3 --out /tmp/cat_ablation.json c=1   # tiny (tests)
"""

from __future__ import annotations

import argparse
import ast
import json
import statistics
from pathlib import Path

from built_project import BuiltProject

from catmerge import cat
from catmerge.adapters import get_adapter
from catmerge.task_vectors import apply_task_vector

ALPHAS = [0.3, 0.5, 0.7, 1.0]


def parse(spec: str) -> dict:
    tree = ast.parse(f"dict({spec})", mode="eval").body
    return {kw.arg: ast.literal_eval(kw.value) for kw in tree.keywords}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("settings", nargs="+", help="e.g. c=0 or lam=5.0,rescale=False")
    parser.add_argument("--project", type=Path, default=Path("."))
    parser.add_argument("--alphas", type=float, nargs="+", default=ALPHAS)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    built = BuiltProject.load(args.project)
    params = built.params
    theta0, tvs = built.theta0, built.task_vectors
    score = built.scorer()
    loaded = built.workspace.features  # per task (linear inputs, norm sums, metadata), checked as the stages check them
    features = [(linear, sums) for linear, sums, _ in loaded]
    adapter = get_adapter(loaded[0][2]["adapter"])
    shapes = {k: tuple(shape) for k, (dtype, shape) in theta0.specs.items() if dtype.is_floating_point}
    p = params.cat

    def val_average(weights) -> float:
        return statistics.mean(score(weights, "val").values())

    results = {}
    for spec in args.settings:
        options = parse(spec)
        qkv, conv, rescale = options.pop("qkv", p.qkv), options.pop("conv", p.conv), options.pop("rescale", p.rescale)
        c = options.pop("c", p.c)
        lam = options.pop("lam", p.lambda_)
        settings = cat.Settings(
            c=c, lam=lam, c_norm=options.pop("c_norm", c), lambda_norm=options.pop("lambda_norm", lam),
            c_shift=options.pop("c_shift", c), **options,
        )
        pieces = adapter.pieces(shapes, qkv, conv)
        total = dict(cat.trimmed_sum(pieces, tvs, cat.model_removals(pieces, tvs, features, settings)[0], rescale))
        curve = {str(a): val_average(apply_task_vector(theta0, total, a)) for a in args.alphas}
        results[spec] = curve
        print(spec, {a: round(v, 1) for a, v in curve.items()}, flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"project_params": params.cat.model_dump(by_alias=True), "val_average": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
