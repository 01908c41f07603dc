"""Training augmentation (albumentations), the same family of transforms for both classes.

The reference script augmented only positive images, which lets a model learn that "rotated or
flipped means cancer". Here every transform is applied to both classes with the same probability;
``positive_strength`` > 1 only raises, for positives, the probability of the same transforms
(never a transform that only positives see); the vertical flip stays at 0.5 for both classes, since
a class-dependent flip rate would itself be a label shortcut. Images arrive oriented with the chest wall on the
left (``imaging.orient``), so horizontal flips are excluded: they would undo that convention.

The vertical flip depends on the view (the manifest's ``view`` column), because only some views stay anatomically
possible upside down. A cranio-caudal image (CC, and the CC-family views in :data:`VERTICAL_FLIP_VIEWS`) shows the
breast from above: its vertical axis runs lateral to medial, so a flip keeps every structure where anatomy allows it
(chest wall on the left, nipple on the right, no pectoral muscle or axilla moved into the breast), though in an
orientation the data never show: by convention a CC is displayed lateral side up, and the flip puts it down (the
other breast's CC, rotated 180°). It is kept as augmentation for that reason, as the rotations are. In MLO, ML, LM
and the other oblique and lateral views the vertical axis runs superior to inferior: a
flip would put the pectoral muscle and the axilla at the bottom, which no real mammogram shows. Those views, and
any view that is blank, unknown ("U") or not listed, are never flipped. A CC-family image is flipped with
probability 0.5 whatever its class, so a flip says nothing about the label once the view (visible in the image) is
known.

Validation and test data are never augmented.
"""

from __future__ import annotations

import os
import random
import zlib
from collections.abc import Sequence

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

# Views that a vertical flip leaves anatomically possible: cranio-caudal projections (CC, exaggerated CC lateral and
# medial, and the caudo-cranial "from below"), whose vertical axis runs lateral-medial. Everything else is never
# flipped: MLO, ML, LM, LMO, SIO and AT run superior-inferior (a flip puts the pectoral muscle at the bottom), and for
# rolled (RL, RM), tangential, cleavage or unknown views the projection is not known to be a CC one.
VERTICAL_FLIP_VIEWS = frozenset({"CC", "XCCL", "XCCM", "FB"})


def flips_vertically(view: object) -> bool:
    """Whether an image of ``view`` (a manifest ``view`` value) may be flipped vertically; blank or unknown: no."""
    if not isinstance(view, str):  # None, NaN, pandas NA: the view is unknown
        return False
    return view.strip().upper().replace(" ", "") in VERTICAL_FLIP_VIEWS


def build_transform(positive_strength: float = 1.0, positive: bool = False, vertical_flip: bool = True) -> A.Compose:
    """The augmentation pipeline for one class and view family; both classes share the same transforms.

    Args:
        vertical_flip: whether the image's view allows a vertical flip (:func:`flips_vertically`); when it does
            not, the flip stays in the pipeline with probability 0, so every pipeline lists the same transforms.
    """
    scale = positive_strength if positive else 1.0

    def p(name: str) -> float:
        # The flip keeps p = 0.5 for both classes: any other rate for one class only would make image
        # orientation predictive of the label, the very shortcut this module exists to prevent.
        if name == "vertical_flip":
            return BASE_PROBABILITIES[name] if vertical_flip else 0.0
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
    *,
    views: Sequence[object],
) -> np.ndarray:
    """Augment a batch of float32 images (N, H, W) in [0, 1], each with its own seed.

    Args:
        views: each image's view (the manifest's ``view``); only the views :func:`flips_vertically` accepts are
            flipped vertically (blank or unknown views are not).
    """
    if len(views) != len(images):
        raise ValueError(f"augment_images: {len(views)} views for {len(images)} images; give one view per image")
    pipelines = {
        (positive, flip): build_transform(positive_strength, positive=positive, vertical_flip=flip)
        for positive in (False, True)
        for flip in (False, True)
    }
    out = np.empty_like(images)
    for i in range(len(images)):
        transform = pipelines[bool(labels[i] == 1), flips_vertically(views[i])]
        # One generator shared by all transforms of the pipeline: set_random_seed would seed each transform
        # with the same value, so their "apply?" draws would coincide and fire together or not at all.
        seed = int(seeds[i])
        transform.set_random_state(np.random.default_rng(seed), random.Random(seed))
        out[i] = transform(image=images[i])["image"]
    return np.clip(out, 0.0, 1.0, out=out)
