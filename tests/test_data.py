"""Task splits: HF parquet with Image and ClassLabel features, and the packaged sources."""

from __future__ import annotations

import datasets
import numpy as np
import pytest

from catmerge.benchmark import sources
from catmerge.benchmark.tasks import TASKS, get_task
from catmerge.data import read_split, write_split
from catmerge.io import ArtifactError


def test_split_round_trip_keeps_pixels_labels_and_features(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(7, 32, 32, 3), dtype=np.uint8)
    labels = np.array([0, 1, 2, 0, 1, 2, 0])
    path = tmp_path / "train.parquet"
    write_split(images, labels, ["a", "b", "c"], path)

    ds = datasets.Dataset.from_parquet(str(path), cache_dir=str(tmp_path / "cache"))
    assert isinstance(ds.features["image"], datasets.Image)
    assert ds.features["label"].names == ["a", "b", "c"]

    split = read_split(path)
    assert split.class_names == ["a", "b", "c"]
    assert np.array_equal(split.images.numpy(), images)
    assert split.labels.tolist() == labels.tolist()


def test_labels_out_of_range_are_refused(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "bad.parquet"
    write_split(np.zeros((2, 32, 32, 3), np.uint8), np.array([0, 1]), ["a", "b"], path)
    table = pq.read_table(path)
    table = table.set_column(1, "label", pa.array([0, 5], type=pa.int64()))
    pq.write_table(table.replace_schema_metadata(pq.read_table(path).schema.metadata), path)
    with pytest.raises(ArtifactError, match=r"bad.parquet: labels outside 0..1"):
        read_split(path)


def clear_source_caches():
    """Every source but charts: they take 30 s to draw, so the tests below share one build (their
    determinism is test_charts_draw_the_same_chart_from_the_same_random_state's)."""
    for fn in (sources.mnist, sources.sklearn_digits, sources.lfw_faces, sources.textures, sources.photos,
               sources.letters, sources.shapes):
        fn.cache_clear()


def test_every_task_is_deterministic_and_large_enough():
    first = {name: spec.build(0) for name, spec in TASKS.items()}
    clear_source_caches()  # rebuild from the packages, not from the cache: once, so each source is drawn twice in all
    for name, spec in TASKS.items():
        a = first[name]
        b = spec.build(0) if name != "charts" else None  # charts: drawn once, see clear_source_caches
        assert set(a) == {"train", "val", "test"}
        for split in a:
            if b is not None:
                assert np.array_equal(a[split].images, b[split].images), name
                assert np.array_equal(a[split].labels, b[split].labels), name
            assert a[split].images.shape[1:] == (32, 32, 3) and a[split].images.dtype == np.uint8
            assert a[split].labels.max() < len(spec.class_names)
        assert len(a["test"].labels) >= 100, f"{name}: one test image must be well under 1 point"
        assert len(np.unique(a["test"].labels)) == len(spec.class_names)


def test_mnist_tasks_share_images_with_conflicting_labels():
    digits = get_task("mnist").build(0)["test"]
    parity = get_task("mnist_parity").build(0)["test"]
    assert np.array_equal(digits.images, parity.images)
    assert not np.array_equal(digits.labels, parity.labels)
    rotation = get_task("mnist_rotation").build(0)["test"]
    upright = rotation.labels == 0
    assert np.array_equal(rotation.images[upright], digits.images[upright])


def test_no_test_image_appears_in_train():
    for name in ("mnist", "digits", "faces", "letters", "shapes", "charts"):
        pools = get_task(name).build(0)
        train = {im.tobytes() for im in pools["train"].images}
        assert not any(im.tobytes() in train for im in pools["test"].images), name


def test_picture_patches_come_from_disjoint_bands():
    """Train / val / test patches never overlap: each comes from its own band of the picture."""
    rows = np.repeat(np.arange(200, dtype=np.uint8)[:, None], 64, axis=1)  # pixel value = row index
    pools = sources._patches_from_regions([rows], 32, {"train": 50, "val": 20, "test": 20}, np.random.default_rng(0))
    ranges = {s: (int(p.images.min()), int(p.images.max())) for s, p in pools.items()}
    assert ranges["train"][1] < ranges["val"][0] <= ranges["val"][1] < ranges["test"][0], ranges
    assert ranges["test"][1] <= 199


def test_seeds_change_the_split():
    assert not np.array_equal(get_task("digits").build(0)["test"].labels, get_task("digits").build(1)["test"].labels)


def test_unknown_task_lists_known_ones():
    with pytest.raises(ValueError, match="known builtin tasks: mnist, mnist_rotation"):
        get_task("svhn")


def test_rendered_tasks_are_balanced_varied_and_their_own_images():
    for name, per_class in (("letters", sources.RENDERED_PER_CLASS), ("shapes", sources.RENDERED_PER_CLASS),
                            ("charts", sources.CHARTS_PER_CLASS)):
        spec = get_task(name)
        pools = spec.build(0)
        for split, share in zip(("train", "val", "test"), sources.SPLIT_FRACTIONS):
            counts = np.bincount(pools[split].labels, minlength=len(spec.class_names))
            assert (counts == round(share * per_class)).all(), (name, split, counts)
        images = pools["train"].images
        assert len({im.tobytes() for im in images}) == len(images), f"{name}: two renders came out identical"
        per_image_colour = images.reshape(len(images), -1, 3).mean(axis=1)
        assert per_image_colour.std(axis=0).min() > 20, f"{name}: colours hardly vary"
        assert spec.image_pool not in {other.image_pool for other_name, other in TASKS.items() if other_name != name}
    letters = get_task("letters").build(0)["train"]
    a, d = letters.images[letters.labels == 0], letters.images[letters.labels == 2]
    assert np.abs(a.astype(float).mean(0) - d.astype(float).mean(0)).max() < 60  # classes differ in shape, not colour


def test_charts_draw_the_same_chart_from_the_same_random_state():
    for label in range(len(sources.CHARTS)):
        first = sources._chart(label, np.random.default_rng([0, label]))
        again = sources._chart(label, np.random.default_rng([0, label]))
        assert np.array_equal(first, again) and first.shape == (32, 32, 3) and first.dtype == np.uint8
        assert first.std() > 10, sources.CHARTS[label]  # something was drawn
