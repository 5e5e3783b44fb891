"""catmerge: training-free merging of expert models fine-tuned from one pretrained model.

The public surface is small: `merge(method, pretrained, experts, ...)` merges checkpoints with any
method; below it, build models from architecture configs, compute task vectors, merge them with a
named method, evaluate with a zero-shot head. Names are imported lazily so
that light stages do not pay for importing open_clip.
"""

import importlib

_PUBLIC = {
    "create_clip": "models",
    "create_image_tower": "models",
    "load_weights": "io",
    "save_weights": "io",
    "task_vector": "task_vectors",
    "apply_task_vector": "task_vectors",
    "merge_method": "merging",
    "merge": "api",
    "method_params": "api",
}
__all__ = ["apply_task_vector", "create_clip", "create_image_tower", "load_weights", "merge", "merge_method", "method_params",
           "save_weights", "task_vector"]


def __getattr__(name: str):
    if name in _PUBLIC:
        return getattr(importlib.import_module(f".{_PUBLIC[name]}", __name__), name)
    raise AttributeError(f"module 'catmerge' has no attribute {name!r}")
