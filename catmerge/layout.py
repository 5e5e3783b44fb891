"""Where each stage's artifacts live (relative to the project root; see docs/artifacts.md)."""

from pathlib import Path

from .io import verify_manifest

DATA = Path("data")
PRETRAINED_DIR = DATA / "pretrained"
PRETRAINED_TOWER = PRETRAINED_DIR / "image_tower.safetensors"
PRETRAINED_TEXT = PRETRAINED_DIR / "text_projection.safetensors"
MERGED_DIR = DATA / "merged"
METRICS_DIR = Path("metrics")


def checked_pretrained(name: str = PRETRAINED_TOWER.name, root: Path = Path(".")) -> Path:
    """data/pretrained/<name> (the image tower by default), once the directory's manifest vouches for it."""
    verify_manifest(root / PRETRAINED_DIR, only=[name])
    return root / PRETRAINED_DIR / name


def checked_expert(task: str, name: str = "expert.safetensors", root: Path = Path(".")) -> Path:
    """data/experts/<task>/<name> (the tower by default, or head.safetensors), once the
    directory's manifest vouches for it."""
    verify_manifest(root / expert_dir(task), only=[name])
    return root / expert_dir(task) / name


def dataset_dir(task: str) -> Path:
    return DATA / "datasets" / task


def expert_dir(task: str) -> Path:
    return DATA / "experts" / task


def task_vector_path(task: str) -> Path:
    return DATA / "task_vectors" / f"{task}.safetensors"


def merged_path(method: str) -> Path:
    return MERGED_DIR / f"{method}.safetensors"


def features_path(task: str) -> Path:
    return DATA / "features" / f"{task}.safetensors"


BASES_DIR = DATA / "bases"
SELECT_CACHE = DATA / "select_cache"
SELECTION = METRICS_DIR / "selection.json"
ALPHA_CURVES = METRICS_DIR / "alpha_curves"
DECOMPOSITION = METRICS_DIR / "decomposition.json"
DECOMPOSITION_CAT = METRICS_DIR / "decomposition_cat.json"  # the same split for CAT's trimmed vectors
REPORTS_DIR = Path("reports")
