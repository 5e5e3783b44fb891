"""Is the built benchmark in the paper's regime? Every criterion of catmerge/benchmark/faithfulness.py,
computed from one or more built projects (seeds) after `dvc repro`: their metrics/metrics.json (test
accuracies) and data/datasets/<task>/info.json (classes, source), checked against their manifests.
Prints a PASS / FAIL table (`make demo` prints it under the results); exits 0 whether criteria
pass or fail (it reports, it does not gate), 1 on unreadable or mismatched projects.

    python benchmarks/faithfulness.py --run seed0=. --run seed1=../seed1 --run seed2=../seed2 \
        --out benchmarks/results/faithfulness.json
    python benchmarks/faithfulness.py --run demo=.                       # make demo: print only
    python benchmarks/faithfulness.py --run tiny=MICRO_PROJECT --out /tmp/faithfulness.json   # tiny (tests)
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from catmerge import layout
from catmerge.benchmark.faithfulness import Run, criteria, outcomes, table
from catmerge.benchmark.tasks import get_task
from catmerge.io import ArtifactError, read_json, write_json


def load_run(project: Path) -> Run:
    metrics_path = project / layout.METRICS_DIR / "metrics.json"
    metrics = read_json(metrics_path)
    accuracy = metrics.get("accuracy") if isinstance(metrics, dict) else None
    if not isinstance(accuracy, dict) or not accuracy:
        raise ArtifactError(f"{metrics_path}: expected 'accuracy' mapping each task to its rows (written by stage evaluate)")
    classes, pools = {}, {}
    for task in accuracy:
        info = layout.checked_dataset_info(task, root=project)
        classes[task] = len(info["class_names"])
        # recorded by the datasets stage; builds from before it was recorded: the registry's (builtin)
        # or the dataset itself (hub)
        pools[task] = str(info.get("image_pool") or (get_task(task).image_pool if info.get("source") == "builtin"
                                                     else info.get("description", task)))
    return Run(accuracy, classes, pools)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", action="append", required=True, metavar="NAME=PROJECT_DIR", help="once per built project")
    parser.add_argument("--out", type=Path, default=None, help="also write the criteria as JSON here")
    args = parser.parse_args()
    runs, dirs = {}, set()
    for spec in args.run:
        name, sep, directory = spec.partition("=")
        if not sep or not name or not directory:
            parser.error(f"--run {spec!r}: expected NAME=PROJECT_DIR")
        if name in runs or Path(directory).resolve() in dirs:
            parser.error(f"--run {spec!r}: that name or project was given twice")
        dirs.add(Path(directory).resolve())
        try:
            runs[name] = load_run(Path(directory))
        except (ArtifactError, ValueError) as exc:
            raise SystemExit(f"faithfulness: run {name}: {exc}") from None
    try:
        rows, reported = criteria(list(runs.values())), outcomes(list(runs.values()))
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    print(f"Faithfulness of the benchmark ({', '.join(runs)}; docs/benchmark.md):")
    print(table(rows, reported))
    if args.out is not None:
        write_json({"runs": list(runs), "criteria": [dataclasses.asdict(c) for c in rows],
                    "reported": [{"what": w, "measured": m} for w, m in reported]}, args.out)


if __name__ == "__main__":
    main()
