"""Training augmentation (albumentations), the same family of transforms for both classes.

The reference script augmented only positive images, which lets a model learn that "rotated or
flipped means cancer". Here every transform is applied to both classes with the same probability;
``positive_strength`` > 1 only raises, for positives, the probability of the same transforms
(never a transform that only positives see); the vertical flip stays at 0.5 for both classes, since
a class-dependent flip rate would itself be a label shortcut. Images arrive oriented with the chest wall on the
left (``imaging.orient``), so horizontal flips are excluded: they would undo that convention.
Validation and test data are never augmented.
"""

from __future__ import annotations

import os
import random
import zlib

# albumentations asks PyPI for a newer release on every import, synchronously, with a 2 s timeout: every process
# that imports this module (the driver, each trial actor, Train worker and Ray Data worker) would contact pypi.org,
# and on a cluster without internet access could wait the whole timeout (2.0 s per import measured behind a proxy
# that never answers). A user who wants the check sets NO_ALBUMENTATIONS_UPDATE=0.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import albumentations as A  # noqa: E402
import numpy as np  # noqa: E402

# Probability of each transform for a negative image; positives get p * positive_strength (capped).
BASE_PROBABILITIES = {
    "vertical_flip": 0.5,
    "affine": 0.5,
    "grid_distortion": 0.2,
    "brightness_contrast": 0.5,
    "gamma": 0.3,
    "noise": 0.2,
}


def build_transform(positive_strength: float = 1.0, positive: bool = False) -> A.Compose:
    """The augmentation pipeline for one class; both classes share the same transforms."""
    scale = positive_strength if positive else 1.0

    def p(name: str) -> float:
        # The flip keeps p = 0.5 for both classes: any other rate for one class only would make image
        # orientation predictive of the label, the very shortcut this module exists to prevent.
        if name == "vertical_flip":
            return BASE_PROBABILITIES[name]
        return min(1.0, BASE_PROBABILITIES[name] * scale)

    return A.Compose(
        [
            A.VerticalFlip(p=p("vertical_flip")),
            A.Affine(
                scale=(0.9, 1.1),
                rotate=(-10, 10),
                translate_percent=(-0.04, 0.04),
                border_mode=0,
                fill=0,
                p=p("affine"),
            ),
            A.GridDistortion(num_steps=5, distort_limit=0.1, border_mode=0, p=p("grid_distortion")),
            A.RandomBrightnessContrast(brightness_limit=0.1, contrast_limit=0.1, p=p("brightness_contrast")),
            A.RandomGamma(gamma_limit=(85, 115), p=p("gamma")),
            A.GaussNoise(std_range=(0.005, 0.02), p=p("noise")),
        ]
    )


def transform_names(transform: A.Compose) -> list[str]:
    return [type(t).__name__ for t in transform.transforms]


def row_seed(seed: int, image_id: str, salt: int = 0) -> int:
    """A reproducible per-image seed; ``salt`` (the row's position in its pass) varies it between occurrences."""
    return (zlib.crc32(str(image_id).encode()) ^ (seed * 1_000_003) ^ (salt * 7_919)) & 0x7FFFFFFF


def augment_images(
    images: np.ndarray,
    labels: np.ndarray,
    seeds: np.ndarray,
    positive_strength: float = 1.0,
) -> np.ndarray:
    """Augment a batch of float32 images (N, H, W) in [0, 1], each with its own seed."""
    negative = build_transform(positive_strength, positive=False)
    positive = build_transform(positive_strength, positive=True)
    out = np.empty_like(images)
    for i in range(len(images)):
        transform = positive if labels[i] == 1 else negative
        # One generator shared by all transforms of the pipeline: set_random_seed would seed each transform
        # with the same value, so their "apply?" draws would coincide and fire together or not at all.
        seed = int(seeds[i])
        transform.set_random_state(np.random.default_rng(seed), random.Random(seed))
        out[i] = transform(image=images[i])["image"]
    return np.clip(out, 0.0, 1.0, out=out)
