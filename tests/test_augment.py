"""Tests for mammo_ray.augment: one transform family for both classes, reproducibility, and no orientation shortcut."""

from __future__ import annotations

import numpy as np
import pytest

from mammo_ray import augment

STRENGTHS = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0]
# Transforms that would change which side the chest wall is on (imaging.orient puts it on the left).
LEFT_RIGHT_TRANSFORMS = {"HorizontalFlip", "Transpose", "RandomRotate90", "D4", "SquareSymmetry"}


def _probabilities(strength: float, positive: bool) -> dict[str, float]:
    transform = augment.build_transform(strength, positive=positive)
    return {type(t).__name__: t.p for t in transform.transforms}


def _batch(n: int = 4, shape: tuple[int, int] = (48, 40), seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    images = rng.uniform(0.1, 0.9, size=(n, *shape)).astype(np.float32)
    images[:, : shape[0] // 3, : shape[1] // 2] = 0.95  # some structure, so geometric transforms show
    return images


@pytest.mark.parametrize("strength", STRENGTHS)
def test_both_classes_get_the_same_transforms(strength: float) -> None:
    negative = augment.transform_names(augment.build_transform(strength, positive=False))
    positive = augment.transform_names(augment.build_transform(strength, positive=True))
    assert positive == negative, "a transform only positives see is the reference's shortcut"
    assert len(negative) == len(augment.BASE_PROBABILITIES)


@pytest.mark.parametrize("strength", STRENGTHS)
def test_negatives_ignore_the_strength(strength: float) -> None:
    assert _probabilities(strength, positive=False) == _probabilities(1.0, positive=False)


def test_strength_one_gives_identical_probabilities() -> None:
    assert _probabilities(1.0, positive=True) == _probabilities(1.0, positive=False)


@pytest.mark.parametrize("strength", [1.0, 1.2, 1.5, 2.0, 3.0])
def test_stronger_positive_probabilities_are_at_least_the_negatives(strength: float) -> None:
    positive, negative = _probabilities(strength, True), _probabilities(strength, False)
    for name, p in negative.items():
        assert negative[name] <= positive[name] <= 1.0, name
        if name != "VerticalFlip":  # see test_flip_rate_does_not_depend_on_the_class
            assert positive[name] == pytest.approx(min(1.0, p * strength)), name


@pytest.mark.parametrize("strength", STRENGTHS)
def test_no_transform_moves_the_chest_wall(strength: float) -> None:
    for positive in (False, True):
        names = set(augment.transform_names(augment.build_transform(strength, positive=positive)))
        assert not names & LEFT_RIGHT_TRANSFORMS


@pytest.mark.parametrize("strength", [1.5, 2.0, 3.0])
def test_flip_rate_does_not_depend_on_the_class(strength: float) -> None:
    # A flip is its own inverse: only p = 0.5 leaves the output orientation independent of the input's. Scaling the
    # flip probability for positives (strength 2 flips every positive, half of the negatives) makes "flipped" predict
    # cancer, the orientation shortcut DESIGN.md forbids.
    positive, negative = _probabilities(strength, True), _probabilities(strength, False)
    assert positive["VerticalFlip"] == negative["VerticalFlip"], (
        f"BUG augment.build_transform: with positive_strength={strength} positives are flipped with "
        f"p={positive['VerticalFlip']}, negatives with p={negative['VerticalFlip']}: orientation predicts the label"
    )


@pytest.mark.parametrize("strength", [1.0, 2.0])
@pytest.mark.parametrize("shape", [(16, 16), (48, 40), (64, 32)])
def test_augment_images_is_reproducible_and_keeps_shape_dtype_range(strength: float, shape: tuple[int, int]) -> None:
    images = _batch(4, shape)
    labels = np.array([0, 1, 0, 1])
    seeds = np.array([11, 12, 13, 14])
    first = augment.augment_images(images, labels, seeds, strength)
    second = augment.augment_images(images, labels, seeds, strength)
    np.testing.assert_array_equal(first, second)
    assert first.shape == images.shape
    assert first.dtype == np.float32
    assert first.min() >= 0.0 and first.max() <= 1.0


def test_augment_images_does_not_modify_its_input() -> None:
    images = _batch(3)
    before = images.copy()
    augment.augment_images(images, np.array([0, 1, 1]), np.array([1, 2, 3]), 2.0)
    np.testing.assert_array_equal(images, before)


def test_different_seeds_change_images() -> None:
    images = np.repeat(_batch(1), 8, axis=0)
    labels = np.zeros(8, dtype=np.int64)
    first = augment.augment_images(images, labels, np.arange(8))
    second = augment.augment_images(images, labels, np.arange(100, 108))
    changed = [not np.allclose(a, b) for a, b in zip(first, second, strict=True)]
    assert sum(changed) >= 4, f"different seeds should give different augmentations, changed: {changed}"
    # Within one call, identical images with different seeds differ as well.
    assert len({first[i].tobytes() for i in range(8)}) >= 4


@pytest.mark.parametrize("label", [0, 1])
def test_transforms_fire_independently(label: int) -> None:
    # Negatives: P(no transform fires) = 0.5 × 0.5 × 0.8 × 0.5 × 0.7 × 0.8 ≈ 0.056, so about 6 of 100 images come out
    # unchanged (positives at strength 1 alike). Compose.set_random_seed (albumentations 2.0) seeds every child
    # transform with the same seed, so all "apply?" draws are the same number: half the images get no augmentation.
    n = 100
    images = np.repeat(_batch(1, (24, 20)), n, axis=0)
    out = augment.augment_images(images, np.full(n, label), np.arange(n) * 7919 + 1)
    unchanged = sum(np.array_equal(a, b) for a, b in zip(out, images, strict=True))
    assert unchanged <= 15, (
        f"BUG augment.augment_images: {unchanged}/{n} images left unchanged (expected about 6): the transforms' random "
        "draws are correlated because every transform is seeded with the same seed"
    )


def test_labels_select_the_pipeline() -> None:
    # With strength 3 a positive always gets the affine and the flip; a negative with the same seed may not.
    images = np.repeat(_batch(1), 16, axis=0)
    seeds = np.arange(16)
    as_positive = augment.augment_images(images, np.ones(16, dtype=np.int64), seeds, 3.0)
    as_negative = augment.augment_images(images, np.zeros(16, dtype=np.int64), seeds, 3.0)
    assert not np.array_equal(as_positive, as_negative)
    assert all(not np.array_equal(a, b) for a, b in zip(as_positive, images, strict=True))


@pytest.mark.parametrize("label", [0, 1])
@pytest.mark.parametrize("strength", [1.0, 3.0])
def test_chest_wall_stays_left(label: int, strength: float) -> None:
    n, height, width = 60, 48, 32
    images = np.full((n, height, width), 0.15, dtype=np.float32)
    images[:, :, : width // 2] = 0.8  # the breast, chest wall on the left
    out = augment.augment_images(images, np.full(n, label), np.arange(n) * 104729 + 3, strength)
    differences = out[:, :, : width // 2].mean(axis=(1, 2)) - out[:, :, width // 2 :].mean(axis=(1, 2))
    assert differences.mean() > 0.4
    # A horizontal flip at any probability would put the bright half on the right in some draws.
    assert (differences > 0).all(), f"left half darker than the right for seeds {np.flatnonzero(differences <= 0)}"


@pytest.mark.parametrize(
    ("seed", "image_id", "salt"), [(0, "a", 0), (1, "a", 0), (0, "b", 0), (0, "a", 1), (2**31, "x" * 200, 2**40)]
)
def test_row_seed_is_a_valid_stable_seed(seed: int, image_id: str, salt: int) -> None:
    value = augment.row_seed(seed, image_id, salt)
    assert value == augment.row_seed(seed, image_id, salt)
    assert 0 <= value < 2**31


def test_row_seed_varies() -> None:
    seeds = {augment.row_seed(s, i, salt) for s in range(3) for i in ("a", "b", "c") for salt in range(3)}
    assert len(seeds) == 27


PROBE = """
import urllib.request
calls = []
def refuse(self, url, *args, **kwargs):
    calls.append(getattr(url, "full_url", url))
    raise OSError("no network in this test")
urllib.request.OpenerDirector.open = refuse
import mammo_ray.augment
print(calls)
"""


@pytest.mark.parametrize(
    ("setting", "expected"), [(None, "[]"), ("0", "['https://pypi.org/pypi/albumentations/json']")]
)
def test_importing_augment_does_not_ask_pypi_for_updates(setting, expected) -> None:
    """albumentations checks PyPI on import (2 s timeout) unless told not to; each Ray worker process imports it."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "NO_ALBUMENTATIONS_UPDATE"}
    if setting is not None:
        env["NO_ALBUMENTATIONS_UPDATE"] = setting  # the user's own choice wins
    proc = subprocess.run(
        [sys.executable, "-W", "ignore", "-c", PROBE], env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == expected
