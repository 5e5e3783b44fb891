"""The library API (catmerge/api.py): every method on tiny towers of each supported family, from
state dicts or files, params by their params.yaml names, clear errors."""

from __future__ import annotations

import pytest
import torch

import catmerge
from catmerge.io import save_weights
from catmerge.merging import METHOD_NAMES
from catmerge.params_base import ParamsError

TASKS = ["a", "b", "c"]


def experts_of(theta0: dict, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {t: {k: v + 0.05 * torch.randn(v.shape, generator=g, dtype=v.dtype) * (v.abs().mean() + 1e-3)
                if v.is_floating_point() else v.clone() for k, v in theta0.items()} for t in TASKS}


def vision(name: str):
    tower = catmerge.create_image_tower(name)
    g = torch.Generator().manual_seed(1)
    exemplars = {t: torch.randint(0, 256, (2, 32, 32, 3), generator=g, dtype=torch.uint8) for t in TASKS}
    return tower, exemplars


def bert():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                 intermediate_size=32, max_position_embeddings=16)).eval()
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(1, 50, (2, 6), generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]])
    return model, {t: {"input_ids": ids, "attention_mask": mask} for t in TASKS}


ARCHITECTURES = {"open_clip": lambda: vision("micro-vit-minilm"), "hf_clip": lambda: vision("micro-hf-clip"), "hf_bert": bert}


@pytest.fixture(scope="module", params=list(ARCHITECTURES))
def architecture(request):
    model, exemplars = ARCHITECTURES[request.param]()
    theta0 = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return model, exemplars, theta0, experts_of(theta0)


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_every_method_merges_every_family(architecture, method):
    model, exemplars, theta0, experts = architecture
    merged = catmerge.merge(method, theta0, experts, exemplars=exemplars, model=model)
    assert set(merged) == set(theta0) and all(merged[k].dtype == v.dtype for k, v in theta0.items())
    floats = [k for k, v in theta0.items() if v.is_floating_point()]
    assert all(torch.isfinite(merged[k]).all() for k in floats)
    changed = sum(int((merged[k] != theta0[k]).sum()) for k in floats)
    assert changed >= 0.1 * sum(theta0[k].numel() for k in floats)  # the experts moved it (TIES keeps 20% per task)


def test_files_stream_to_the_same_weights_as_state_dicts(architecture, tmp_path):
    model, exemplars, theta0, experts = architecture
    save_weights(theta0, tmp_path / "theta0.safetensors")
    for t, weights in experts.items():
        save_weights(weights, tmp_path / f"{t}.safetensors")
    on_disk = {t: tmp_path / f"{t}.safetensors" for t in TASKS}
    for method in ("cat", "tsv_m", "ties"):
        from_files = catmerge.merge(method, tmp_path / "theta0.safetensors", on_disk, exemplars=exemplars, model=model)
        in_memory = catmerge.merge(method, theta0, experts, exemplars=exemplars, model=model)
        assert all(torch.equal(from_files[k], v) for k, v in in_memory.items()), method


def test_params_go_by_their_documented_names():
    model, exemplars = vision("micro-vit-minilm")
    theta0 = {k: v.detach().clone() for k, v in model.state_dict().items()}
    experts = experts_of(theta0)
    by_alias = catmerge.merge("cat", theta0, experts, exemplars=exemplars, model=model, **{"lambda": 4.0})
    by_name = catmerge.merge("cat", theta0, experts, exemplars=exemplars, model=model, lambda_=4.0)
    default = catmerge.merge("cat", theta0, experts, exemplars=exemplars, model=model)
    assert all(torch.equal(by_alias[k], v) for k, v in by_name.items())
    assert any(not torch.equal(default[k], v) for k, v in by_name.items())
    assert catmerge.method_params("ties", k=30).k == 30 and catmerge.method_params("weight_averaging") is None


def test_bad_calls_name_the_param_or_what_is_missing():
    model, exemplars = vision("micro-vit-minilm")
    theta0 = {k: v.detach().clone() for k, v in model.state_dict().items()}
    experts = experts_of(theta0)
    with pytest.raises(ParamsError, match=r"cat.nope = 1: Extra inputs are not permitted \(params of cat: exemplars, "):
        catmerge.merge("cat", theta0, experts, exemplars=exemplars, model=model, nope=1)
    with pytest.raises(ParamsError, match=r"tsv_m.alpha = -1.0: Input should be greater than 0"):
        catmerge.merge("tsv_m", theta0, experts, alpha=-1.0)
    with pytest.raises(ParamsError, match=r"regmean reads layer inputs: pass model=.*missing: \['c'\]"):
        catmerge.merge("regmean", theta0, experts, exemplars={t: exemplars[t] for t in ("a", "b")}, model=model)
    with pytest.raises(ParamsError, match="weight_averaging has no params; got alpha"):
        catmerge.merge("weight_averaging", theta0, experts, alpha=1.0)
    with pytest.raises(KeyError, match="unknown merge method 'avg'"):
        catmerge.merge("avg", theta0, experts)
