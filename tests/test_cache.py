"""Tests for mammo_ray.cache: lossless uint16 round trips, random access into shards, truncation, settings keys."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from mammo_ray import cache

SHAPES = [(1, 1), (1, 7), (7, 1), (5, 3), (64, 48), (128, 96)]


def _image(shape: tuple[int, int], seed: int = 0) -> np.ndarray:
    image = np.random.default_rng(seed).integers(0, 65536, size=shape, dtype=np.uint16)
    image.flat[0] = 65535  # the extremes of the range survive too
    image.flat[-1] = 0 if image.size > 1 else 65535
    return image


def _shard(path: Path, images: list[np.ndarray]) -> list[dict[str, int]]:
    """Write ``images`` one after another into ``path``; return each one's offset, size and shape."""
    entries, offset = [], 0
    with open(path, "wb") as f:
        for image in images:
            blob = cache.encode(image)
            f.write(blob)
            entries.append({"offset": offset, "nbytes": len(blob), "height": image.shape[0], "width": image.shape[1]})
            offset += len(blob)
    return entries


@pytest.mark.parametrize("shape", SHAPES)
def test_encode_decode_round_trip(shape: tuple[int, int]) -> None:
    image = _image(shape)
    blob = cache.encode(image)
    assert isinstance(blob, bytes)
    decoded = cache.decode(blob, *shape)
    assert decoded.dtype == np.uint16
    assert decoded.shape == shape
    np.testing.assert_array_equal(decoded, image)


@pytest.mark.parametrize("fill", [0, 1, 4095, 65535])
def test_constant_images_round_trip_and_compress(fill: int) -> None:
    image = np.full((256, 200), fill, dtype=np.uint16)
    blob = cache.encode(image)
    assert len(blob) < image.nbytes // 10
    np.testing.assert_array_equal(cache.decode(blob, 256, 200), image)


@pytest.mark.parametrize("view", ["transposed", "strided"])
def test_encode_non_contiguous_view(view: str) -> None:
    base = _image((40, 30))
    image = base.T if view == "transposed" else base[::2, ::3]
    assert not image.flags.c_contiguous
    np.testing.assert_array_equal(cache.decode(cache.encode(image), *image.shape), image)


@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.int32, np.uint32, np.float32, np.float64, np.bool_])
def test_encode_refuses_other_dtypes(dtype: type) -> None:
    with pytest.raises(TypeError, match="uint16"):
        cache.encode(np.zeros((4, 4), dtype=dtype))


def test_read_image_at_offsets_in_a_shard(tmp_path: Path) -> None:
    images = [_image(shape, seed) for seed, shape in enumerate([(1, 1), (20, 10), (5, 3), (32, 24)])]
    shard = tmp_path / "shard-00000.bin"
    entries = _shard(shard, images)
    # Read out of order, with and without an open handle.
    for i in (3, 0, 2, 1):
        e = entries[i]
        np.testing.assert_array_equal(cache.read_image(str(shard), **e), images[i])
    with open(shard, "rb") as handle:
        for i in (1, 3, 0, 2):
            e = entries[i]
            np.testing.assert_array_equal(cache.read_image(str(shard), **e, handle=handle), images[i])


def test_read_image_accepts_numpy_scalars(tmp_path: Path) -> None:
    image = _image((6, 4))
    shard = tmp_path / "s.bin"
    e = _shard(shard, [image])[0]
    out = cache.read_image(str(shard), *(np.int64(e[k]) for k in ("offset", "nbytes", "height", "width")))
    np.testing.assert_array_equal(out, image)


@pytest.mark.parametrize("cut", [1, 10, "half", "all"])
@pytest.mark.parametrize("with_handle", [False, True])
def test_truncated_blob_raises_oserror_naming_the_file(tmp_path: Path, cut: int | str, with_handle: bool) -> None:
    images = [_image((16, 16), 0), _image((32, 16), 1)]
    shard = tmp_path / "shard-00007.bin"
    entries = _shard(shard, images)
    last = entries[-1]
    size = shard.stat().st_size
    remove = {"half": last["nbytes"] // 2, "all": last["nbytes"]}.get(cut, cut)  # type: ignore[arg-type]
    with open(shard, "r+b") as f:
        f.truncate(size - int(remove))
    np.testing.assert_array_equal(cache.read_image(str(shard), **entries[0]), images[0])  # the intact blob
    with pytest.raises(OSError, match="shard-00007.bin"):
        if with_handle:
            with open(shard, "rb") as handle:
                cache.read_image(str(shard), **last, handle=handle)
        else:
            cache.read_image(str(shard), **last)


def test_read_image_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        cache.read_image(str(tmp_path / "nosuch.bin"), 0, 10, 2, 2)


def _rows(shards: dict[str, list[dict[str, int]]], order: list[tuple[str, int]]) -> dict[str, np.ndarray]:
    picked = [(name, shards[name][i]) for name, i in order]
    return {
        "cache_file": np.array([name for name, _ in picked], dtype=object),
        "cache_offset": np.array([e["offset"] for _, e in picked], dtype=np.int64),
        "cache_nbytes": np.array([e["nbytes"] for _, e in picked], dtype=np.int64),
        "cache_height": np.array([e["height"] for _, e in picked], dtype=np.int64),
        "cache_width": np.array([e["width"] for _, e in picked], dtype=np.int64),
    }


@pytest.mark.parametrize(
    "order",
    [
        [("b", 1), ("a", 0), ("b", 0), ("a", 2), ("a", 1), ("b", 2)],  # interleaved shards
        [("a", 2), ("a", 0)],  # one shard, out of order
        [("b", 2)],  # a single row
        [("a", 1), ("a", 1), ("b", 1)],  # the same image twice
    ],
)
def test_read_images_keeps_input_order_across_shards(tmp_path: Path, order: list[tuple[str, int]]) -> None:
    images = {
        "a": [_image((8, 6), 10 + i) for i in range(3)],
        "b": [_image((5 + i, 4), 20 + i) for i in range(3)],
    }
    shards = {
        str(tmp_path / f"shard-{name}.bin"): _shard(tmp_path / f"shard-{name}.bin", imgs)
        for name, imgs in images.items()
    }
    by_short = {name: str(tmp_path / f"shard-{name}.bin") for name in images}
    rows = _rows(shards, [(by_short[name], i) for name, i in order])
    out = cache.read_images(rows)
    assert len(out) == len(order)
    for got, (name, i) in zip(out, order, strict=True):
        np.testing.assert_array_equal(got, images[name][i])


def test_read_images_empty_batch() -> None:
    rows = {k: np.array([], dtype=object if k == "cache_file" else np.int64) for k in _rows({}, [])}
    assert cache.read_images(rows) == []


def test_read_images_truncated_shard_names_it(tmp_path: Path) -> None:
    shard = tmp_path / "shard-bad.bin"
    entries = _shard(shard, [_image((8, 8)), _image((8, 8), 1)])
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size - 3)
    with pytest.raises(OSError, match="shard-bad.bin"):
        cache.read_images(_rows({str(shard): entries}, [(str(shard), 0), (str(shard), 1)]))


BASE_SETTINGS = {"size": [512, 416], "window": "voi", "crop": True, "flip": "left", "bits": 16}


@pytest.mark.parametrize(
    "change",
    [
        {"size": [1024, 512]},
        {"size": [416, 512]},
        {"window": "minmax"},
        {"crop": False},
        {"flip": "right"},
        {"bits": 12},
        {"extra": None},
    ],
)
def test_settings_key_differs_for_different_settings(change: dict) -> None:
    assert cache.settings_key({**BASE_SETTINGS, **change}) != cache.settings_key(BASE_SETTINGS)


def test_settings_key_is_stable() -> None:
    key = cache.settings_key(BASE_SETTINGS)
    reordered = dict(reversed(list(BASE_SETTINGS.items())))
    assert cache.settings_key(reordered) == key
    assert cache.settings_key(dict(BASE_SETTINGS)) == key
    assert len(key) == 12 and all(c in "0123456789abcdef" for c in key)


def test_settings_key_empty_settings() -> None:
    assert cache.settings_key({}) == cache.settings_key({})
    assert cache.settings_key({}) != cache.settings_key(BASE_SETTINGS)
