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


def _cc(n: int) -> list[str]:
    """Views for ``n`` CC images: the whole pipeline, vertical flip included, may fire."""
    return ["CC"] * n


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
    first = augment.augment_images(images, labels, seeds, strength, views=_cc(4))
    second = augment.augment_images(images, labels, seeds, strength, views=_cc(4))
    np.testing.assert_array_equal(first, second)
    assert first.shape == images.shape
    assert first.dtype == np.float32
    assert first.min() >= 0.0 and first.max() <= 1.0


def test_augment_images_does_not_modify_its_input() -> None:
    images = _batch(3)
    before = images.copy()
    augment.augment_images(images, np.array([0, 1, 1]), np.array([1, 2, 3]), 2.0, views=_cc(3))
    np.testing.assert_array_equal(images, before)


def test_different_seeds_change_images() -> None:
    images = np.repeat(_batch(1), 8, axis=0)
    labels = np.zeros(8, dtype=np.int64)
    first = augment.augment_images(images, labels, np.arange(8), views=_cc(8))
    second = augment.augment_images(images, labels, np.arange(100, 108), views=_cc(8))
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
    out = augment.augment_images(images, np.full(n, label), np.arange(n) * 7919 + 1, views=_cc(n))
    unchanged = sum(np.array_equal(a, b) for a, b in zip(out, images, strict=True))
    assert unchanged <= 15, (
        f"BUG augment.augment_images: {unchanged}/{n} images left unchanged (expected about 6): the transforms' random "
        "draws are correlated because every transform is seeded with the same seed"
    )


def test_labels_select_the_pipeline() -> None:
    # With strength 3 a positive always gets the affine; a negative with the same seed may not.
    images = np.repeat(_batch(1), 16, axis=0)
    seeds = np.arange(16)
    as_positive = augment.augment_images(images, np.ones(16, dtype=np.int64), seeds, 3.0, views=_cc(16))
    as_negative = augment.augment_images(images, np.zeros(16, dtype=np.int64), seeds, 3.0, views=_cc(16))
    assert not np.array_equal(as_positive, as_negative)
    assert all(not np.array_equal(a, b) for a, b in zip(as_positive, images, strict=True))


@pytest.mark.parametrize("view", ["CC", "MLO"])
@pytest.mark.parametrize("label", [0, 1])
@pytest.mark.parametrize("strength", [1.0, 3.0])
def test_chest_wall_stays_left(label: int, strength: float, view: str) -> None:
    n, height, width = 60, 48, 32
    images = np.full((n, height, width), 0.15, dtype=np.float32)
    images[:, :, : width // 2] = 0.8  # the breast, chest wall on the left
    out = augment.augment_images(images, np.full(n, label), np.arange(n) * 104729 + 3, strength, views=[view] * n)
    differences = out[:, :, : width // 2].mean(axis=(1, 2)) - out[:, :, width // 2 :].mean(axis=(1, 2))
    assert differences.mean() > 0.4
    # A horizontal flip at any probability would put the bright half on the right in some draws.
    assert (differences > 0).all(), f"left half darker than the right for seeds {np.flatnonzero(differences <= 0)}"


# (view as the manifest may hold it, whether a vertical flip is anatomically possible). CC-family views show the
# breast from above (vertical axis lateral-medial): a flip mirrors them. MLO and the lateral and oblique views run
# superior-inferior: a flip puts the pectoral muscle at the bottom. Unknown views are not flipped.
FLIP_CASES = [
    ("CC", True),
    ("cc", True),
    (" CC ", True),
    ("XCCL", True),
    ("XCCM", True),
    ("FB", True),
    ("MLO", False),
    ("mlo", False),
    ("ML", False),
    ("LM", False),
    ("LMO", False),
    ("SIO", False),
    ("AT", False),
    ("RL", False),
    ("TAN", False),
    ("U", False),
    ("", False),
    (None, False),
    (float("nan"), False),
]


def _pectoral_images(n: int, shape: tuple[int, int] = (48, 32)) -> np.ndarray:
    """Images with a bright wedge in the top quarter at the chest wall, where an MLO's pectoral muscle sits."""
    images = np.full((n, *shape), 0.15, dtype=np.float32)
    images[:, :, : shape[1] // 2] = 0.45  # the breast, chest wall on the left
    images[:, : shape[0] // 4, : shape[1] // 3] = 0.95  # the "pectoral muscle"
    return images


def _upside_down(out: np.ndarray) -> np.ndarray:
    """Which augmented :func:`_pectoral_images` have their bright wedge in the bottom half (flipped vertically).
    The affine (at most 10 degrees, 4% shift, 10% scale) and the grid distortion cannot move it there."""
    half = out.shape[1] // 2
    return out[:, half:].mean(axis=(1, 2)) > out[:, :half].mean(axis=(1, 2))


def _flip_seeds(n: int) -> np.ndarray:
    return np.array([augment.row_seed(0, f"img{i}", i) for i in range(n)])


@pytest.mark.parametrize(("view", "flips"), FLIP_CASES)
def test_flips_vertically_by_view(view, flips: bool) -> None:
    assert augment.flips_vertically(view) is flips


@pytest.mark.parametrize("label", [0, 1])
@pytest.mark.parametrize(("view", "flips"), FLIP_CASES)
def test_vertical_flip_follows_the_view(view, flips: bool, label: int) -> None:
    n = 120
    images = _pectoral_images(n)
    assert not _upside_down(images).any()
    out = augment.augment_images(images, np.full(n, label), _flip_seeds(n), views=[view] * n)
    flipped = int(_upside_down(out).sum())
    if flips:
        assert 0.35 * n <= flipped <= 0.65 * n, f"view {view!r}: {flipped}/{n} flipped, expected about half"
    else:
        assert flipped == 0, (
            f"BUG augment.augment_images: {flipped}/{n} images of view {view!r} (label {label}) flipped vertically: "
            "the pectoral muscle ends up at the bottom, which no real mammogram shows"
        )


@pytest.mark.parametrize("view", ["CC", "XCCL"])
@pytest.mark.parametrize("strength", [1.0, 2.0, 3.0])
def test_flip_rate_of_a_view_does_not_depend_on_the_class(view: str, strength: float) -> None:
    n = 200
    images = _pectoral_images(n)
    rates = {
        label: _upside_down(
            augment.augment_images(images, np.full(n, label), _flip_seeds(n), strength, views=[view] * n)
        ).mean()
        for label in (0, 1)
    }
    assert 0.4 <= rates[0] <= 0.6 and 0.4 <= rates[1] <= 0.6, rates
    assert abs(rates[0] - rates[1]) <= 0.05, f"flip rate by class {rates}: orientation would predict the label"


def test_views_are_chosen_row_by_row() -> None:
    """A batch mixes views: each row is flipped (or not) by its own view and seed, as it would be alone."""
    views = ["CC", "MLO", "U", None, "ML", "XCCL"] * 20
    n = len(views)
    images = _pectoral_images(n)
    labels = np.arange(n) % 2
    seeds = _flip_seeds(n)
    out = augment.augment_images(images, labels, seeds, 2.0, views=views)
    flipped = _upside_down(out)
    may_flip = np.array([augment.flips_vertically(v) for v in views])
    assert not flipped[~may_flip].any(), f"rows {np.flatnonzero(flipped & ~may_flip)} flipped but not CC-family"
    assert 0.35 <= flipped[may_flip].mean() <= 0.65
    for i in (0, 1, 2, 3, 5, 17):
        alone = augment.augment_images(
            images[i : i + 1], labels[i : i + 1], seeds[i : i + 1], 2.0, views=views[i : i + 1]
        )
        np.testing.assert_array_equal(alone[0], out[i], err_msg=f"row {i} ({views[i]!r}) depends on its batch")


@pytest.mark.parametrize("view", ["CC", "MLO", "U"])
@pytest.mark.parametrize("label", [0, 1])
def test_view_aware_augmentation_is_reproducible(view: str, label: int) -> None:
    n = 24
    images = _pectoral_images(n)
    seeds = _flip_seeds(n)
    first = augment.augment_images(images, np.full(n, label), seeds, views=[view] * n)
    second = augment.augment_images(images, np.full(n, label), seeds, views=np.array([view] * n, dtype=object))
    np.testing.assert_array_equal(first, second)
    other = augment.augment_images(images, np.full(n, label), seeds + 1, views=[view] * n)
    assert not np.array_equal(first, other)


def test_views_must_match_the_images() -> None:
    images = _batch(3)
    with pytest.raises(ValueError, match="2 views for 3 images"):
        augment.augment_images(images, np.zeros(3), np.arange(3), views=["CC", "MLO"])
    with pytest.raises(TypeError, match="views"):
        augment.augment_images(images, np.zeros(3), np.arange(3))  # a caller must say which views it augments


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
