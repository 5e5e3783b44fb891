"""Time and peak memory of the heavy stages at real model sizes (issue: scale and speed).

Synthetic experts with the real architectures, built into a project by the pipeline's own stages:
an open_clip CLIP with random weights (open_clip ViT-B-32 / ViT-L-14) is theta_0, experts are
theta_0 + small random perturbations (|delta| ~ 1e-3 of each tensor's mean magnitude), and each
task's dataset is random images at the model's input size (6 train, 2 test: 4 train and 2 val
after the validation carve), so the features stage sees the real token counts (50 per image for
B/32, 257 for L/14) with 2 exemplars. These files are given to the `source: open_clip` stages as
local checkpoints and datasets (hub.pretrained.repo, hub.experts.repo, hub.datasets.<task>.repo),
and the stages `datasets`, `pretrained`, `experts` and (after bases) `select` write the project's
artifacts and their manifests exactly as in any run: nothing here writes under data/ or metrics/
(but `--skip-select`, which writes metrics/selection.json in place of `select`).

Each stage runs as its own process, exactly as `dvc repro` runs it (`python -m stages.<name>`),
and its wall time and peak RSS (GNU time's maximum resident set size) are recorded. The merge
stage is timed separately for every method of catmerge.merging.METHOD_NAMES (found, not listed
here, so a new method module is timed as soon as it lands; `--methods` limits them, Task
Arithmetic is always included as the reference), one process per method on the same inputs
(bases given): `merge.methods: [<method>]`, after one `select` of all methods (untimed in the
tables: merge reads its choice; if it fails, each method gets a `select` of its own;
`--skip-select` writes the choice, each params block as is, without scoring it on val). Every method gets its PARAMS defaults, no grid; a method with an
`exemplars` param that reads train images (RegMean, RegMean++) gets as many as the train split
has (recorded in the row's `exemplars`). A method whose select or merge fails is recorded with
its error and the others go on; the script then exits 1. The JSON is rewritten after each
method, the row marked "partial" until it is whole, so a run stopped midway keeps what it measured.

    python benchmarks/scale.py --arch ViT-B-32 --tasks 2 4 8 --precision float32 --out benchmarks/results/scale_vit-b-32.json
    python benchmarks/scale.py --arch micro-clip --tasks 2 --out /tmp/scale_tiny.json   # tiny: seconds, for tests
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
TASKS = ["sun397", "stanford-cars", "resisc45", "eurosat", "svhn", "gtsrb", "mnist", "dtd"]
TRAIN_IMAGES, TEST_IMAGES, VAL_FRACTION = 6, 2, 0.3  # per task: 3 train images per class, 1 of each carved for val
CHECKPOINT = "open_clip_model.safetensors"  # a name open_clip_source looks for in a local checkpoint directory
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "DVC_NO_ANALYTICS": "1",
           "TOKENIZERS_PARALLELISM": "false"}


class StageFailed(RuntimeError):
    """A stage exited non-zero (or ran past its timeout); `tail` is the end of its output."""

    def __init__(self, what: str, tail: str, seconds: float):
        super().__init__(f"{what} failed after {seconds:.1f} s:\n{tail}")
        self.what, self.tail, self.seconds = what, tail, seconds


def run_stage(project: Path, module: str, *args: str, timeout: float | None = None) -> dict:
    """Run `python -m stages.<module> args` in `project`; wall seconds and peak RSS (MB).

    The peak comes from GNU time's %M for its own child: a child forked straight from this
    (large) process would start its ru_maxrss at this process's RSS. On a timeout the whole
    process group (GNU time and the stage) is killed."""
    env = dict(os.environ, **OFFLINE, HF_HOME=str(project / ".hf"), PYTHONPATH=str(ROOT))
    what = f"stages.{module} {' '.join(args)}".strip()
    start = time.perf_counter()
    proc = subprocess.Popen(["/usr/bin/time", "-f", "%M", sys.executable, "-m", f"stages.{module}", *args], cwd=project, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        raise StageFailed(what, f"timed out after {timeout} s (killed)\n{stderr[-2000:]}", time.perf_counter() - start) from None
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise StageFailed(what, f"{stdout[-2000:]}\n{stderr[-4000:]}".strip(), seconds)
    peak_kb = int(stderr.strip().splitlines()[-1])
    return {"seconds": round(seconds, 2), "peak_rss_mb": round(peak_kb / 1024, 1)}


def per_task(results: list[dict]) -> dict:
    """K per-task processes: seconds summed, the largest peak, and each one."""
    return {"seconds": round(sum(r["seconds"] for r in results), 2), "peak_rss_mb": max(r["peak_rss_mb"] for r in results),
            "per_task": results}


def write_sources(sources: Path, arch: str, tasks: list[str]) -> None:
    """What the `source: open_clip` stages read from disk: theta_0 as a whole open_clip CLIP (image
    and text towers, random weights) and each task's train / test parquet (Image + ClassLabel)."""
    from catmerge.configs import model_config
    from catmerge.data import write_split
    from catmerge.io import save_weights
    from catmerge.models import create_full_clip

    torch.manual_seed(0)
    clip, _ = create_full_clip(arch)
    save_weights(clip.state_dict(), sources / "pretrained" / CHECKPOINT, {"model": arch})
    del clip
    size = model_config(arch)["vision_cfg"]["image_size"]
    size = size[0] if isinstance(size, (list, tuple)) else size
    rng = np.random.default_rng(0)
    for task in tasks:
        for split, count in (("train", TRAIN_IMAGES), ("test", TEST_IMAGES)):
            images = rng.integers(0, 256, size=(count, size, size, 3), dtype=np.uint8)
            write_split(images, np.arange(count) % 2, ["a", "b"], sources / "datasets" / task / "data" / f"{split}-00000-of-00001.parquet")


def write_experts(project: Path, sources: Path, tasks: list[str]) -> None:
    """Each expert: the pretrained stage's theta_0 plus a random perturbation, as a bare image tower."""
    from catmerge.io import WeightsFile, save_weights
    from catmerge.layout import checked_pretrained

    theta0 = WeightsFile(checked_pretrained(root=project))
    for i, task in enumerate(tasks):
        g = torch.Generator().manual_seed(100 + i)
        expert = {}
        for name in theta0:
            value = theta0[name]
            expert[name] = value + 1e-3 * value.abs().mean() * torch.randn(value.shape, generator=g) if value.is_floating_point() else value
        save_weights(expert, sources / "experts" / task / CHECKPOINT, {"task": task})
        del expert


def method_blocks(methods: list[str], precision: str) -> dict[str, dict]:
    """Each method's params block: its PARAMS defaults (cat.precision as asked)."""
    from catmerge.merging import method_module

    blocks = {}
    for method in methods:
        block = method_module(method).PARAMS
        if block is not None:
            blocks[method] = block().model_dump(by_alias=True, mode="json")
    if "cat" in blocks:
        blocks["cat"]["precision"] = precision
    return blocks


def exemplar_methods(methods: list[str]) -> list[str]:
    """The methods with an `exemplars` param whose images they read themselves (RegMean,
    RegMean++), not through the features stage (CAT's exemplars are the features')."""
    from catmerge.merging import method_module

    out = []
    for method in methods:
        module = method_module(method)
        if module.PARAMS is not None and "exemplars" in module.PARAMS.model_fields and set(module.NEEDS) & {"layer_inputs", "exemplars"}:
            out.append(method)
    return out


def write_params(project: Path, sources: Path, arch: str, tasks: list[str], methods: list[str], precision: str) -> None:
    """This repo's params.yaml, for `arch`, `tasks` and the local open_clip sources; every method
    of `methods` with its PARAMS defaults and no grid."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params.update(tasks=tasks, source="open_clip", model=arch, device="cpu")
    params["hub"].update(
        pretrained={"repo": str(sources / "pretrained"), "tag": None, "revision": "main", "sha256": None},
        experts={"repo": str(sources / "experts" / "{task}"), "revision": "main", "revisions": {}, "sha256": {}},
        allow_pickle=False, val_fraction=VAL_FRACTION,
        datasets={t: {"repo": str(sources / "datasets" / t), "files": "data/{split}-*.parquet"} for t in tasks},
    )
    params["task_vectors"]["dtype"] = "float32"
    params.update(method_blocks(methods, precision))
    if "cat" not in params:  # the features and bases stages read cat's block
        params.update(method_blocks(["cat"], precision))
    params["cat"]["precision"] = precision
    params["merge"]["methods"] = methods
    params["select"] = {}  # one candidate per method: its params block as is
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def edit_params(project: Path, update) -> None:
    params = yaml.safe_load((project / "params.yaml").read_text())
    update(params)
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def set_methods(project: Path, methods: list[str]) -> None:
    edit_params(project, lambda params: params["merge"].update(methods=methods))


def train_images(project: Path, tasks: list[str]) -> int:
    """The fewest train images of any task, as the datasets stage wrote them."""
    from catmerge import layout
    from catmerge.data import read_split

    return min(len(read_split(layout.checked_split(task, "train", root=project)).labels) for task in tasks)


def build(project: Path, arch: str, tasks: list[str], methods: list[str], precision: str) -> dict:
    """The project up to the experts, through the stages `datasets`, `pretrained` and `experts`
    (each writes its artifacts and manifest as in any run); their times, for the record."""
    for name in ("stages", "catmerge"):
        shutil.copytree(ROOT / name, project / name, ignore=shutil.ignore_patterns("__pycache__"))
    sources = project / "sources"
    write_params(project, sources, arch, tasks, methods, precision)
    write_sources(sources, arch, tasks)
    timings = {"datasets": per_task([run_stage(project, "datasets", t) for t in tasks]),
               "pretrained": run_stage(project, "pretrained")}
    write_experts(project, sources, tasks)
    timings["experts"] = per_task([run_stage(project, "experts", t) for t in tasks])
    shutil.rmtree(sources)  # the stages keep what they read; a ViT-L/14 source set is 10 GB
    return timings


def error_record(exc: StageFailed) -> dict:
    lines = [line for line in exc.tail.splitlines() if line.strip()]
    return {"error": "\n".join(lines[-15:]), "stage": exc.what, "seconds": round(exc.seconds, 2)}


def set_overrides(params: dict, overrides: list[str]) -> None:
    """`--set METHOD.PARAM=VALUE` (YAML value) into the method's params block."""
    for override in overrides:
        key, _, value = override.partition("=")
        block, _, name = key.partition(".")
        if block not in params or not name or not _:
            raise SystemExit(f"--set {override!r}: expected METHOD.PARAM=VALUE for a method block of params.yaml")
        params[block][name] = yaml.safe_load(value)


def write_choice_without_scoring(project: Path, methods: list[str]) -> None:
    """metrics/selection.json as `select` writes it when no method has a grid: each method's choice
    is its params block as is. `select` would also merge every method once and score it on val,
    which says nothing for random experts and at ViT-L/14 takes about an hour."""
    from catmerge.io import write_json

    choice = {m: {"chosen": {}, "grid": {}, "note": "not scored on val (benchmarks/scale.py --skip-select)"} for m in methods}
    write_json({"methods": choice}, project / "metrics" / "selection.json")


def measure(arch: str, k: int, workdir: Path, precision: str, keep: bool, methods: list[str], timeout: float | None,
            overrides: list[str], save=lambda row: None, skip_select: bool = False) -> dict:
    """One row: the build, the stages and every method's merge. `save(row)` is called with the row
    so far after each method (marked "partial": a run stopped midway keeps what it measured)."""
    project = workdir / f"{arch}-k{k}"
    shutil.rmtree(project, ignore_errors=True)
    project.mkdir(parents=True)
    tasks = TASKS[:k]
    row: dict = {"arch": arch, "tasks": k, "precision": precision, "methods": methods}
    row["build"] = build(project, arch, tasks, methods, precision)
    count = train_images(project, tasks)
    exemplars = {m: count for m in exemplar_methods(methods)}
    edit_params(project, lambda params: params.update({m: {**params[m], "exemplars": n} for m, n in exemplars.items()}))
    edit_params(project, lambda params: set_overrides(params, overrides))
    row["train_images_per_task"] = count
    row["exemplars"] = exemplars  # RegMean's and RegMean++'s exemplars per task: the whole train split
    row["merge_params"] = {m: yaml.safe_load((project / "params.yaml").read_text()).get(m, {}) for m in methods}
    row["task_vectors"] = per_task([run_stage(project, "task_vectors", t) for t in tasks])
    row["features"] = per_task([run_stage(project, "features", t) for t in tasks])
    row["bases"] = run_stage(project, "bases")
    failed: dict[str, dict] = {}
    # Untimed in the tables: select scores each method once on val, for merge to read. One select
    # for all methods saves a process start per method; if it fails, each method gets its own, so
    # one method's failure does not stop the others.
    row["select"] = {}
    set_methods(project, methods)
    if skip_select:
        write_choice_without_scoring(project, methods)
        row["select"] = "skipped: no grid, so the choice is each params block as is (--skip-select)"
        selected = True
    else:
        try:
            row["select"]["all"] = run_stage(project, "select", timeout=timeout * len(methods) if timeout else None)
            selected = True
        except StageFailed as exc:
            print(f"{arch} K={k}: select of all methods failed ({exc.what}); selecting each method alone", file=sys.stderr, flush=True)
            selected = False
    for method in methods:
        set_methods(project, [method])
        try:
            if not selected:
                row["select"][method] = run_stage(project, "select", timeout=timeout)
            row[f"merge_{method}"] = run_stage(project, "merge", timeout=timeout)
        except StageFailed as exc:  # recorded; the other methods go on
            failed[method] = row[f"merge_{method}"] = error_record(exc)
            print(f"{arch} K={k}: {method} FAILED in {exc.what}:\n{failed[method]['error']}", file=sys.stderr, flush=True)
            save({**row, "partial": True, "failed": sorted(failed)})
            continue
        merge = row[f"merge_{method}"]
        print(f"{arch} K={k}: merge {method} {merge['seconds']} s ({merge['peak_rss_mb']} MB)", flush=True)
        save({**row, "partial": True, "failed": sorted(failed)})
    set_methods(project, methods)
    ta = row["merge_task_arithmetic"].get("seconds") if "task_arithmetic" not in failed else None
    row["merge_seconds_over_task_arithmetic"] = {
        m: round(row[f"merge_{m}"]["seconds"] / ta, 2) for m in methods if m not in failed and ta}
    row["failed"] = sorted(failed)
    if "cat" in methods and "cat" not in failed:
        row["bases_plus_merge_cat_seconds"] = round(row["bases"]["seconds"] + row["merge_cat"]["seconds"], 2)
    if not keep:
        shutil.rmtree(project, ignore_errors=True)
    return row


def machine() -> dict:
    return {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "python": platform.python_version()}


def code() -> dict:
    """The commit measured, and what the working tree changed under catmerge/ and stages/ (the
    copy each project gets is of the working tree)."""
    def git(*args: str) -> str:
        proc = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=False)
        return proc.stdout.strip() if proc.returncode == 0 else ""

    return {"commit": git("rev-parse", "HEAD") or None,
            "changed": git("status", "--porcelain", "--", "catmerge", "stages", "params.yaml").splitlines()}


def main() -> None:
    from catmerge.io import write_json
    from catmerge.merging import METHOD_NAMES

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="ViT-B-32", help="model config: open_clip's (ViT-B-32, ViT-L-14) or ours (micro-clip: tiny)")
    parser.add_argument("--tasks", type=int, nargs="+", default=[2, 4, 8], help=f"numbers of tasks K (at most {len(TASKS)})")
    parser.add_argument("--methods", nargs="+", default=None, metavar="METHOD",
                        help=f"merge methods to time (default: all of {', '.join(METHOD_NAMES)}); task_arithmetic is always added")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--precision", choices=["float64", "float32"], default="float32", help="cat.precision of the bases stage")
    parser.add_argument("--merge-timeout", type=float, default=None,
                        help="seconds allowed to each method's select and to its merge; a method past it is recorded as failed")
    parser.add_argument("--keep", action="store_true", help="keep the built projects in --workdir")
    parser.add_argument("--skip-select", action="store_true",
                        help="write select's choice (each params block as is: there is no grid) instead of running select, "
                             "which merges and scores every method once on val (about an hour at ViT-L/14)")
    parser.add_argument("--set", action="append", default=[], metavar="METHOD.PARAM=VALUE",
                        help="override a method's default param (e.g. wudi.iterations=40); recorded in each row's merge_params")
    args = parser.parse_args()
    if not all(2 <= k <= len(TASKS) for k in args.tasks):
        parser.error(f"--tasks: each K must be between 2 and {len(TASKS)}")
    unknown = sorted(set(args.methods or []) - set(METHOD_NAMES))
    if unknown:
        parser.error(f"--methods: unknown {unknown}; known: {', '.join(METHOD_NAMES)}")
    for override in args.set:
        block, dot, rest = override.partition("=")[0].partition(".")
        if block not in METHOD_NAMES or not dot or not rest or "=" not in override:
            parser.error(f"--set {override!r}: expected METHOD.PARAM=VALUE with METHOD one of {', '.join(METHOD_NAMES)}")
    methods = list(METHOD_NAMES) if args.methods is None else [m for m in METHOD_NAMES if m in {*args.methods, "task_arithmetic"}]
    if not Path("/usr/bin/time").is_file():
        parser.error("needs GNU time at /usr/bin/time (peak RSS of each stage)")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="catmerge-scale-"))
    command = ["python", "benchmarks/scale.py", *sys.argv[1:]]
    measured = code()
    rows = []

    def save(landed: list[dict]) -> None:
        write_json({"machine": machine(), "command": command, "code": measured, "rows": landed}, args.out)

    for k in args.tasks:
        rows.append(measure(args.arch, k, workdir.resolve(), args.precision, args.keep, methods, args.merge_timeout, args.set,
                            save=lambda row: save([*rows, row]), skip_select=args.skip_select))
        r = rows[-1]
        merges = ", ".join(f"{m} {r[f'merge_{m}']['seconds']} s ({r[f'merge_{m}']['peak_rss_mb']} MB)" if m not in r["failed"]
                           else f"{m} FAILED" for m in methods)
        print(f"{args.arch} K={k}: task_vectors {r['task_vectors']['seconds']} s, features {r['features']['seconds']} s, "
              f"bases {r['bases']['seconds']} s ({r['bases']['peak_rss_mb']} MB); merge: {merges}", flush=True)
        save(rows)  # each row as it lands, replacing its partial one
    if args.workdir is None and not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)
    failed = sorted({f"{m} (K={r['tasks']})" for r in rows for m in r["failed"]})
    if failed:
        sys.exit(f"merge methods that failed: {', '.join(failed)} (errors in {args.out})")


if __name__ == "__main__":
    main()
