"""Time and peak memory of the heavy stages at real model sizes (issue: scale and speed).

Synthetic experts with the real architectures, built into a project by the pipeline's own stages:
an open_clip CLIP with random weights (open_clip ViT-B-32 / ViT-L-14) is theta_0, experts are
theta_0 + small random perturbations (|delta| ~ 1e-3 of each tensor's mean magnitude), and each
task's dataset is random images at the model's input size (6 train, 2 test: 4 train and 2 val
after the validation carve), so the features stage sees the real token counts (50 per image for
B/32, 257 for L/14) with 2 exemplars. These files are given to the `source: open_clip` stages as
local checkpoints and datasets (hub.pretrained.repo, hub.experts.repo, hub.datasets.<task>.repo),
and the stages `datasets`, `pretrained`, `experts` and (after bases) `select` write the project's
artifacts and their manifests exactly as in any run: nothing here writes under data/ or metrics/.

Each stage runs as its own process, exactly as `dvc repro` runs it (`python -m stages.<name>`),
and its wall time and peak RSS (GNU time's maximum resident set size) are recorded. Merge is timed
for CAT and Task Arithmetic separately on the same inputs (bases given).

    python benchmarks/scale.py --arch ViT-B-32 --tasks 2 4 8 --precision float32 --out benchmarks/results/scale_vit-b-32.json
    python benchmarks/scale.py --arch micro-clip --tasks 2 --out /tmp/scale_tiny.json   # tiny: seconds, for tests
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
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


def run_stage(project: Path, module: str, *args: str) -> dict:
    """Run `python -m stages.<module> args` in `project`; wall seconds and peak RSS (MB).

    The peak comes from GNU time's %M for its own child: a child forked straight from this
    (large) process would start its ru_maxrss at this process's RSS."""
    env = dict(os.environ, **OFFLINE, HF_HOME=str(project / ".hf"), PYTHONPATH=str(ROOT))
    start = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-f", "%M", sys.executable, "-m", f"stages.{module}", *args], check=False, cwd=project, env=env,
                          capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"stages.{module} {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
    peak_kb = int(proc.stderr.strip().splitlines()[-1])
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


def write_params(project: Path, sources: Path, arch: str, tasks: list[str], methods: list[str], precision: str) -> None:
    """This repo's params.yaml, for `arch`, `tasks` and the local open_clip sources."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params.update(tasks=tasks, source="open_clip", model=arch, device="cpu")
    params["hub"].update(
        pretrained={"repo": str(sources / "pretrained"), "tag": None, "revision": "main", "sha256": None},
        experts={"repo": str(sources / "experts" / "{task}"), "revision": "main", "revisions": {}, "sha256": {}},
        allow_pickle=False, val_fraction=VAL_FRACTION,
        datasets={t: {"repo": str(sources / "datasets" / t), "files": "data/{split}-*.parquet"} for t in tasks},
    )
    params["task_vectors"]["dtype"] = "float32"
    params["cat"]["precision"] = precision
    params["merge"]["methods"] = methods
    params["select"] = {}  # one candidate per method: its params block as is
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def set_methods(project: Path, methods: list[str]) -> None:
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["merge"]["methods"] = methods
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


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


def measure(arch: str, k: int, workdir: Path, precision: str, keep: bool) -> dict:
    project = workdir / f"{arch}-k{k}"
    shutil.rmtree(project, ignore_errors=True)
    project.mkdir(parents=True)
    tasks = TASKS[:k]
    methods = ["task_arithmetic", "cat"]
    row: dict = {"arch": arch, "tasks": k, "precision": precision}
    row["build"] = build(project, arch, tasks, methods, precision)
    row["task_vectors"] = per_task([run_stage(project, "task_vectors", t) for t in tasks])
    row["features"] = per_task([run_stage(project, "features", t) for t in tasks])
    row["bases"] = run_stage(project, "bases")
    row["select"] = run_stage(project, "select")  # untimed in the tables: scores each method once on val for merge's input
    for method in methods:
        set_methods(project, [method])
        row[f"merge_{method}"] = run_stage(project, "merge")
    set_methods(project, methods)
    row["bases_plus_merge_cat_seconds"] = round(row["bases"]["seconds"] + row["merge_cat"]["seconds"], 2)
    if not keep:
        shutil.rmtree(project, ignore_errors=True)
    return row


def machine() -> dict:
    return {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "python": platform.python_version()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="ViT-B-32", help="model config: open_clip's (ViT-B-32, ViT-L-14) or ours (micro-clip: tiny)")
    parser.add_argument("--tasks", type=int, nargs="+", default=[2, 4, 8], help=f"numbers of tasks K (at most {len(TASKS)})")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--precision", choices=["float64", "float32"], default="float32", help="cat.precision of the bases stage")
    parser.add_argument("--keep", action="store_true", help="keep the built projects in --workdir")
    args = parser.parse_args()
    if not all(2 <= k <= len(TASKS) for k in args.tasks):
        parser.error(f"--tasks: each K must be between 2 and {len(TASKS)}")
    if not Path("/usr/bin/time").is_file():
        parser.error("needs GNU time at /usr/bin/time (peak RSS of each stage)")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="catmerge-scale-"))
    rows = []
    for k in args.tasks:
        rows.append(measure(args.arch, k, workdir.resolve(), args.precision, args.keep))
        r = rows[-1]
        print(f"{args.arch} K={k}: task_vectors {r['task_vectors']['seconds']} s, features {r['features']['seconds']} s, "
              f"bases {r['bases']['seconds']} s ({r['bases']['peak_rss_mb']} MB), merge TA {r['merge_task_arithmetic']['seconds']} s, "
              f"merge CAT {r['merge_cat']['seconds']} s ({r['merge_cat']['peak_rss_mb']} MB)", flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"machine": machine(), "rows": rows}, indent=2) + "\n")  # each row as it lands
    if args.workdir is None and not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
