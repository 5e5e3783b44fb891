"""The pretraining mixture: training-split images of every packaged source, with generic captions.

It depends only on the sources, never on the task list, so adding a task leaves theta_0 alone.
"""

from __future__ import annotations

import numpy as np

from .sources import COLOURS, DIGIT_WORDS, lfw_faces, mnist, photos, sklearn_digits, textures, tint


# Pretraining captions are generic: they name the image source (and, with
# captions="source_and_digit", the digit of MNIST images), never the labels of the rotation /
# colour / parity / texture / photo / face tasks.
def pretraining_mixture(seed: int, rng: np.random.Generator, captions_kind: str = "source") -> tuple[np.ndarray, list[str]]:
    """Training-split images of every source with a generic caption each."""
    images: list[np.ndarray] = []
    captions: list[str] = []
    digits = mnist(seed)["train"]
    palette = list(COLOURS.values())
    for im, y in zip(digits.images, digits.labels):
        u = rng.random()
        if u < 0.25:
            im = np.ascontiguousarray(np.rot90(im, int(rng.integers(1, 4)), axes=(0, 1)))
        elif u < 0.5:
            im = tint(im, palette[int(rng.integers(len(palette)))])
        images.append(im)
        captions.append(f"a handwritten digit {DIGIT_WORDS[y]}." if captions_kind == "source_and_digit" else "a handwritten digit.")
    generic = [
        (sklearn_digits(seed)["train"], "a tiny blurry scan of a digit."),
        (textures(seed)["train"], "a grayscale photo."),
        (photos(seed)["train"], "a crop of a colour photo."),
        (lfw_faces(seed)["train"], "a small grayscale picture."),
    ]
    for pool, caption in generic:
        images.extend(pool.images)
        captions.extend([caption] * len(pool.labels))
    return np.stack(images), captions
