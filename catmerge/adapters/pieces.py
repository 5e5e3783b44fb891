"""The unit CAT works on: a parameter, or one row block of it (q, k or v of a fused projection)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Family = Literal["linear", "norm_scale", "shift", "other"]


@dataclass(frozen=True)
class Piece:
    name: str  # the parameter key, or "<key>[q]" / "[k]" / "[v]" for a row block
    key: str  # the parameter in the state dict
    family: Family
    input: str | None  # captured input rows that feed it (linear weights and norm scales)
    start: int  # row range [start, stop) of the parameter's first dimension
    stop: int

    def of(self, tensor):
        """This piece's view of the full parameter tensor."""
        return tensor if tensor.dim() == 0 else tensor[self.start : self.stop]

    def to_json(self) -> dict:
        return {"name": self.name, "key": self.key, "family": self.family, "input": self.input, "rows": [self.start, self.stop]}

    @classmethod
    def from_json(cls, obj: dict) -> Piece:
        return cls(obj["name"], obj["key"], obj["family"], obj["input"], *obj["rows"])


def whole_or_split(key: str, family: Family, input_name: str | None, shape: tuple[int, ...], split_qkv: bool) -> list[Piece]:
    rows = shape[0] if shape else 0
    if not split_qkv:
        return [Piece(key, key, family, input_name, 0, rows)]
    if rows % 3:
        raise ValueError(f"{key}: cannot split {rows} rows into q, k, v")
    d = rows // 3
    return [Piece(f"{key}[{part}]", key, family, input_name, j * d, (j + 1) * d) for j, part in enumerate("qkv")]
