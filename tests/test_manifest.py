"""Tests for mammo_ray.manifest: reading, validation that names rows and files, and leak checks between splits."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from mammo_ray import manifest
from mammo_ray.manifest import ManifestError

FORMATS = ("parquet", "csv")


def _rows(n: int, prefix: str = "tr", patients: int | None = None, **extra: list[Any]) -> dict[str, list[Any]]:
    """``n`` rows with distinct image/exam ids; ``patients`` patients shared round-robin (default one each)."""
    patients = patients or n
    rows: dict[str, list[Any]] = {
        "image_id": [f"{prefix}-img{i}" for i in range(n)],
        "path": [f"images/{prefix}-img{i}.dcm" for i in range(n)],
        "label": [i % 2 for i in range(n)],
        "patient_id": [f"{prefix}-pat{i % patients}" for i in range(n)],
        "exam_id": [f"{prefix}-exam{i}" for i in range(n)],
        "laterality": ["L" if i % 2 else "R" for i in range(n)],
        "view": ["CC" if i % 3 else "MLO" for i in range(n)],
        "dataset": ["EMBED" if i % 2 else "CSAW" for i in range(n)],
    }
    rows.update(extra)
    return rows


def _write(folder: Path, rows: dict[str, list[Any]], name: str, fmt: str = "parquet", touch: bool = True) -> Path:
    """Write a manifest under ``folder`` and create the (empty) image files it names, relative to ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    if touch:
        for path in rows.get("path", []):
            if isinstance(path, str) and not manifest.is_remote(path):
                target = Path(path) if Path(path).is_absolute() else folder / path
                target.parent.mkdir(parents=True, exist_ok=True)
                target.touch()
    frame = pd.DataFrame(rows)
    out = folder / f"{name}.{fmt}"
    if fmt == "csv":
        frame.to_csv(out, index=False)
    else:
        frame.to_parquet(out, index=False)
    return out


# --------------------------------------------------------------------------------------------------
# read_manifest


@pytest.mark.parametrize("fmt", FORMATS)
def test_read_manifest_resolves_relative_paths_against_its_folder(
    tmp_path: Path, fmt: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "prepared"
    path = _write(folder, _rows(3), "train", fmt)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # relative to the manifest, never to the working directory
    frame = manifest.read_manifest(path)
    assert frame["path"].tolist() == [str((folder / f"images/tr-img{i}.dcm").resolve()) for i in range(3)]
    assert all(Path(p).is_file() for p in frame["path"])
    assert frame.attrs["source"] == str(path)


@pytest.mark.parametrize("fmt", FORMATS)
def test_read_manifest_keeps_absolute_and_remote_paths(tmp_path: Path, fmt: str) -> None:
    absolute = str(tmp_path / "abs" / "a.dcm")
    rows = _rows(3)
    rows["path"] = [absolute, "s3://bucket/b.dcm", "gs://bucket/c.dcm"]
    frame = manifest.read_manifest(_write(tmp_path / "m", rows, "train", fmt))
    assert frame["path"].tolist() == rows["path"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_read_manifest_resolves_cache_file(tmp_path: Path, fmt: str) -> None:
    rows = _rows(2, cache_file=["cache/shard-0.bin", "cache/shard-0.bin"], cache_offset=[0, 10], cache_nbytes=[10, 5])
    frame = manifest.read_manifest(_write(tmp_path, rows, "train", fmt))
    assert set(frame["cache_file"]) == {str((tmp_path / "cache/shard-0.bin").resolve())}


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("role", ["train", "valid", "test"])
def test_read_manifest_fills_split_from_role(tmp_path: Path, fmt: str, role: str) -> None:
    frame = manifest.read_manifest(_write(tmp_path, _rows(3), "m", fmt), role)
    assert frame["split"].tolist() == [role] * 3


def test_read_manifest_without_role_adds_no_split(tmp_path: Path) -> None:
    assert "split" not in manifest.read_manifest(_write(tmp_path, _rows(2), "m")).columns


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize(("role", "expected"), [("train", [0, 3]), ("valid", [1]), ("test", [2, 4])])
def test_read_manifest_filters_multi_split_file(tmp_path: Path, fmt: str, role: str, expected: list[int]) -> None:
    rows = _rows(5, split=["train", "valid", "test", "train", "test"])
    frame = manifest.read_manifest(_write(tmp_path, rows, "all", fmt), role)
    assert frame["image_id"].tolist() == [f"tr-img{i}" for i in expected]
    assert frame.index.tolist() == list(range(len(expected))), "the index should be reset after filtering"
    assert set(frame["split"]) == {role}


def test_read_manifest_multi_split_without_the_role(tmp_path: Path) -> None:
    path = _write(tmp_path, _rows(2, split=["train", "valid"]), "all")
    with pytest.raises(ManifestError, match="test"):
        manifest.read_manifest(path, "test")


@pytest.mark.parametrize("fmt", FORMATS)
def test_read_manifest_ids_are_strings(tmp_path: Path, fmt: str) -> None:
    rows = _rows(2)
    rows["patient_id"] = [101, 102]
    rows["exam_id"] = [7, 8]
    frame = manifest.read_manifest(_write(tmp_path, rows, "m", fmt))
    assert frame["patient_id"].tolist() == ["101", "102"]
    assert frame["exam_id"].tolist() == ["7", "8"]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("labels", [["0", "1", "0", "1"], [0.0, 1.0, 0.0, 1.0], ["0", " 1 ", "0.0", "1e0"]])
def test_read_manifest_makes_valid_labels_int(tmp_path: Path, fmt: str, labels: list[Any]) -> None:
    """Labels stored as text or floats pass validation, so every consumer must see them as int 0/1."""
    frame = manifest.read_manifest(_write(tmp_path, _rows(4, label=labels), "m", fmt), "train")
    manifest.validate_manifest(frame, "m")
    assert frame["label"].dtype == "int64" and frame["label"].tolist() == [0, 1, 0, 1]
    assert manifest.summary(frame)["n_positive"] == 2  # text labels summed to "0101"
    assert int((frame["label"] == 1).sum()) == 2  # what the samplers select


@pytest.mark.parametrize(
    ("train_ids", "valid_ids"),
    [([101, 102], [102.0, 103.0]), ([" 102", "101"], ["102 ", "103"]), (["102.0", "101"], ["102", "103"])],
)
def test_ids_written_as_int_float_or_padded_text_still_show_a_leak(
    tmp_path: Path, train_ids: list[Any], valid_ids: list[Any]
) -> None:
    """Patient 102 as int64 in one split and float64 (102.0) in the other is one patient (ids cleaned as importers do)."""
    train = _rows(2, "tr", patient_id=train_ids)
    valid = _rows(2, "va", patient_id=valid_ids)
    paths = {"train": _write(tmp_path / "a", train, "train"), "valid": _write(tmp_path / "b", valid, "valid")}
    assert manifest.read_manifest(paths["valid"])["patient_id"].tolist() == ["102", "103"]
    with pytest.raises(ManifestError, match=r"1 patient\(s\) appear in both train and valid .*: 102\."):
        manifest.load_manifests(paths)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize(
    "dropped", [("label",), ("patient_id",), ("path", "exam_id"), ("laterality", "view", "dataset"), ("image_id",)]
)
def test_missing_columns_are_named_with_the_file(tmp_path: Path, fmt: str, dropped: tuple[str, ...]) -> None:
    rows = {k: v for k, v in _rows(2).items() if k not in dropped}
    path = _write(tmp_path, rows, "m", fmt, touch=False)
    with pytest.raises(ManifestError) as err:
        manifest.read_manifest(path)
    assert str(path) in str(err.value)
    for column in dropped:
        assert column in str(err.value)


def test_missing_manifest_file(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="does not exist"):
        manifest.read_manifest(tmp_path / "nosuch.parquet")


@pytest.mark.parametrize(("name", "content"), [("bad.parquet", b"not parquet at all"), ("empty.parquet", b"")])
def test_unreadable_manifest_names_the_file(tmp_path: Path, name: str, content: bytes) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ManifestError, match=name):
        manifest.read_manifest(path)


# --------------------------------------------------------------------------------------------------
# validate_manifest


def _read(tmp_path: Path, rows: dict[str, list[Any]], fmt: str = "parquet", touch: bool = True) -> pd.DataFrame:
    return manifest.read_manifest(_write(tmp_path, rows, "m", fmt, touch=touch), "train")


@pytest.mark.parametrize("fmt", FORMATS)
def test_valid_manifest_passes(tmp_path: Path, fmt: str) -> None:
    manifest.validate_manifest(_read(tmp_path, _rows(4), fmt), "m")


@pytest.mark.parametrize(
    ("labels", "bad_rows"),
    [
        ([0, 2, 1, 1], [1]),
        ([-1, 0, 1, 0], [0]),
        ([0.0, 0.5, 1.0, 1.0], [1]),
        ([0, 1, 3, 4], [2, 3]),
        ([0, 1, None, 1], [2]),
    ],
)
def test_labels_outside_0_1_name_the_rows(tmp_path: Path, labels: list[Any], bad_rows: list[int]) -> None:
    frame = _read(tmp_path, _rows(4, label=labels))
    with pytest.raises(ManifestError) as err:
        manifest.validate_manifest(frame, "m.parquet")
    message = str(err.value)
    assert f"{len(bad_rows)} label(s)" in message
    for i in bad_rows:
        assert f"row {i + 1} (image_id tr-img{i}" in message  # counted from 1
    assert "m.parquet" in message and manifest.ROW_COUNTING in message


def test_string_labels_are_refused(tmp_path: Path) -> None:
    frame = _read(tmp_path, _rows(3, label=["0", "cancer", "1"]))
    with pytest.raises(ManifestError, match="row 2 .*cancer"):
        manifest.validate_manifest(frame, "m")


@pytest.mark.parametrize(("duplicated", "count"), [(["a", "a", "b", "c"], 1), (["a", "b", "a", "b"], 2)])
def test_duplicate_image_ids_are_named(tmp_path: Path, duplicated: list[str], count: int) -> None:
    rows = _rows(4)
    rows["image_id"] = duplicated
    with pytest.raises(ManifestError) as err:
        manifest.validate_manifest(_read(tmp_path, rows), "m")
    assert f"{count} duplicate image_id(s)" in str(err.value)
    for image_id in {x for x in duplicated if duplicated.count(x) > 1}:
        assert image_id in str(err.value)


@pytest.mark.parametrize(("missing", "shown"), [(1, 1), (3, 3), (7, 3)])
def test_missing_files_count_and_examples(tmp_path: Path, missing: int, shown: int) -> None:
    frame = _read(tmp_path, _rows(10))
    for path in frame["path"][:missing]:
        Path(path).unlink()
    with pytest.raises(ManifestError) as err:
        manifest.validate_manifest(frame, "m")
    message = str(err.value)
    assert f"{missing} missing image file(s)" in message
    assert sum(path in message for path in frame["path"][:missing]) == shown
    if missing > shown:
        assert f"and {missing - shown} more" in message


def test_missing_files_skipped_without_check_files(tmp_path: Path) -> None:
    frame = _read(tmp_path, _rows(3), touch=False)
    manifest.validate_manifest(frame, "m", check_files=False)
    with pytest.raises(ManifestError, match="3 missing image file"):
        manifest.validate_manifest(frame, "m")


def test_uri_image_paths_without_a_cache_are_refused(tmp_path: Path) -> None:
    """On-the-fly decoding reads local files only, so URI image paths need the pixel cache (before any request)."""
    rows = _rows(2)
    rows["path"] = ["s3://bucket/a.dcm", "gs://bucket/b.dcm"]
    frame = _read(tmp_path, rows)
    with pytest.raises(ManifestError, match=r"2 image path\(s\) are URIs, e\.g\. s3://bucket/a\.dcm.*pixel cache"):
        manifest.validate_manifest(frame, "m")
    manifest.validate_manifest(frame, "m", check_files=False)


@pytest.mark.parametrize(("use_cache", "what"), [(True, "pixel-cache shard"), (False, "image file")])
def test_cached_manifest_checks_the_shards(tmp_path: Path, use_cache: bool, what: str) -> None:
    rows = _rows(2, cache_file=["cache/s0.bin", "cache/s0.bin"], cache_offset=[0, 4], cache_nbytes=[4, 4])
    frame = _read(tmp_path, rows)
    Path(frame["path"][0]).unlink()  # one image file missing, and the shard missing too
    with pytest.raises(ManifestError, match=what):
        manifest.validate_manifest(frame, "m", use_cache=use_cache)
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "s0.bin").touch()
    if use_cache:
        manifest.validate_manifest(frame, "m", use_cache=True)  # the images themselves are not needed


def test_empty_manifest_is_refused(tmp_path: Path) -> None:
    frame = _read(tmp_path, _rows(2)).iloc[:0]
    with pytest.raises(ManifestError, match="no rows"):
        manifest.validate_manifest(frame, "m")


@pytest.mark.parametrize("column", ["patient_id", "path"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_empty_ids_or_paths_are_refused(tmp_path: Path, column: str, fmt: str) -> None:
    rows = _rows(3)
    rows[column][1] = None
    frame = _read(tmp_path, rows, fmt)
    with pytest.raises(ManifestError, match=f"empty {column}"):
        manifest.validate_manifest(frame, "m", check_files=False)


# --------------------------------------------------------------------------------------------------
# Row numbers: every message that names a row names the row a user finds in the file


def _row_of_file(path: Path, fmt: str, number: int) -> str:
    """The image_id of "row ``number``" as a user reads the file: line ``number`` + 1 of the CSV (the header is line
    1), the ``number``-th row of the Parquet file."""
    if fmt == "csv":
        header, *lines = path.read_text().splitlines()
        return dict(zip(header.split(","), lines[number - 1].split(","), strict=True))["image_id"]
    return str(pd.read_parquet(path)["image_id"].iloc[number - 1])


MIXED_SPLITS = ["train", "valid", "train", "test", "valid", "valid"]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize(
    ("column", "value", "position", "splits", "role"),
    [
        ("label", 7, 0, None, "train"),  # the first data row: "row 0" before
        ("label", 2, 3, None, "valid"),
        ("patient_id", None, 5, None, "train"),  # "rows 5" before, the sixth row
        ("path", None, 2, None, "test"),
        # A file holding several splits: the valid rows are file rows 2, 5, 6, and the message named their positions
        # among themselves (row 2 for the file's row 6).
        ("label", 3, 5, MIXED_SPLITS, "valid"),
        ("patient_id", None, 4, MIXED_SPLITS, "valid"),
        ("path", None, 3, MIXED_SPLITS, "test"),
    ],
)
def test_the_named_row_is_the_bad_row_of_the_file(
    tmp_path: Path, fmt: str, column: str, value: Any, position: int, splits: list[str] | None, role: str
) -> None:
    rows = _rows(6, **({"split": splits} if splits else {}))
    rows[column][position] = value
    path = _write(tmp_path, rows, "m", fmt)
    with pytest.raises(ManifestError) as err:
        manifest.load_manifests({role: path}, check_files=False)
    message = str(err.value)
    named = [int(n) for n in re.findall(r"\brow (\d+)", message)]
    assert len(named) == 1, message
    assert _row_of_file(path, fmt, named[0]) == f"tr-img{position}", message
    assert str(path) in message and f"({manifest.ROW_COUNTING})" in message


@pytest.mark.parametrize("fmt", FORMATS)
def test_row_numbers_of_several_bad_rows_and_of_a_table_built_in_memory(tmp_path: Path, fmt: str) -> None:
    rows = _rows(9, split=["valid", "train"] * 4 + ["train"])
    for position in (1, 3, 5, 7, 8):
        rows["label"][position] = 5
    frame = manifest.read_manifest(_write(tmp_path, rows, "m", fmt), "train")
    with pytest.raises(ManifestError, match=r"row 2 .*; row 4 .*; row 6 .*; row 8 .*; row 9 \(image_id tr-img8"):
        manifest.validate_manifest(frame, "m")
    # A frame that did not come from a file (an importer's, a test's) is numbered by its own rows, the same way.
    built = pd.DataFrame(_rows(3, patient_id=["a", "", "c"]))
    with pytest.raises(ManifestError, match=r"1 row\(s\) with empty patient_id: row 2 \(rows numbered from 1"):
        manifest.validate_manifest(built, "built", check_files=False)


def test_load_manifests_drops_the_file_position(tmp_path: Path) -> None:
    """The position is for messages only: the frames training reads have the file's columns."""
    path = _write(tmp_path, _rows(4, split=["train", "valid", "train", "valid"]), "m")
    assert manifest.FILE_POSITION in manifest.read_manifest(path, "valid").columns
    frame = manifest.load_manifests({"valid": path}, check_files=False)["valid"]
    assert manifest.FILE_POSITION not in frame.columns and frame.attrs["source"] == str(path)


# --------------------------------------------------------------------------------------------------
# check_overlap


def _frame(prefix: str, n: int = 3, **changes: list[Any]) -> pd.DataFrame:
    rows = _rows(n, prefix)
    rows.update(changes)
    frame = pd.DataFrame(rows)
    frame.attrs["source"] = f"{prefix}.parquet"
    return frame


def test_disjoint_splits_pass() -> None:
    manifest.check_overlap({"train": _frame("tr"), "valid": _frame("va"), "test": _frame("te")})


@pytest.mark.parametrize("roles", [[], ["train"]])
def test_zero_or_one_split_passes(roles: list[str]) -> None:
    manifest.check_overlap({role: _frame("tr") for role in roles})


@pytest.mark.parametrize(("column", "what"), [("patient_id", "patient"), ("exam_id", "exam"), ("image_id", "image")])
@pytest.mark.parametrize(("first", "second"), [("train", "valid"), ("train", "test"), ("valid", "test")])
def test_overlap_names_shared_ids_and_refuses(column: str, what: str, first: str, second: str) -> None:
    frames = {"train": _frame("tr"), "valid": _frame("va"), "test": _frame("te")}
    shared = ["shared-1", "shared-2"]
    frames[first].loc[:1, column] = shared
    frames[second].loc[1:2, column] = shared
    with pytest.raises(ManifestError) as err:
        manifest.check_overlap(frames)
    message = str(err.value)
    assert f"2 {what}(s) appear in both {first} and {second}" in message
    assert all(x in message for x in shared)
    assert f"{first[:2]}.parquet" in message and f"{second[:2]}.parquet" in message
    assert "refusing to train" in message


def test_overlap_lists_at_most_ten_patients() -> None:
    train, valid = _frame("tr", 15), _frame("va", 15)
    valid["patient_id"] = train["patient_id"]
    with pytest.raises(ManifestError, match=r"15 patient\(s\).*and 5 more"):
        manifest.check_overlap({"train": train, "valid": valid})


def test_identical_pixels_are_refused() -> None:
    train = _frame("tr", pixel_hash=["h0", "h1", "h2"])
    valid = _frame("va", pixel_hash=["x0", "h1", None])
    with pytest.raises(ManifestError) as err:
        manifest.check_overlap({"train": train, "valid": valid})
    assert "1 identical image(s)" in str(err.value)
    assert "tr-img1" in str(err.value)


def test_missing_pixel_hashes_are_not_an_overlap() -> None:
    train = _frame("tr", pixel_hash=[None, None, "a"])
    valid = _frame("va", pixel_hash=[None, "b", None])
    manifest.check_overlap({"train": train, "valid": valid})


def test_overlap_survives_csv_and_parquet_mix(tmp_path: Path) -> None:
    # Patient ids with leading zeros (common in hospital exports): the same patient in a CSV training manifest and a
    # Parquet validation manifest must be caught. read_manifest reads CSV ids as numbers, so "007" becomes "7".
    train = _rows(2, "tr")
    train["patient_id"] = ["007", "008"]
    valid = _rows(1, "va")
    valid["patient_id"] = ["007"]
    paths = {"train": _write(tmp_path, train, "train", "csv"), "valid": _write(tmp_path, valid, "valid", "parquet")}
    frame = manifest.read_manifest(paths["train"], "train")
    assert frame["patient_id"].tolist() == ["007", "008"], (
        f"BUG manifest.read_manifest: CSV ids must be read as text, got {frame['patient_id'].tolist()}"
    )
    with pytest.raises(ManifestError, match="007"):
        manifest.load_manifests(paths)


# --------------------------------------------------------------------------------------------------
# load_manifests, has_cache, summary


@pytest.mark.parametrize("fmt", FORMATS)
def test_load_manifests_end_to_end(tmp_path: Path, fmt: str) -> None:
    paths: dict[str, Path | None] = {
        "train": _write(tmp_path / "a", _rows(6, "tr", patients=3), "train", fmt),
        "valid": _write(tmp_path / "b", _rows(4, "va"), "valid", fmt),
        "test": None,
    }
    frames = manifest.load_manifests(paths)
    assert list(frames) == ["train", "valid"]
    assert len(frames["train"]) == 6 and len(frames["valid"]) == 4
    assert set(frames["valid"]["split"]) == {"valid"}
    assert all(Path(p).is_file() for p in frames["train"]["path"])


def test_load_manifests_from_one_file_with_splits(tmp_path: Path) -> None:
    rows = _rows(6, split=["train", "train", "valid", "valid", "test", "test"])
    path = _write(tmp_path, rows, "all")
    frames = manifest.load_manifests({"train": path, "valid": path, "test": path})
    assert {role: len(frame) for role, frame in frames.items()} == {"train": 2, "valid": 2, "test": 2}


@pytest.mark.parametrize(
    ("valid_changes", "error"),
    [
        ({"patient_id": ["tr-pat0", "va-pat1"]}, "patient"),
        ({"label": [0, 5]}, "label"),
        ({"image_id": ["x", "x"]}, "duplicate"),
    ],
)
def test_load_manifests_refuses(tmp_path: Path, valid_changes: dict[str, list[Any]], error: str) -> None:
    paths = {
        "train": _write(tmp_path / "a", _rows(3, "tr"), "train"),
        "valid": _write(tmp_path / "b", {**_rows(2, "va"), **valid_changes}, "valid"),
    }
    with pytest.raises(ManifestError, match=error):
        manifest.load_manifests(paths)


def test_load_manifests_missing_files(tmp_path: Path) -> None:
    paths = {"train": _write(tmp_path, _rows(3), "train", touch=False)}
    with pytest.raises(ManifestError, match="3 missing"):
        manifest.load_manifests(paths)
    assert len(manifest.load_manifests(paths, check_files=False)["train"]) == 3


@pytest.mark.parametrize(
    ("columns", "expected"),
    [
        ({}, False),
        ({"cache_file": ["a", "a"], "cache_offset": [0, 1]}, False),
        ({"cache_file": ["a", "a"], "cache_offset": [0, 1], "cache_nbytes": [1, 1]}, True),
        ({"cache_file": ["a", None], "cache_offset": [0, 1], "cache_nbytes": [1, 1]}, False),
        ({"cache_file": [None, None], "cache_offset": [0, 1], "cache_nbytes": [1, 1]}, False),
    ],
)
def test_has_cache(columns: dict[str, list[Any]], expected: bool) -> None:
    assert manifest.has_cache(pd.DataFrame({**_rows(2), **columns})) is expected


def _cached(heights: list[int], widths: list[int]) -> pd.DataFrame:
    n = len(heights)
    cache = {"cache_file": ["cache/ab/s0.bin"] * n, "cache_offset": list(range(n)), "cache_nbytes": [1] * n}
    return pd.DataFrame({**_rows(n), **cache, "cache_height": heights, "cache_width": widths})


@pytest.mark.parametrize(
    ("heights", "widths", "bad"),
    [
        ([128, 128, 128], [96, 96, 96], 3),  # the whole cache is smaller
        ([256, 128, 256], [208, 96, 208], 1),  # one row is
        ([256, 256], [96, 208], 1),  # narrower only
    ],
)
def test_a_cache_smaller_than_the_image_size_is_refused(heights: list[int], widths: list[int], bad: int) -> None:
    frame = _cached(heights, widths)
    with pytest.raises(ManifestError) as err:
        manifest.check_cache_size(frame, [256, 208], "prepared/train.parquet", "Re-run prepare.")
    message = str(err.value)
    first = next(i for i, (h, w) in enumerate(zip(heights, widths, strict=True)) if h < 256 or w < 208)
    assert message.startswith(f"prepared/train.parquet: {bad} of {len(heights)} row(s)")
    assert "smaller than data.image_size 256×208" in message and f"image_id tr-img{first}" in message
    assert f"{heights[first]}×{widths[first]}" in message and message.endswith("Re-run prepare.")


@pytest.mark.parametrize(
    ("heights", "widths"),
    [([256, 256], [208, 208]), ([1024, 512], [512, 832])],  # the same size, or larger (resized down, as before)
)
def test_a_cache_at_least_the_image_size_passes(heights: list[int], widths: list[int]) -> None:
    manifest.check_cache_size(_cached(heights, widths), (256, 208), "m", "")


def test_the_cache_size_check_skips_manifests_without_cache_sizes() -> None:
    manifest.check_cache_size(pd.DataFrame(_rows(2)), (256, 208), "m", "")  # no cache: images are decoded
    frame = _cached([64, 64], [48, 48]).drop(columns=["cache_height", "cache_width"])
    manifest.check_cache_size(frame, (256, 208), "m", "")  # a hand-made manifest without the sizes


@pytest.mark.parametrize(
    ("labels", "patients", "expected"),
    [
        ([0, 1, 1, 0], 2, {"n_images": 4, "n_positive": 2, "n_patients": 2, "n_exams": 4}),
        ([0, 0, 0], 1, {"n_images": 3, "n_positive": 0, "n_patients": 1, "n_exams": 3}),
        ([1], 1, {"n_images": 1, "n_positive": 1, "n_patients": 1, "n_exams": 1}),
        ([], 1, {"n_images": 0, "n_positive": 0, "n_patients": 0, "n_exams": 0}),
    ],
)
def test_summary(labels: list[int], patients: int, expected: dict[str, int]) -> None:
    frame = pd.DataFrame(_rows(len(labels), patients=patients, label=labels))
    result = manifest.summary(frame)
    assert result == expected
    assert all(type(v) is int for v in result.values())


def test_summary_after_read(tmp_path: Path) -> None:
    frame = manifest.read_manifest(_write(tmp_path, _rows(4, patients=2), "m", "csv"), "train")
    assert manifest.summary(frame) == {"n_images": 4, "n_positive": 2, "n_patients": 2, "n_exams": 4}


def test_overlap_within_a_data_set_only_when_asked() -> None:
    """export's --test check: an external set numbered 1…N is not RSNA's patients 1…N."""
    train = pd.DataFrame({"patient_id": ["1", "2"], "exam_id": ["1", "2"], "image_id": ["a", "b"], "dataset": "RSNA"})
    test = pd.DataFrame({"patient_id": ["1"], "exam_id": ["9"], "image_id": ["z"], "dataset": "INHOUSE"})
    manifest.check_overlap({"train": train, "test": test}, within_dataset=True)
    with pytest.raises(ManifestError, match="1 patient"):
        manifest.check_overlap({"train": train, "test": test})
    with pytest.raises(ManifestError, match="RSNA/1"):
        manifest.check_overlap({"train": train, "test": test.assign(dataset="RSNA")}, within_dataset=True)
