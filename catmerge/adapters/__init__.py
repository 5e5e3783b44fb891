"""Architecture adapters: one module per model family.

An adapter module has `NAME`, `matches(model)`, `pieces(shapes, qkv)` (every float parameter as
CAT pieces with its family and input) and `capture_inputs(model, images)` (input rows of every
linear layer and x_hat of every norm, keyed by the names `pieces` uses). Adding a family is one
new module listed here.
"""

from types import ModuleType

from . import hf_bert, hf_clip_vision, open_clip_vit
from .pieces import Piece

ADAPTERS: dict[str, ModuleType] = {m.NAME: m for m in (open_clip_vit, hf_clip_vision, hf_bert)}


def adapter_for(model) -> ModuleType:
    for adapter in ADAPTERS.values():
        if adapter.matches(model):
            return adapter
    raise TypeError(f"no architecture adapter for {type(model).__name__}; known: {', '.join(ADAPTERS)}")


def get_adapter(name: str) -> ModuleType:
    if name not in ADAPTERS:
        raise KeyError(f"unknown architecture adapter {name!r}; known: {', '.join(ADAPTERS)}")
    return ADAPTERS[name]


__all__ = ["ADAPTERS", "Piece", "adapter_for", "get_adapter"]
