"""The web-like pretraining captions (pretrain.captions: web): content named only at the chosen
rate, in words that never repeat an evaluation prompt, over every source."""

from __future__ import annotations

import numpy as np
import pytest

from catmerge.benchmark import pretraining, sources
from catmerge.benchmark.tasks import TASKS


def mixture(name_rate: float, seed: int = 0):
    return pretraining.pretraining_mixture(0, np.random.default_rng([seed, 7]), "web", name_rate)


def class_words() -> set[str]:
    words = set(sources.DIGIT_WORDS) | set(sources.TEXTURE_IMAGES) | set(sources.PHOTO_IMAGES) | set(sources.SHAPES) | set(sources.CHARTS)
    return words | {"face", "portrait", "headshot", "scenery"}


def test_every_source_is_in_the_mixture_once_per_training_image():
    images, captions = mixture(0.3)
    pools = [sources.mnist, sources.sklearn_digits, sources.textures, sources.photos, sources.letters, sources.shapes,
             sources.charts, sources.lfw_faces]
    assert len(images) == len(captions) == sum(len(f(0)["train"].labels) for f in pools)
    assert images.shape[1:] == (32, 32, 3) and images.dtype == np.uint8


def test_at_rate_zero_no_caption_names_any_content():
    _, captions = mixture(0.0)
    words = class_words()
    assert not [c for c in captions if any(w in c for w in words) or any(ch.isdigit() for ch in c)]
    assert len(set(captions)) < 30  # a handful of plain phrasings per source


def test_at_rate_one_every_mnist_caption_names_its_digit():
    _, captions = mixture(1.0)
    labels = sources.mnist(0)["train"].labels
    for caption, y in zip(captions[: len(labels)], labels):
        assert str(y) in caption or sources.DIGIT_WORDS[y] in caption, caption


def test_the_content_is_named_at_about_the_chosen_rate():
    _, captions = mixture(0.3)
    plain = {p + "." for group in (pretraining.DIGIT_PLAIN, pretraining.PIXEL_PLAIN, pretraining.TEXTURE_PLAIN, pretraining.PHOTO_PLAIN,
                                   pretraining.FACE_PLAIN, pretraining.LETTER_PLAIN, pretraining.SHAPE_PLAIN, pretraining.CHART_PLAIN)
             for p in group}
    named = np.mean([c not in plain for c in captions])
    assert 0.27 < named < 0.33, named


def test_no_caption_repeats_an_evaluation_prompt():
    _, captions = mixture(1.0)
    text = "\n".join(captions)
    for name, spec in TASKS.items():
        for template in spec.templates:
            for part in template.split("{}"):
                part = part.strip(" .")
                if len(part) > 6:  # "a", "a photo of a" ...: the distinctive phrasing only
                    assert part not in text, f"{name}'s prompt {template!r} appears in a caption"


def test_same_seed_same_captions_and_a_bad_rate_is_refused():
    assert mixture(0.3)[1] == mixture(0.3)[1] and mixture(0.3)[1] != mixture(0.3, seed=1)[1]
    with pytest.raises(ValueError, match="name_rate"):
        mixture(1.5)
