"""Where each stage's artifacts live (relative to the project root; see docs/artifacts.md)."""

from pathlib import Path

from .io import ArtifactError, read_json, verify_manifest, verify_sidecar

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


def checked_split(task: str, split: str, root: Path = Path(".")) -> Path:
    """data/datasets/<task>/<split>.parquet, once the dataset's manifest vouches for it."""
    verify_manifest(root / dataset_dir(task), only=[f"{split}.parquet"])
    return root / dataset_dir(task) / f"{split}.parquet"


def checked_dataset_info(task: str, root: Path = Path(".")) -> dict:
    """data/datasets/<task>/info.json, vouched for by the manifest and saying it is `task`'s."""
    verify_manifest(root / dataset_dir(task), only=["info.json"])
    info = read_json(root / dataset_dir(task) / "info.json")
    if not isinstance(info, dict) or info.get("task") != task or not isinstance(info.get("class_names"), list):
        raise ArtifactError(f"{root / dataset_dir(task) / 'info.json'}: expected task {task!r} and a list of class_names, "
                            f"got task {info.get('task') if isinstance(info, dict) else info!r}")
    return info


def checked_task_vector(task: str, root: Path = Path(".")) -> Path:
    """data/task_vectors/<task>.safetensors, once its manifest vouches for it."""
    verify_sidecar(root / task_vector_path(task))
    return root / task_vector_path(task)


def checked_features(task: str, root: Path = Path(".")) -> Path:
    """data/features/<task>.safetensors, once its manifest vouches for it."""
    verify_sidecar(root / features_path(task))
    return root / features_path(task)


def checked_merged(method: str, root: Path = Path(".")) -> Path:
    """data/merged/<method>.safetensors, once data/merged/manifest.json vouches for it."""
    verify_manifest(root / MERGED_DIR, only=[merged_path(method).name])
    return root / merged_path(method)


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
