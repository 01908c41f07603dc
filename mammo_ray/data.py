"""Ray Data pipelines: manifest rows → pixels (cache or on-the-fly decode) → augmentation → workers.

Each Train worker gets its own datasets, built here in the trial process from the validated
manifest: ``train_{rank}`` (natural ratio) or ``train_pos_{rank}`` / ``train_neg_{rank}`` (for the
class-aware samplers), and ``valid_{rank}``. Every image belongs to exactly one rank, so

* validation sees every image exactly once across ranks (Ray's ``streaming_split(equal=True)``
  drops rows to equalise shards, which would bias the validation AUC);
* a sampler can draw any number of positives and negatives per batch from two streams, and cycle a
  stream without waiting on other ranks.

Only the small metadata rows are shuffled (a new seeded order each time Train re-executes the
dataset); the pixels are read afterwards, by random access into the cache, inside ``map_batches``
tasks that stream to the workers. Without a cache the same tasks decode the files themselves.
"""

from __future__ import annotations

import zlib
from functools import partial

import numpy as np
import pandas as pd

from mammo_ray import augment, cache, manifest

# Grey-level normalisation: the ImageNet RGB statistics averaged over channels, so that a stem whose
# RGB weights were summed into one channel (model.create_model) sees inputs on the scale it was trained on.
MEAN = 0.449
STD = 0.226
PIXEL_SCALE = 65535.0


def resize_uint16(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize a cached image whose size differs from ``data.image_size`` (area interpolation)."""
    import cv2

    height, width = size
    if image.shape == (height, width):
        return image
    interpolation = cv2.INTER_AREA if image.shape[0] >= height else cv2.INTER_LINEAR
    return cv2.resize(image, (width, height), interpolation=interpolation)


def decode_rows(batch: dict[str, np.ndarray], image_size: tuple[int, int], use_cache: bool) -> np.ndarray:
    """Pixels of a batch of manifest rows as float32 (N, H, W) in [0, 1]."""
    if use_cache and "cache_file" in batch:
        images = cache.read_images(batch)
    else:
        from mammo_ray import imaging

        images = []
        for path, laterality in zip(batch["path"], batch["laterality"], strict=True):
            side = laterality if laterality in ("L", "R") else None
            images.append(imaging.preprocess_file(path, size=tuple(image_size), laterality=side)[0])
    stacked = np.stack([resize_uint16(img, image_size) for img in images])
    return stacked.astype(np.float32) / PIXEL_SCALE


def normalise(images01: np.ndarray) -> np.ndarray:
    """float32 (N, H, W) in [0, 1] → model input (N, 1, H, W)."""
    return ((images01 - MEAN) / STD)[:, None, :, :].astype(np.float32, copy=False)


def load_batch(
    batch: dict[str, np.ndarray],
    *,
    image_size: tuple[int, int],
    use_cache: bool,
    augment_images: bool = False,
    seed: int = 0,
    positive_strength: float = 1.0,
) -> dict[str, np.ndarray]:
    """The ``map_batches`` function: metadata rows in, model-ready images plus metadata out."""
    import cv2

    cv2.setNumThreads(1)  # one Ray Data task per CPU: OpenCV's own thread pool would oversubscribe it
    images = decode_rows(batch, image_size, use_cache)
    labels = batch["label"].astype(np.int64)
    if augment_images:
        # The batch's order changes with every seeded per-epoch shuffle, so salting the per-image seed
        # with it gives a new, reproducible draw each epoch.
        salt = zlib.crc32("|".join(map(str, batch["image_id"])).encode())
        seeds = np.array([augment.row_seed(seed, image_id, salt) for image_id in batch["image_id"]])
        images = augment.augment_images(images, labels, seeds, positive_strength)
    out = {column: batch[column] for column in manifest.STREAM_COLUMNS if column in batch and column != "path"}
    out["image"] = normalise(images)
    out["label"] = labels.astype(np.float32)
    return out


def _metadata_columns(frame: pd.DataFrame, use_cache: bool) -> list[str]:
    columns = [c for c in manifest.STREAM_COLUMNS if c in frame.columns]
    if use_cache and manifest.has_cache(frame):
        columns += ["cache_file", "cache_offset", "cache_nbytes", "cache_height", "cache_width"]
    return columns


def make_dataset(
    frame: pd.DataFrame,
    *,
    image_size: tuple[int, int],
    use_cache: bool,
    shuffle_seed: int | None = None,
    augment_images: bool = False,
    augment_seed: int = 0,
    positive_strength: float = 1.0,
    load_batch_size: int = 32,
):
    """One streamed dataset over ``frame``'s rows.

    Args:
        shuffle_seed: when set, each execution (epoch) shuffles the metadata rows in a new order
            derived from this seed (``RandomSeedConfig(reseed_after_execution=True)``).
    """
    import ray.data

    use_cache = use_cache and manifest.has_cache(frame)
    rows = frame[_metadata_columns(frame, use_cache)].reset_index(drop=True)
    # Several blocks let a multi-CPU node load pixels in parallel; metadata blocks are tiny.
    blocks = max(1, min(64, len(rows) // max(1, load_batch_size * 4)))
    # Split into blocks here: from_pandas(override_num_blocks=...) breaks on pandas 3 frames (Ray 2.60).
    bounds = np.linspace(0, len(rows), blocks + 1).astype(int)
    dataset = ray.data.from_pandas([rows.iloc[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True) if b > a])
    if shuffle_seed is not None:
        dataset = dataset.random_shuffle(seed=ray.data.RandomSeedConfig(seed=int(shuffle_seed)))
    fn = partial(
        load_batch,
        image_size=tuple(image_size),
        use_cache=use_cache,
        augment_images=augment_images,
        seed=augment_seed,
        positive_strength=positive_strength,
    )
    return dataset.map_batches(fn, batch_size=load_batch_size, batch_format="numpy")


def rank_partition(frame: pd.DataFrame, rank: int, world_size: int) -> pd.DataFrame:
    """Rank ``rank``'s share of ``frame``: every row in exactly one share, grouped by patient.

    Rows are assigned by a hash of the patient id, so a patient's images stay on one worker; the
    shares differ in size by a few patients at most.
    """
    keys = np.array([zlib.crc32(str(p).encode()) % world_size for p in frame["patient_id"]])
    return frame[keys == rank]


def training_datasets(
    frames: dict[str, pd.DataFrame],
    *,
    num_workers: int,
    sampler: str,
    image_size: tuple[int, int],
    use_cache: bool,
    seed: int,
    augment_images: bool,
    positive_strength: float,
    load_batch_size: int,
) -> dict:
    """All datasets a trial's workers need, keyed by name (see the module docstring)."""
    common = dict(image_size=image_size, use_cache=use_cache, load_batch_size=load_batch_size)
    train = frames["train"]
    datasets = {}
    for rank in range(num_workers):
        share = rank_partition(train, rank, num_workers)
        if share.empty:
            raise ValueError(f"worker {rank} of {num_workers} gets no training rows; use fewer workers")
        train_kwargs = dict(
            augment_images=augment_images, augment_seed=seed + 7 * rank, positive_strength=positive_strength, **common
        )
        if sampler == "simple":
            datasets[f"train_{rank}"] = make_dataset(share, shuffle_seed=seed * 1000 + rank, **train_kwargs)
        else:
            positives, negatives = share[share["label"] == 1], share[share["label"] == 0]
            if positives.empty or negatives.empty:
                # A rank without one class cannot form class-aware batches; fall back to the whole set.
                positives = positives if not positives.empty else train[train["label"] == 1]
                negatives = negatives if not negatives.empty else train[train["label"] == 0]
            if positives.empty or negatives.empty:
                raise ValueError(f"the {sampler} sampler needs both classes in the training manifest")
            datasets[f"train_pos_{rank}"] = make_dataset(positives, shuffle_seed=seed * 1000 + rank, **train_kwargs)
            datasets[f"train_neg_{rank}"] = make_dataset(
                negatives, shuffle_seed=seed * 1000 + 500 + rank, **train_kwargs
            )
        valid_share = rank_partition(frames["valid"], rank, num_workers)
        if not valid_share.empty:
            datasets[f"valid_{rank}"] = make_dataset(valid_share, **common)
    return datasets


def positives_per_batch(
    sampler: str, batch_size: int, steps: int, positive_fraction: float, rng: np.random.Generator
) -> np.ndarray:
    """How many positives each of ``steps`` batches holds.

    ``balanced``: exactly half of every batch. ``weighted``: a Binomial(B, p) draw per batch, which is
    what drawing each slot with replacement at probability p gives, so the epoch's share of
    positives matches p within sampling error.
    """
    if sampler == "balanced":
        if batch_size % 2:
            raise ValueError(f"the balanced sampler needs an even batch size, got {batch_size}")
        return np.full(steps, batch_size // 2, dtype=np.int64)
    if sampler == "weighted":
        return rng.binomial(batch_size, positive_fraction, size=steps).astype(np.int64)
    raise ValueError(f"no per-batch plan for sampler {sampler!r}")


class CyclingStream:
    """Rows from a dataset iterator, taken in any amount; starts a new pass when one ends.

    Each pass re-executes the dataset, which re-shuffles it, so a class is covered without repeats
    before any repeats. The stream lives across epochs: an epoch boundary does not reset it.
    """

    def __init__(self, iterator, chunk_size: int = 16, prefetch_batches: int = 2):
        self._iterator = iterator
        self._chunk_size = chunk_size
        self._prefetch = prefetch_batches
        self._pending: list[dict[str, np.ndarray]] = []
        self._source = None
        self.passes = 0
        self.rows_taken = 0

    def _next_chunk(self) -> dict[str, np.ndarray]:
        for _ in range(2):
            if self._source is None:
                self._source = iter(
                    self._iterator.iter_batches(
                        batch_size=self._chunk_size, batch_format="numpy", prefetch_batches=self._prefetch
                    )
                )
                self.passes += 1
            try:
                return next(self._source)
            except StopIteration:
                self._source = None
        raise RuntimeError("dataset stream is empty")

    def take(self, n: int) -> dict[str, np.ndarray] | None:
        if n <= 0:
            return None
        have = sum(len(c["label"]) for c in self._pending)
        while have < n:
            chunk = self._next_chunk()
            self._pending.append(chunk)
            have += len(chunk["label"])
        merged = {k: np.concatenate([c[k] for c in self._pending]) for k in self._pending[0]}
        head = {k: v[:n] for k, v in merged.items()}
        rest = {k: v[n:] for k, v in merged.items()}
        self._pending = [rest] if len(rest["label"]) else []
        self.rows_taken += n
        return head


def concat_batches(parts: list[dict[str, np.ndarray] | None]) -> dict[str, np.ndarray]:
    parts = [p for p in parts if p is not None]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
