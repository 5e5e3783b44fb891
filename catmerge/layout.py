"""Where each stage's artifacts live (relative to the project root; see docs/artifacts.md)."""

from pathlib import Path

from .io import verify_manifest

DATA = Path("data")
PRETRAINED_DIR = DATA / "pretrained"
PRETRAINED_TOWER = PRETRAINED_DIR / "image_tower.safetensors"
PRETRAINED_TEXT = PRETRAINED_DIR / "text_projection.safetensors"
MERGED_DIR = DATA / "merged"
METRICS_DIR = Path("metrics")


def checked_pretrained_tower(root: Path = Path(".")) -> Path:
    """The pretrained image tower, once data/pretrained's manifest vouches for every file in it."""
    verify_manifest(root / PRETRAINED_DIR)
    return root / PRETRAINED_TOWER


def checked_expert_dir(task: str, root: Path = Path(".")) -> Path:
    """Task `task`'s expert directory (tower and head), once its manifest vouches for both."""
    verify_manifest(root / expert_dir(task))
    return root / expert_dir(task)


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
