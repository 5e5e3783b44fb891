"""The base of every params block (catmerge/params.py and each method's PARAMS), kept apart so
that method modules can declare their params without importing the whole params model."""

from pydantic import BaseModel, ConfigDict


class Strict(BaseModel):
    # strict: `true` is not 1 and "40" is not 40; no NaN or Inf anywhere (an alpha of inf would
    # only fail later, inside a tensor, naming a weight instead of the param)
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


class ParamsError(ValueError):
    pass
