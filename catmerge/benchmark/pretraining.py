"""The pretraining mixture: training-split images of every packaged source, with captions.

It depends only on the sources, never on the task list, so adding a task leaves theta_0 alone.
Three kinds of captions (`pretrain.captions`):
  source            each caption names the image source only ("a handwritten digit."), never a label;
  source_and_digit  as source, and MNIST captions also name the digit;
  web               web-like: a caption names the content (the digit, the picture, the shape ...)
                    only with probability `name_rate`, and then in its own words, never in the
                    evaluation prompts' phrasing; otherwise it says something about the image's
                    look or origin. The mixture is every source, the rendered letters, shapes and charts too.
"""

from __future__ import annotations

import numpy as np

from .sources import (
    COLOURS,
    DIGIT_WORDS,
    charts,
    letters,
    lfw_faces,
    mnist,
    photos,
    shapes,
    sklearn_digits,
    textures,
    tint,
)


# Pretraining captions are generic: they name the image source (and, with
# captions="source_and_digit", the digit of MNIST images), never the labels of the rotation /
# colour / parity / texture / photo / face tasks.
def pretraining_mixture(seed: int, rng: np.random.Generator, captions_kind: str = "source",
                        name_rate: float = 0.3) -> tuple[np.ndarray, list[str]]:
    """Training-split images of every source with a caption each."""
    if captions_kind == "web":
        return web_mixture(seed, rng, name_rate)
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


# ---- web-like captions --------------------------------------------------------------------------
# Per source: phrasings that name the content ({name}: a word for the class, {numeral}: a digit's
# numeral) and phrasings that do not. None repeats an evaluation template of catmerge/benchmark/tasks.py.
DIGIT_NAMING = ["someone wrote a {numeral} by hand", "handwriting that says {name}", "a scribbled {numeral}",
                "{name}, written in pen", "a hand-drawn {numeral} on a note"]
DIGIT_PLAIN = ["a scan of handwriting", "a scanned scribble", "pen strokes on a note", "a black and white scan"]
PIXEL_NAMING = ["a pixelated {numeral}", "{name} in eight by eight pixels", "a blocky {numeral} from an old scanner"]
PIXEL_PLAIN = ["a very low resolution scan", "a blocky pixelated image", "an enlarged thumbnail"]
TEXTURE_NAMING = ["{name} up close", "a patch of {name}", "detail of {name} in black and white"]
TEXTURE_PLAIN = ["a grayscale close-up", "a black and white detail shot", "an old monochrome picture"]
PHOTO_NAMING = ["part of a picture showing a {name}", "{name}, cropped tight", "zoomed in on a {name}"]
PHOTO_PLAIN = ["a cropped colour photo", "a detail from a larger photo", "a colourful snippet of an image"]
FACE_NAMING = {"face": ["someone's face", "a portrait of a person", "a headshot"],
               "background scene": ["some scenery with nobody in it", "a view without people", "an empty backdrop"]}
FACE_PLAIN = ["a tiny grayscale photo", "a low quality thumbnail", "a small monochrome snapshot"]
LETTER_NAMING = ["an {name} in some typeface", "the character {name}", "{name}, typed large"]
LETTER_PLAIN = ["a bit of typography", "a coloured tile with a character on it", "a glyph on a plain background"]
SHAPE_NAMING = ["a {name} icon", "a {name} in flat colour", "clip art of a {name}"]
SHAPE_PLAIN = ["a flat geometric drawing", "a clip-art icon", "a simple coloured figure"]
CHART_NAMING = ["a {name} of some data", "some numbers drawn as a {name}", "{name} made with plotting software"]
CHART_PLAIN = ["a small figure", "an illustration from a document", "a tiny graphic with a white background"]


def _caption(rng: np.random.Generator, name_rate: float, naming: list[str], plain: list[str], **words: str) -> str:
    if rng.random() < name_rate:
        return naming[int(rng.integers(len(naming)))].format(**words) + "."
    return plain[int(rng.integers(len(plain)))] + "."


def web_mixture(seed: int, rng: np.random.Generator, name_rate: float) -> tuple[np.ndarray, list[str]]:
    """Every source's training split (MNIST also rotated or tinted, a quarter each), each image with
    one web-like caption: its content named with probability `name_rate`."""
    from .sources import CHARTS, LETTERS, PHOTO_IMAGES, SHAPES, TEXTURE_IMAGES

    if not 0 <= name_rate <= 1:
        raise ValueError(f"pretrain.name_rate must be in [0, 1], got {name_rate}")
    images: list[np.ndarray] = []
    captions: list[str] = []
    palette = list(COLOURS.values())
    digits = mnist(seed)["train"]
    for im, y in zip(digits.images, digits.labels):
        u = rng.random()
        if u < 0.25:
            im = np.ascontiguousarray(np.rot90(im, int(rng.integers(1, 4)), axes=(0, 1)))
        elif u < 0.5:
            im = tint(im, palette[int(rng.integers(len(palette)))])
        images.append(im)
        captions.append(_caption(rng, name_rate, DIGIT_NAMING, DIGIT_PLAIN, name=DIGIT_WORDS[y], numeral=str(y)))
    sources = [
        (sklearn_digits(seed)["train"], DIGIT_WORDS, PIXEL_NAMING, PIXEL_PLAIN),
        (textures(seed)["train"], list(TEXTURE_IMAGES), TEXTURE_NAMING, TEXTURE_PLAIN),
        (photos(seed)["train"], list(PHOTO_IMAGES), PHOTO_NAMING, PHOTO_PLAIN),
        (letters(seed)["train"], LETTERS, LETTER_NAMING, LETTER_PLAIN),
        (shapes(seed)["train"], SHAPES, SHAPE_NAMING, SHAPE_PLAIN),
        (charts(seed)["train"], CHARTS, CHART_NAMING, CHART_PLAIN),
    ]
    for pool, names, naming, plain in sources:
        for im, y in zip(pool.images, pool.labels):
            images.append(im)
            captions.append(_caption(rng, name_rate, naming, plain, name=names[y], numeral=str(y)))
    faces = lfw_faces(seed)["train"]
    for im, y in zip(faces.images, faces.labels):
        images.append(im)
        captions.append(_caption(rng, name_rate, FACE_NAMING[["face", "background scene"][y]], FACE_PLAIN))
    return np.stack(images), captions
