"""When does CAT Merging beat Task Arithmetic here? The fidelity study of docs/fidelity.md, as a
Prefect sweep with cached points.

Each point is one merge setting on one built project (a directory after `dvc repro bases`, e.g.
one seed or one expert regime): alpha chosen on validation, test accuracy there, the loss
decomposition at that alpha, and the conflict term on the exemplars' and on the merged model's
own features (catmerge/fidelity.py). A point is a Prefect task whose result is cached under
`--cache` by a key over the setting, the project's data (weights, features, splits, experts,
heads) and catmerge's code: rerunning the sweep, or extending it, computes only new points.

    python benchmarks/fidelity.py --group base --project seed0=. --project seed1=../seed1 \\
        --project seed2=../seed2 --settings sweep --out benchmarks/results/fidelity_base.json
    python benchmarks/fidelity.py --group lr1e-4 --project seed0=../fid/lr1e-4_s0 ... \\
        --settings reference --out benchmarks/results/fidelity_lr1e-4.json
    python benchmarks/fidelity.py --summarize benchmarks/results/fidelity_*.json   # tables
    python benchmarks/fidelity.py --group tiny --project s0=MICRO_PROJECT --max-settings 2 --alphas 0.3 \
        --cache /tmp/fidelity-cache --out /tmp/fidelity.json   # tiny (tests): Task Arithmetic and CAT, one alpha

Settings "reference": Task Arithmetic and CAT with the project's `cat` block; "sweep": those and
one factor changed at a time (SWEEP below). Every configuration tried is written out.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import statistics
from pathlib import Path

from prefect import flow, task
from prefect.settings import PREFECT_LOCAL_STORAGE_PATH, temporary_settings

from catmerge import layout
from catmerge.io import sha256_file
from catmerge.params import load_params
from catmerge.selection import inputs_digest
from catmerge.workspace import Workspace

ROOT = Path(__file__).resolve().parent.parent
ALPHAS = [0.2, 0.3, 0.4, 0.5, 0.6, 0.8]
TASK_ARITHMETIC = {"method": "task_arithmetic"}
REFERENCE = [TASK_ARITHMETIC, {}]
# one factor at a time, the others at the project's `cat` block (exemplars 2, feature_alpha 1, c 2,
# lambda 1, rescale on, qkv split)
# (in the order they are run: `--max-settings N` keeps the first N)
SWEEP = REFERENCE + [
    {"exemplars": 32}, {"exemplars": 8}, {"exemplars": 1},
    {"rescale": False},
    {"lambda": 0.0}, {"lambda": 10.0},
    {"c": 8},
    {"feature_alpha": 0.4},
    {"qkv": "fused"},
    {"exemplars": 4},
    {"c": 3},
]
FULL_DECOMPOSITION = [TASK_ARITHMETIC, {}]  # every family; the other settings: linear weights only

_workspaces: dict[str, Workspace] = {}
_experts: dict[str, dict] = {}


def workspace(project: str) -> Workspace:
    if project not in _workspaces:
        _workspaces[project] = Workspace(load_params(Path(project) / "params.yaml"), project)
    return _workspaces[project]


@functools.cache
def project_digest(project: str) -> str:
    """sha256 over everything a point reads: inputs_digest (weights, features, val splits, heads)
    plus the train and test splits, the experts and the seeds."""
    ws = workspace(project)
    digest = hashlib.sha256(inputs_digest(ws).encode())
    digest.update(f"{ws.params.data_seed} {ws.params.seed}".encode())
    for t in ws.params.tasks:
        for path in (layout.dataset_dir(t) / "train.parquet", layout.dataset_dir(t) / "test.parquet", layout.expert_dir(t) / "expert.safetensors"):
            digest.update(sha256_file(ws.path(path)).encode())
    return digest.hexdigest()


def code_digest() -> str:
    """Every source file of catmerge and this script, hashed once when the script starts (the code it runs)."""
    digest = hashlib.sha256()
    for file in [*sorted(p for p in (ROOT / "catmerge").rglob("*") if p.suffix in (".py", ".json")), Path(__file__).resolve()]:
        digest.update(f"{file.relative_to(ROOT)} {sha256_file(file)}".encode())
    return digest.hexdigest()


CODE_DIGEST = code_digest()


def point_key(context, arguments: dict) -> str:
    """Setting, alphas, families, the project's data and `cat` block (the setting applies over it), code."""
    payload = {k: arguments[k] for k in ("setting", "alphas", "families")}
    payload["project"] = project_digest(arguments["project"])
    payload["cat"] = workspace(arguments["project"]).params.cat.model_dump(by_alias=True)
    payload["code"] = CODE_DIGEST
    return "fidelity-" + hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:40]


@task(task_run_name="{name}", cache_key_fn=point_key, persist_result=True, result_serializer="json")
def study_point(project: str, name: str, setting: dict, alphas: list[float], families: list[str]) -> dict:
    from catmerge import fidelity

    ws = workspace(project)
    if project not in _experts:
        _experts[project] = fidelity.experts_accuracy(ws)
    result = fidelity.run_point(ws, setting, alphas, _experts[project], tuple(families))
    result["experts"] = _experts[project]
    result["vector_norms"] = fidelity.vector_norms(ws)
    return result


@flow(name="catmerge-fidelity")
def study(group: str, projects: dict[str, str], settings: list[dict], alphas: list[float]) -> dict:
    out = {"group": group, "alphas": alphas, "runs": {run: {"project": project, "points": []} for run, project in projects.items()}}
    for setting in settings:  # setting by setting, so that a sweep cut short has whole settings
        families = ["linear", "norm_scale", "shift", "other"] if setting in FULL_DECOMPOSITION else ["linear"]
        for run, project in projects.items():
            name = f"{group}/{run}/{label(setting)}"
            result = study_point(str(Path(project).resolve()), name, setting, alphas, families)
            out["runs"][run]["points"].append({"label": label(setting), **result})
            print(f"{name}: alpha {result['alpha']}, test {result['test_average']:.1f}", flush=True)
    return out


def label(setting: dict) -> str:
    if setting.get("method") == "task_arithmetic":
        return "task_arithmetic"
    return "cat" + "".join(f" {k}={v}" for k, v in setting.items()) if setting else "cat (defaults)"


# ---- tables ------------------------------------------------------------------------------------


def _mean_sd(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.1f} ± {sd:.1f}"


def summarize(paths: list[Path]) -> str:
    """One table per group: per setting, test average mean ± sd over runs, CAT - TA per run and its
    mean ± sd, the alphas chosen, and the decomposition's dilution / interference / linear part."""
    out = []
    for path in paths:
        study = json.loads(path.read_text())
        runs = study["runs"]
        labels = [p["label"] for p in next(iter(runs.values()))["points"]]
        by = {run: {p["label"]: p for p in r["points"]} for run, r in runs.items()}
        norms = [statistics.mean(next(iter(r["points"]))["vector_norms"].values()) for r in runs.values()]
        out.append(f"### {study['group']} ({', '.join(runs)}; mean ||T_k|| / ||theta_0|| {statistics.mean(norms):.3f})\n")
        out.append("| setting | test avg | minus TA (per run) | minus TA | alpha | dilution | interference | linear interference | conflict removed: exemplars / merged / random |")
        out.append("|---|---|---|---|---|---|---|---|---|")
        for lab in labels:
            points = [by[run][lab] for run in runs]
            tests = [p["test_average"] for p in points]
            gaps = [p["test_average"] - by[run]["task_arithmetic"]["test_average"] for run, p in zip(runs, points)]
            dec = [p["decomposition"] for p in points]
            removed = "-"
            if "conflict_removed" in points[0]:
                removed = " / ".join(
                    f"{100 * statistics.mean(p['conflict_removed'][key] for p in points):.0f}%"
                    for key in ("exemplars_cat", "merged_cat", "merged_random")
                )
            out.append(
                f"| {lab} | {_mean_sd(tests)} | {' / '.join(f'{g:+.1f}' for g in gaps)} | {_mean_sd(gaps)} | "
                f"{' / '.join(str(p['alpha']) for p in points)} | {_mean_sd([d['dilution'] for d in dec])} | "
                f"{_mean_sd([d['interference'] for d in dec])} | {_mean_sd([d['interference_linear'] for d in dec])} | {removed} |"
            )
        out.append("")
    return "\n".join(out)


def layer_table(path: Path, label_: str) -> str:
    """Per linear weight, the share of Eq. 10's conflict term removed by CAT's trim (no rescale), by
    the trim as merged (with the setting's rescale) and by random bases of the same size, on the
    exemplars' rows and on the merged model's own rows (held-out val images); mean over runs."""
    study = json.loads(path.read_text())
    labels = [p["label"] for p in next(iter(study["runs"].values()))["points"]]
    if label_ not in labels:
        raise SystemExit(f"{path}: no setting {label_!r}; settings: {', '.join(labels)}")
    points = [next(p for p in r["points"] if p["label"] == label_) for r in study["runs"].values()]
    layers = list(points[0]["conflict"])
    columns = [(rows, variant) for rows in ("exemplars", "merged") for variant in ("cat", "cat_as_merged", "random")]
    out = [f"{study['group']}, {label_} (mean over {len(points)} runs): share of sum_k sum_(i != k) ||X_k T_i^T||^2 removed", "",
           "| linear weight | " + " | ".join(f"{rows}: {variant}" for rows, variant in columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for layer in layers:
        cells = []
        for rows, variant in columns:
            shares = [1 - p["conflict"][layer][f"{rows}_{variant}"] / p["conflict"][layer][f"{rows}_original"] for p in points]
            cells.append(f"{100 * statistics.mean(shares):.0f}%")
        out.append(f"| {layer} | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def gap_plot(paths: list[Path], out: Path) -> None:
    """CAT minus Task Arithmetic (test average, each at its alpha chosen on validation) per setting
    and group: one dot per run, the bar at the mean."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names, gaps = [], []
    for path in paths:
        study = json.loads(path.read_text())
        by = [{p["label"]: p for p in r["points"]} for r in study["runs"].values()]
        for lab in [p["label"] for p in next(iter(study["runs"].values()))["points"]]:
            if lab != "task_arithmetic":
                names.append(f"{study['group']}: {lab}")
                gaps.append([b[lab]["test_average"] - b["task_arithmetic"]["test_average"] for b in by])
    fig, ax = plt.subplots(figsize=(7, 0.35 * len(names) + 1.2))
    ys = range(len(names))
    ax.barh(ys, [statistics.mean(g) for g in gaps], color="#9bb7d4")
    for y, g in zip(ys, gaps):
        ax.plot(g, [y] * len(g), "o", color="#1f3b5a", ms=3)
    ax.axvline(0, color="black", lw=0.8)
    ax.set_yticks(list(ys), names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("CAT minus Task Arithmetic, test average (points); dots: seeds")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--group", help="name of this set of projects (e.g. base, lr1e-4)")
    parser.add_argument("--project", action="append", default=[], help="RUN=PROJECT_DIR of a built project")
    parser.add_argument("--settings", choices=["reference", "sweep"], default="reference")
    parser.add_argument("--max-settings", type=int, help="run only the first N settings")
    parser.add_argument("--alphas", type=float, nargs="+", default=ALPHAS)
    parser.add_argument("--cache", type=Path, default=ROOT / "benchmarks" / "results" / ".fidelity-cache")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--summarize", type=Path, nargs="+", help="print the tables of these result files")
    parser.add_argument("--layers", metavar="LABEL", help="with --summarize: per-layer conflict table of this setting")
    parser.add_argument("--plot", type=Path, help="with --summarize: write the CAT - TA figure here")
    args = parser.parse_args(argv)
    if args.summarize and args.plot:
        gap_plot(args.summarize, args.plot)
    if args.summarize:
        print(layer_table(args.summarize[0], args.layers) if args.layers else summarize(args.summarize))
        return
    if not (args.group and args.project and args.out):
        parser.error("--group, --project and --out are needed to run the study")
    projects = {}
    for item in args.project:
        run, sep, path = item.partition("=")
        if not sep or not run or run in projects or not (Path(path) / "params.yaml").is_file():
            parser.error(f"--project {item!r}: expected RUN=PROJECT_DIR, a new run name and a directory with params.yaml")
        projects[run] = path
    args.cache.mkdir(parents=True, exist_ok=True)
    with temporary_settings(updates={PREFECT_LOCAL_STORAGE_PATH: args.cache.resolve()}):  # where cached points live
        settings = (REFERENCE if args.settings == "reference" else SWEEP)[: args.max_settings]
        result = study(args.group, projects, settings, args.alphas)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    tmp.replace(args.out)
    print(summarize([args.out]))


if __name__ == "__main__":
    main()
