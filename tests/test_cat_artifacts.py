"""The features and bases stages' artifacts on the micro benchmark, checked against recomputation."""

from __future__ import annotations

import json
import sys

import pytest
import torch
import yaml

from catmerge import cat
from catmerge.adapters import open_clip_vit
from catmerge.data import read_split
from catmerge.features import load_features
from catmerge.io import load_weights, read_metadata, sha256_file
from catmerge.merging.cat import read_removals
from catmerge.models import create_image_tower, normalize_images
from conftest import run


def project_params(project):
    return yaml.safe_load((project / "params.yaml").read_text())


def test_features_are_task_ks_own_inputs_on_its_exemplars(micro_project):
    params = project_params(micro_project)
    task = "mnist_rotation"
    path = micro_project / f"data/features/{task}.safetensors"
    linear, sums, meta = load_features(path)
    assert meta["adapter"] == "open_clip_vit" and meta["task"] == task
    assert len(meta["exemplars"]) == params["cat"]["exemplars"] and meta["rows"] == 17 * params["cat"]["exemplars"]

    # Recompute with the expert (theta_0 + 1.0 * T_k is the expert bit for bit in float64).
    tower = create_image_tower(params["model"])
    tower.load_state_dict(load_weights(micro_project / f"data/experts/{task}/expert.safetensors"))
    train = read_split(micro_project / f"data/datasets/{task}/train.parquet")
    rows = open_clip_vit.capture_inputs(tower, normalize_images(train.images[meta["exemplars"]]))

    stored = load_weights(path)
    block = "transformer.resblocks.0"
    # width 16 < 34 rows: Gram form; c_proj reads 64 features > 34 rows: rows kept
    assert f"{block}.attn.in_proj.gram" in stored and stored[f"{block}.attn.in_proj.gram"].shape == (16, 16)
    assert stored[f"{block}.mlp.c_proj.rows"].shape == (meta["rows"], 64)
    x = rows[f"{block}.attn.out_proj"].double()
    torch.testing.assert_close(linear[f"{block}.attn.out_proj"].gram, x.T @ x, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(linear[f"{block}.mlp.c_proj"].rows, rows[f"{block}.mlp.c_proj"].double(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(sums["ln_post"], rows["ln_post"].double().square().sum(0), rtol=1e-6, atol=1e-6)


def test_bases_are_orthonormal_and_diagnostics_match(micro_project):
    params = project_params(micro_project)
    tasks = params["tasks"]
    bases_dir = micro_project / "data/bases"
    manifest = json.loads((bases_dir / "manifest.json").read_text())
    for record in manifest["files"]:
        assert record["sha256"] == sha256_file(bases_dir / record["path"])
    assert manifest["params"]["c"] == params["cat"]["c"]
    pieces, removals = read_removals(bases_dir, tasks)
    diagnostics = json.loads((bases_dir / "diagnostics.json").read_text())
    linear = [p for p in pieces if p.family == "linear"]
    assert len(linear) == 2 * (3 + 3)  # split qkv: q, k, v, out_proj, c_fc, c_proj per block
    kept_any = 0
    for piece in linear:
        for task, removal in zip(tasks, removals[piece.name]):
            b = removal.basis
            assert b.dtype == torch.float64 and b.shape[0] == piece.stop - piece.start and b.shape[1] <= params["cat"]["c"]
            torch.testing.assert_close(b.T @ b, torch.eye(b.shape[1], dtype=torch.float64), atol=1e-9, rtol=0)
            entry = diagnostics[piece.name][task]
            assert len(entry["kept"]) == b.shape[1] and all(v > 0 for v in entry["kept"])
            kept_any += b.shape[1]
    assert kept_any > 0

    # Recompute one G_k (Eq. 10) from the stored features and task vectors: the stored basis
    # captures its top eigenvalues, and the diagnostics record them.
    piece = next(p for p in linear if p.name.endswith("resblocks.1.mlp.c_fc.weight"))
    tvs = [load_weights(micro_project / f"data/task_vectors/{t}.safetensors")[piece.key].double() for t in tasks]
    inputs = [load_features(micro_project / f"data/features/{t}.safetensors")[0][piece.input] for t in tasks]
    lam = params["cat"]["lambda"]
    for k, task in enumerate(tasks):
        g = cat.conflict_matrix(k, tvs, inputs, lam)
        b = removals[piece.name][k].basis
        top = torch.linalg.eigvalsh(g).flip(0)[: b.shape[1]]
        torch.testing.assert_close(torch.diagonal(b.T @ g @ b), top, rtol=1e-6, atol=1e-9)
        assert diagnostics[piece.name][task]["kept"] == pytest.approx(top.tolist(), rel=1e-6)
        assert diagnostics[piece.name][task]["objective"] == pytest.approx(float(top.sum()), rel=1e-6)
    for piece in pieces:
        if piece.family in ("norm_scale", "shift"):
            for removal in removals[piece.name]:
                assert removal.mask.dtype == torch.int64 and len(removal.mask) <= params["cat"]["c"]
    assert read_metadata(bases_dir / f"{tasks[0]}.safetensors") == {"task": tasks[0]}


def test_cat_merge_differs_from_task_arithmetic_where_it_trims_only(micro_project):
    cat_merged = load_weights(micro_project / "data/merged/cat.safetensors")
    theta0 = load_weights(micro_project / "data/pretrained/image_tower.safetensors")
    params = project_params(micro_project)
    tvs = [load_weights(micro_project / f"data/task_vectors/{t}.safetensors") for t in params["tasks"]]
    # task arithmetic at cat.alpha: equal on "other" parameters, different on trimmed linear weights
    ta = {k: (theta0[k].double() + params["cat"]["alpha"] * sum(tv[k] for tv in tvs)).float() for k in theta0}
    for key in ("proj", "class_embedding", "conv1.weight", "positional_embedding"):
        torch.testing.assert_close(cat_merged[key], ta[key], rtol=0, atol=1e-6)
    for key in ("transformer.resblocks.0.mlp.c_fc.weight", "transformer.resblocks.1.attn.in_proj_weight"):
        assert (cat_merged[key] - ta[key]).abs().max() > 1e-4, key


def test_features_bases_and_merge_give_the_same_bytes_when_rerun(micro_project):
    outputs = [micro_project / "data/features/textures.safetensors"]
    outputs += sorted((micro_project / "data/bases").iterdir()) + sorted((micro_project / "data/merged").iterdir())
    before = {path.name: sha256_file(path) for path in outputs}
    for stage in (["stages.features", "textures"], ["stages.bases"], ["stages.merge"]):
        run([sys.executable, "-m", *stage], micro_project)
    assert {path.name: sha256_file(path) for path in outputs} == before


def test_read_removals_refuses_a_changed_file_and_other_tasks(micro_project, tmp_path):
    import shutil

    from catmerge.io import ArtifactError

    tasks = project_params(micro_project)["tasks"]
    copy = tmp_path / "bases"
    shutil.copytree(micro_project / "data/bases", copy)
    with pytest.raises(ArtifactError, match="computed for tasks"):
        read_removals(copy, list(reversed(tasks)))
    target = copy / f"{tasks[0]}.safetensors"
    data = bytearray(target.read_bytes())
    data[-1] ^= 0xFF
    target.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=f"{target.name}: sha256 [0-9a-f]{{64}} does not match"):
        read_removals(copy, tasks)
