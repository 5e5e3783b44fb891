"""Time and peak memory of the heavy stages at real model sizes (issue: scale and speed).

Synthetic experts with the real architectures: open_clip ViT-B-32 / ViT-L-14 towers with random
weights as theta_0, experts = theta_0 + small random perturbations (|delta| ~ 1e-3 of each
tensor's mean magnitude), and random 224 x 224 images as each task's train split, so the features
stage sees the real token counts (50 per image for B/32, 257 for L/14) with 2 exemplars. Each
stage runs as its own process, exactly as `dvc repro` runs it (`python -m stages.<name>`), and its
wall time and peak RSS (GNU time's maximum resident set size) are recorded.

    python benchmarks/scale.py --arch ViT-B-32 --tasks 2 4 8 --precision float32 --out benchmarks/results/scale_vit-b-32.json

Merge is timed for CAT and Task Arithmetic separately on the same inputs (bases given).
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


def run_stage(project: Path, module: str, *args: str) -> dict:
    """Run `python -m stages.<module> args` in `project`; wall seconds and peak RSS (MB).

    The peak comes from GNU time's %M for its own child: a child forked straight from this
    (large) process would start its ru_maxrss at this process's RSS."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    start = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-f", "%M", sys.executable, "-m", f"stages.{module}", *args], check=False, cwd=project, env=env,
                          capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"stages.{module} {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
    peak_kb = int(proc.stderr.strip().splitlines()[-1])
    return {"seconds": round(seconds, 2), "peak_rss_mb": round(peak_kb / 1024, 1)}


def build(project: Path, arch: str, k: int, methods: list[str], precision: str) -> None:
    """theta_0, K experts and K tiny datasets, and params for `arch` and the first K tasks."""
    from catmerge.data import write_split
    from catmerge.io import save_weights, write_json
    from catmerge.models import create_image_tower

    torch.manual_seed(0)
    tower = create_image_tower(arch)
    theta0 = {name: value.detach().clone() for name, value in tower.state_dict().items()}
    save_weights(theta0, project / "data/pretrained/image_tower.safetensors", {"model": arch})
    size = tower.image_size[0] if isinstance(tower.image_size, tuple) else tower.image_size
    rng = np.random.default_rng(0)
    for i, task in enumerate(TASKS[:k]):
        g = torch.Generator().manual_seed(100 + i)
        expert = {n: v + 1e-3 * v.abs().mean() * torch.randn(v.shape, generator=g) for n, v in theta0.items()}
        save_weights(expert, project / f"data/experts/{task}/expert.safetensors", {"model": arch, "task": task})
        images = rng.integers(0, 256, size=(4, size, size, 3), dtype=np.uint8)
        write_split(images, np.arange(4) % 2, ["a", "b"], project / f"data/datasets/{task}/train.parquet")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params.update(tasks=TASKS[:k], source="open_clip", model=arch, device="cpu")
    params["task_vectors"]["dtype"] = "float32"
    params["cat"]["precision"] = precision
    params["merge"]["methods"] = methods
    params["select"] = {}
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    write_json({"methods": {m: {"chosen": {}} for m in methods}}, project / "metrics/selection.json")
    for name in ("stages", "catmerge"):
        shutil.copytree(ROOT / name, project / name, ignore=shutil.ignore_patterns("__pycache__"))


def measure(arch: str, k: int, workdir: Path, precision: str, keep: bool) -> dict:
    project = workdir / f"{arch}-k{k}"
    shutil.rmtree(project, ignore_errors=True)
    project.mkdir(parents=True)
    build(project, arch, k, ["task_arithmetic", "cat"], precision)
    tasks = TASKS[:k]
    row: dict = {"arch": arch, "tasks": k, "precision": precision}
    per_task = [run_stage(project, "task_vectors", t) for t in tasks]
    row["task_vectors"] = {"seconds": round(sum(r["seconds"] for r in per_task), 2),
                           "peak_rss_mb": max(r["peak_rss_mb"] for r in per_task), "per_task": per_task}
    per_task = [run_stage(project, "features", t) for t in tasks]
    row["features"] = {"seconds": round(sum(r["seconds"] for r in per_task), 2),
                       "peak_rss_mb": max(r["peak_rss_mb"] for r in per_task), "per_task": per_task}
    row["bases"] = run_stage(project, "bases")
    for method in ("task_arithmetic", "cat"):
        params = yaml.safe_load((project / "params.yaml").read_text())
        params["merge"]["methods"] = [method]
        (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        row[f"merge_{method}"] = run_stage(project, "merge")
    row["bases_plus_merge_cat_seconds"] = round(row["bases"]["seconds"] + row["merge_cat"]["seconds"], 2)
    if not keep:
        shutil.rmtree(project, ignore_errors=True)
    return row


def machine() -> dict:
    return {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "python": platform.python_version()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="ViT-B-32")
    parser.add_argument("--tasks", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--precision", choices=["float64", "float32"], default="float32", help="cat.precision of the bases stage")
    parser.add_argument("--keep", action="store_true", help="keep the built projects in --workdir")
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="catmerge-scale-"))
    rows = []
    for k in args.tasks:
        rows.append(measure(args.arch, k, workdir, args.precision, args.keep))
        r = rows[-1]
        print(f"{args.arch} K={k}: task_vectors {r['task_vectors']['seconds']} s, features {r['features']['seconds']} s, "
              f"bases {r['bases']['seconds']} s ({r['bases']['peak_rss_mb']} MB), merge TA {r['merge_task_arithmetic']['seconds']} s, "
              f"merge CAT {r['merge_cat']['seconds']} s ({r['merge_cat']['peak_rss_mb']} MB)", flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"machine": machine(), "rows": rows}, indent=2) + "\n")  # each row as it lands


if __name__ == "__main__":
    main()
