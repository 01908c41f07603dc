"""``prepare`` end to end on tiny synthetic DICOMs and the real test files: manifests, cache, report, resume,
leak refusal, subsets, and bounded driver memory. Ray runs once per session (``ray_session``, 2 CPUs)."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import os
import re
import resource
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mammo_ray import cache, imaging, importers, manifest, prepare, synth
from mammo_ray.prepare import PrepareError

SIZE = (40, 32)  # tiny cached images (sides >= 32, as --size requires) keep each Ray run to a second or two

PREP_COLUMNS = {f"prep_{f.name}" for f in dataclasses.fields(imaging.Provenance) if f.name != "crop_box"} | {
    "prep_crop_y0",
    "prep_crop_x0",
    "prep_crop_y1",
    "prep_crop_x1",
}
CACHE_COLUMNS = {"cache_file", "cache_offset", "cache_nbytes", "cache_height", "cache_width", "pixel_hash"}
MANIFEST_COLUMNS = set(manifest.REQUIRED) | {"split", "age", "density", "manufacturer", "birads"}


@pytest.fixture(scope="module")
def synth_set(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """6 patients, 60 DICOMs at 128×104 (a few seconds to write)."""
    root = tmp_path_factory.mktemp("prepare-synth") / "data"
    return synth.generate(root, patients=6, prevalence=0.25, size=(128, 104), seed=3, progress=False)


def _root(info: dict) -> Path:
    return Path(info["manifest_csv"]).parent


def _table(info: dict, n: int | None = None) -> pd.DataFrame:
    table = importers.import_source("generic", [info["manifest_csv"]], _root(info))
    return table if n is None else table.iloc[:n].reset_index(drop=True)


def _tree_digest(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (hidden ones too) → SHA-256 of its bytes."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _write_csv(path: Path, frame: pd.DataFrame) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(path, index=False)
    return str(path)


def _load(out: Path) -> dict[str, pd.DataFrame]:
    paths = {role: out / f"{role}.parquet" for role in manifest.SPLITS}
    return manifest.load_manifests({role: path for role, path in paths.items() if path.is_file()})


def _assert_cache_matches_source(frame: pd.DataFrame, size: tuple[int, int], rows: int = 4) -> None:
    for row in frame.head(rows).itertuples(index=False):
        cached = cache.read_image(row.cache_file, row.cache_offset, row.cache_nbytes, row.cache_height, row.cache_width)
        side = row.laterality if row.laterality in ("L", "R") else None
        expected, _ = imaging.preprocess_file(row.path, size=size, laterality=side)
        np.testing.assert_array_equal(cached, expected)
        assert imaging.pixel_hash(cached) == row.pixel_hash


# --------------------------------------------------------------------------------------------------------
# End to end through main()


@pytest.mark.slow
@pytest.mark.parametrize("source", ["generic", "seed"])
def test_main_end_to_end(ray_session, synth_set, tmp_path, capsys, source) -> None:
    root = _root(synth_set)
    before = _tree_digest(root)
    csv = synth_set["manifest_csv"] if source == "generic" else synth_set["reference_csv"]
    out = tmp_path / "prepared"
    argv = ["--source", source, "--csv", csv, "--images", str(root), "--out", str(out)]
    rc = prepare.main([*argv, "--size", *map(str, SIZE), "--shard-size", "16", "--no-progress"])
    printed = capsys.readouterr().out
    assert rc == 0, printed

    frames = _load(out)  # the manifest loader accepts what prepare wrote
    assert set(frames) == set(manifest.SPLITS)
    assert sum(len(f) for f in frames.values()) == synth_set["n_images"]
    extra = {"ethnicity"} if source == "seed" else set()
    for frame in frames.values():
        assert set(frame.columns) == MANIFEST_COLUMNS | CACHE_COLUMNS | PREP_COLUMNS | extra
        assert (frame["cache_height"] == SIZE[0]).all() and (frame["cache_width"] == SIZE[1]).all()
        assert frame["cache_file"].map(lambda p: Path(p).is_file()).all()
    raw = pd.read_parquet(out / "train.parquet")
    assert raw["cache_file"].str.startswith("cache/").all()  # relative: the prepared folder moves as one piece
    assert all(Path(p).is_absolute() for p in raw["path"])
    _assert_cache_matches_source(frames["valid"], SIZE)
    _assert_cache_matches_source(frames["train"], SIZE)

    for role, frame in frames.items():
        assert re.search(
            rf"^\s+{role}\s+{len(frame)}\s+{int(frame['label'].sum())}\s+{frame['patient_id'].nunique()}$",
            printed,
            re.M,
        )
    assert f"prepared {synth_set['n_images']} of {synth_set['n_images']} images" in printed
    assert "0 failed" in printed and "0 of 4 shard(s) reused" in printed
    assert pd.read_csv(out / prepare.REPORT).empty
    assert _tree_digest(root) == before  # the input folder is byte-for-byte unchanged


def test_prepare_runs_as_a_module(ray_session, synth_set, tmp_path) -> None:
    """`python -m mammo_ray.prepare`, as the README shows it: its Ray tasks must not need this process's __main__."""
    import subprocess
    import sys

    out = tmp_path / "prepared"
    argv = ["--source", "generic", "--csv", synth_set["manifest_csv"], "--images", str(_root(synth_set))]
    argv += ["--out", str(out), "--size", *map(str, SIZE), "--no-progress"]
    address = ray_session.get_runtime_context().gcs_address  # join the tests' cluster: no second Ray instance
    proc = subprocess.run(
        [sys.executable, "-m", "mammo_ray.prepare", *argv, "--address", address],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert f"prepared {synth_set['n_images']} of {synth_set['n_images']} images" in proc.stdout
    assert "0 failed" in proc.stdout
    frames = _load(out)
    assert sum(len(f) for f in frames.values()) == synth_set["n_images"]


@pytest.mark.slow
def test_several_csv_files_are_passed_to_the_importer(ray_session, synth_set, tmp_path) -> None:
    full = pd.read_csv(synth_set["manifest_csv"])
    patients = sorted(full["patient_id"].unique())[:3]
    part = full[full["patient_id"].isin(patients)]
    first = _write_csv(tmp_path / "tables" / "a.csv", part[part["patient_id"].isin(patients[:2])])
    second = _write_csv(tmp_path / "tables" / "b.csv", part[part["patient_id"] == patients[2]])
    out = tmp_path / "prepared"
    argv = ["--source", "generic", "--csv", first, "--csv", second, "--images", str(_root(synth_set))]
    assert prepare.main([*argv, "--out", str(out), "--size", *map(str, SIZE), "--no-progress"]) == 0
    frames = _load(out)
    assert sorted(pd.concat(frames.values())["image_id"]) == sorted(part["image_id"])


# --------------------------------------------------------------------------------------------------------
# Failures: the real malformed file goes to the report; too many failures stop the run


@pytest.mark.slow
def test_malformed_file_is_reported_and_the_threshold_stops_the_run(ray_session, synth_set, testdata, tmp_path, capsys):
    good = pd.read_csv(synth_set["manifest_csv"]).head(12)
    real = [
        {"image_id": name, "path": str(testdata / f"{name}.dcm"), "label": 1, "patient_id": "MG1_" + name}
        for name in ("MG1_J2KI", "MG1_JPLY")
    ]
    table = pd.concat([good, pd.DataFrame(real)], ignore_index=True)
    table.loc[table["image_id"].str.startswith("MG1"), ["laterality", "view", "dataset", "exam_id"]] = [
        ["L", "MLO", "NEMA", "MG1_J2KI"],
        ["L", "MLO", "NEMA", "MG1_JPLY"],
    ]
    csv = _write_csv(tmp_path / "tables" / "mixed.csv", table)
    before = _tree_digest(testdata)
    out = tmp_path / "prepared"
    argv = ["--source", "generic", "--csv", csv, "--images", str(_root(synth_set)), "--out", str(out)]
    argv += ["--size", *map(str, SIZE), "--shard-size", "4", "--no-progress"]

    # 1 of 14 files is 7.1 %, more than the default 5 %: a clear error that says how many, report written.
    assert prepare.main(argv) == 1
    err = capsys.readouterr().err
    assert "1 of 14 files" in err and "--max-bad-fraction" in err and "MG1_JPLY.dcm" in err
    report = pd.read_csv(out / prepare.REPORT)
    assert list(report.columns[:2]) == ["path", "error"]
    assert report["path"].tolist() == [str(testdata / "MG1_JPLY.dcm")]
    assert "ImageReadError" in report["error"].iloc[0]
    assert not (out / "train.parquet").exists()

    # Above the threshold the run goes on; the shards of the failed run are reused, the failure reported again.
    assert prepare.main([*argv, "--max-bad-fraction", "0.1"]) == 0
    printed = capsys.readouterr().out
    assert "prepared 13 of 14 images" in printed and "1 failed" in printed and "4 of 4 shard(s) reused" in printed
    assert pd.read_csv(out / prepare.REPORT)["path"].tolist() == [str(testdata / "MG1_JPLY.dcm")]
    assert prepare.main([*argv, "--max-bad-fraction", "0.1", "--retry-failed"]) == 0  # redoes the bad file's shard
    assert "3 of 4 shard(s) reused" in capsys.readouterr().out
    frames = _load(out)
    merged = pd.concat(frames.values())
    assert "MG1_JPLY" not in set(merged["image_id"])
    real_row = merged[merged["image_id"] == "MG1_J2KI"]
    assert real_row["prep_original_height"].item() == 4664 and real_row["prep_breast_found"].item()
    # The JPEG 2000 film is decoded at reduced resolution for 32×24 output; the synthetic files are uncompressed.
    assert real_row["prep_decode_reduction"].item() > 0
    assert (merged.loc[merged["image_id"] != "MG1_J2KI", "prep_decode_reduction"] == 0).all()
    assert merged["prep_decode_reduction"].dtype == np.int64
    assert _tree_digest(testdata) == before


def test_failed_shard_reports_every_image() -> None:
    rows = pd.DataFrame({"image_id": ["a", "b"], "path": ["/x/a.dcm", "/x/b.dcm"], "laterality": ["L", "R"]})
    index = prepare._failed_shard(rows, MemoryError("worker killed\ntraceback ..."))
    assert index["image_id"].tolist() == ["a", "b"]
    assert index["error"].str.contains("shard task failed (MemoryError: worker killed)", regex=False).all()


# --------------------------------------------------------------------------------------------------------
# Never writes into input folders


@pytest.mark.parametrize("where", [".", "prepared", "dicom/SYN00000"])
def test_out_inside_images_is_refused(synth_set, capsys, where) -> None:
    root = _root(synth_set)
    before = _tree_digest(root)
    out = root / where
    argv = ["--source", "generic", "--csv", synth_set["manifest_csv"], "--images", str(root), "--out", str(out)]
    assert prepare.main(argv) == 2
    assert "never writes into input folders" in capsys.readouterr().err
    assert _tree_digest(root) == before and not (root / "prepared").exists()


@pytest.mark.parametrize(
    ("out", "paths", "refused"),
    [
        ("elsewhere/out", ["images/p1/a.dcm"], False),
        ("images/p1/out", ["images/p1/a.dcm"], True),  # inside the folder of an image given by absolute path
        ("images/p1", ["images/p1/a.dcm"], True),
        ("images", ["images/p1/a.dcm", "s3://bucket/images/a.dcm"], False),  # a parent of the image folders is fine
    ],
)
def test_check_output_folder_refuses_image_folders(tmp_path, out, paths, refused) -> None:
    absolute = [p if "://" in p else str(tmp_path / p) for p in paths]
    if refused:
        with pytest.raises(PrepareError, match="never writes into input folders"):
            prepare.check_output_folder(tmp_path / out, None, absolute)
    else:
        prepare.check_output_folder(tmp_path / out, None, absolute)


def test_an_image_folder_reached_through_a_symlink_is_still_an_input_folder(tmp_path) -> None:
    (tmp_path / "images" / "p1").mkdir(parents=True)
    (tmp_path / "images" / "p1" / "a.dcm").write_bytes(b"x")
    (tmp_path / "link").symlink_to(tmp_path / "images")
    with pytest.raises(PrepareError, match="never writes into input folders"):
        prepare.check_output_folder(tmp_path / "images" / "p1" / "out", None, [str(tmp_path / "link" / "p1" / "a.dcm")])


def _user_folder(tmp_path: Path) -> tuple[Path, Path, Path]:
    """The audit's layout: a folder with the user's table, their images and their own curated test.parquet."""
    data = tmp_path / "ds"
    (data / "img").mkdir(parents=True)
    rows = [
        {"path": f"img/p{i}_{side}_CC.png", "label": int(i == 0), "patient_id": f"p{i}"}
        for i in range(6)
        for side in "LR"
    ]
    csv = _write_csv(data / "my.csv", pd.DataFrame(rows))
    (data / "test.parquet").write_bytes(b"the user's own external test set")
    return data, Path(csv), data / "img"


@pytest.mark.parametrize(
    ("out", "needle"),
    [
        ("ds", "is the folder of --csv"),  # the folder holding the table (and here also the images)
        ("ds/img/..", "is the folder of --csv"),  # the same folder, spelt otherwise
        (".", "holds files prepare did not write (ds)"),  # a parent of the table's and the images' folders
        ("curated", "holds files prepare did not write (test.parquet)"),  # prepare's names, but not prepare's files
    ],
)
def test_out_holding_the_users_files_is_refused_before_ray(tmp_path, capsys, monkeypatch, out, needle) -> None:
    """prepare wrote its manifests next to the user's table and deleted their test.parquet (the test split was empty
    in that run); an --out must be new, empty or an earlier prepare's own."""
    from mammo_ray import cli

    data, csv, images = _user_folder(tmp_path)
    if out == "curated":
        (tmp_path / "curated").mkdir()
        shutil.copy(data / "test.parquet", tmp_path / "curated" / "test.parquet")
    monkeypatch.setattr(cli, "start_ray", lambda **_: pytest.fail("Ray started: the --out was accepted"))
    before = _tree_digest(tmp_path)
    argv = ["--source", "generic", "--csv", str(csv), "--images", str(images), "--out", str(tmp_path / out)]
    argv += ["--size", *map(str, SIZE), "--split", "0.5", "0.5", "0", "--no-progress"]
    assert prepare.main(argv) == 2
    err = capsys.readouterr().err
    assert needle in err, err
    assert _tree_digest(tmp_path) == before


@pytest.mark.parametrize(
    ("items", "accepted"),
    [
        ((), True),  # new or empty
        (("cache/abc/settings.json", "prepare_report.csv"), True),  # a first run that failed after caching: resumed
        (("train.parquet", "valid.parquet", "prepare_summary.json", ".test.parquet.x1y2.tmp"), True),
        (("train.parquet", "valid.parquet", "prepare_summary.json", "notes.txt"), False),
        (("test.parquet",), False),  # a name prepare uses, but nothing shows that prepare wrote it
        (("cache/abc/settings.json", "dicom/a.dcm"), False),
    ],
)
def test_check_own_output(tmp_path, items, accepted) -> None:
    out = tmp_path / "out"
    out.mkdir()
    for item in items:
        (out / item).parent.mkdir(parents=True, exist_ok=True)
        (out / item).write_text("x")
    prepare.check_own_output(tmp_path / "missing")
    if accepted:
        prepare.check_own_output(out)
    else:
        with pytest.raises(PrepareError, match="holds files prepare did not write"):
            prepare.check_own_output(out)


def test_only_manifests_prepare_listed_are_removed(ray_session, synth_set, tmp_path, caplog) -> None:
    """A manifest of a split that is empty in this run is removed only when the previous prepare_summary.json lists
    it; a test.parquet the user put into the folder stays, with a warning. A rerun still resumes."""
    table = _table(synth_set, 24)
    out = tmp_path / "prepared"
    run = functools.partial(prepare.prepare_table, table, out, size=SIZE, shard_size=8, progress=False)
    first = run(fractions=(0.5, 0.25, 0.25))
    assert set(first.paths) == {"train", "valid", "test"}
    again = run(fractions=(0.6, 0.4, 0.0))  # prepare's own test.parquet, listed in its summary: removed
    assert again.shards_reused == again.shards_total == 3
    assert not (out / "test.parquet").exists()

    (out / "test.parquet").write_bytes(b"the user's own external test set")
    with caplog.at_level("WARNING", logger="mammo_ray.prepare"):
        third = run(fractions=(0.6, 0.4, 0.0))
    assert third.shards_reused == 3 and set(third.paths) == {"train", "valid"}
    assert (out / "test.parquet").read_bytes() == b"the user's own external test set"
    assert "left " in caplog.text and "test.parquet" in caplog.text


@pytest.mark.parametrize(
    ("images", "out", "needle"),
    [
        ("missing", "out", "--images {tmp}/missing: no such folder"),
        ("s3://bucket/images", "out", "prepare decodes images from local files only"),
        ("images", "afile", "--out {tmp}/afile is a file"),
    ],
)
def test_images_and_out_are_checked_before_ray(tmp_path, capsys, images, out, needle) -> None:
    (tmp_path / "images").mkdir()
    (tmp_path / "afile").write_text("x")
    images = images if "://" in images else str(tmp_path / images)
    argv = ["--source", "generic", "--csv", str(tmp_path / "m.csv"), "--images", images, "--out", str(tmp_path / out)]
    assert prepare.main(argv) == 2
    assert needle.format(tmp=tmp_path) in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------------------------
# Resume: complete, valid shards are reused; damaged ones are redone; stale temporaries are ignored


@pytest.fixture(scope="module")
def prepared_once(ray_session, synth_set, tmp_path_factory) -> tuple[Path, pd.DataFrame, dict]:
    out = tmp_path_factory.mktemp("resume") / "prepared"
    table = _table(synth_set, 24)
    result = prepare.prepare_table(table, out, size=SIZE, shard_size=8, progress=False)
    assert result.shards_total == 3 and result.shards_reused == 0
    return out, table, {role: pd.read_parquet(path) for role, path in result.paths.items()}


def _damage(shard: Path, how: str) -> None:
    if how == "truncate":
        shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    elif how == "delete_bin":
        shard.unlink()
    elif how == "delete_index":
        shard.with_suffix(".index.parquet").unlink()
    elif how == "pad":
        with open(shard, "ab") as f:
            f.write(b"\0" * 7)
    elif how == "garbage_index":
        shard.with_suffix(".index.parquet").write_bytes(b"not parquet")


@pytest.mark.slow
@pytest.mark.parametrize("how", ["truncate", "delete_bin", "delete_index", "pad", "garbage_index"])
def test_resume_redoes_only_the_damaged_shard(prepared_once, how) -> None:
    out, table, first = prepared_once
    cache_dir = next((out / "cache").iterdir())
    shards = sorted(cache_dir.glob("shard-*.bin"))
    damaged = shards[1]
    stamps = {p: p.stat().st_mtime_ns for s in shards if s != damaged for p in (s, s.with_suffix(".index.parquet"))}
    _damage(damaged, how)
    stale = cache_dir / f".{damaged.name}.999999.tmp"  # what a killed task leaves behind
    stale.write_bytes(b"half a shard")
    os.utime(stale, (1_000_000_000, 1_000_000_000))

    result = prepare.prepare_table(table, out, size=SIZE, shard_size=8, progress=False)

    assert (result.shards_total, result.shards_reused, result.images_processed) == (3, 2, 8)
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps  # the good shards were not rewritten
    assert prepare.load_complete_shard(damaged) is not None
    assert not stale.exists()
    for role, frame in first.items():
        pd.testing.assert_frame_equal(pd.read_parquet(result.paths[role]), frame)


def _copied_table(synth_set, folder: Path, n: int) -> pd.DataFrame:
    """The first ``n`` images of the set, copied to ``folder`` (the test changes them)."""
    table = _table(synth_set, n)
    folder.mkdir(parents=True)
    paths = []
    for path in table["path"]:
        paths.append(str(folder / Path(path).name))
        shutil.copy2(path, paths[-1])
    return table.assign(path=paths)


def test_a_source_file_changed_in_place_is_read_again(ray_session, synth_set, tmp_path) -> None:
    """The shard name hashes ids and paths only: a re-exported file kept its old pixels in the cache before. So did
    a file that failed and was fixed, until --retry-failed; an unchanged failure says that flag's name."""
    table = _copied_table(synth_set, tmp_path / "images", 6)
    out = tmp_path / "prepared"
    missing = Path(table["path"][5])
    kept = missing.read_bytes()
    missing.unlink()
    run = functools.partial(prepare.prepare_table, table, out, size=SIZE, shard_size=2, progress=False,
                            max_bad_fraction=0.5)  # fmt: skip
    first = run()
    assert (first.n_failed, first.failed_reused) == (1, 0)
    again = run()
    assert (again.shards_reused, again.n_failed, again.failed_reused) == (3, 1, 1)
    assert any("--retry-failed" in line for line in again.summary_lines())
    # Replace an image by another one's bytes (a re-export), and bring the missing file back.
    changed = Path(table["path"][0])
    changed.write_bytes(Path(table["path"][2]).read_bytes())
    missing.write_bytes(kept)
    third = run()
    assert (third.shards_reused, third.images_processed, third.n_failed) == (1, 4, 0)
    frames = _load(out)
    rows = pd.concat(frames.values()).set_index("image_id")
    assert rows.at[table["image_id"][0], "pixel_hash"] == rows.at[table["image_id"][2], "pixel_hash"]
    _assert_cache_matches_source(pd.concat(frames.values()), SIZE, rows=6)
    # An index written before the record existed cannot be checked, so it is redone.
    index_path = next(third.cache_dir.glob("*.index.parquet"))
    pd.read_parquet(index_path).drop(columns=list(prepare.SOURCE_STAT_COLUMNS)).to_parquet(index_path)
    assert run().shards_reused == 2


def test_verify_cache_finds_bytes_damaged_inside_a_frame(ray_session, synth_set, tmp_path) -> None:
    """A frame of the right length with damaged bytes inside passed the reuse checks (which decode only each shard's
    first and last frames) and came back as wrong pixels; --verify-cache decodes and hashes every frame."""
    table = _table(synth_set, 6)
    out = tmp_path / "prepared"
    run = functools.partial(prepare.prepare_table, table, out, size=SIZE, shard_size=3, progress=False)
    first = run()
    shard = sorted(first.cache_dir.glob("shard-*.bin"))[0]
    index = pd.read_parquet(shard.with_suffix(".index.parquet")).sort_values("cache_offset")
    middle = index.iloc[1]
    blob = bytearray(shard.read_bytes())
    start = int(middle.cache_offset) + int(middle.cache_nbytes) // 2
    blob[start : start + 16] = bytes(16)
    shard.write_bytes(bytes(blob))
    assert run().shards_reused == 2  # the default checks miss it
    verified = run(verify_cache=True)
    assert (verified.shards_reused, verified.images_processed) == (1, 3)
    _assert_cache_matches_source(pd.concat(_load(out).values()), SIZE, rows=6)


def test_a_run_where_every_file_fails_names_the_report(ray_session, synth_set, tmp_path) -> None:
    table = _table(synth_set, 2).assign(path=[str(tmp_path / "in" / "gone1.dcm"), str(tmp_path / "in" / "gone2.dcm")])
    with pytest.raises(PrepareError, match="none of the 2 files could be used; see .*prepare_report.csv"):
        prepare.prepare_table(table, tmp_path / "out", size=SIZE, max_bad_fraction=1.0, progress=False)


def test_load_complete_shard_checks_ids_and_size(tmp_path, synth_set) -> None:
    rows = _table(synth_set, 3)[list(prepare.SHARD_COLUMNS)]
    shard = tmp_path / "shard-00000-x.bin"
    index = prepare.process_shard(rows, str(shard), SIZE)  # also runs without Ray
    assert index["error"].isna().all() and index["cache_nbytes"].sum() == shard.stat().st_size
    ids = rows["image_id"].tolist()
    assert prepare.load_complete_shard(shard, ids, SIZE) is not None
    assert prepare.load_complete_shard(shard, ids[:2], SIZE) is None  # other images: not this shard
    assert prepare.load_complete_shard(shard, ids, (SIZE[0] + 1, SIZE[1])) is None  # other settings
    blob = bytearray(shard.read_bytes())
    blob[-4:] = b"\xff\xff\xff\xff"  # same size, broken last frame
    shard.write_bytes(bytes(blob))
    assert prepare.load_complete_shard(shard, ids, SIZE) is None


@pytest.mark.slow
def test_other_size_builds_a_new_cache(ray_session, synth_set, tmp_path) -> None:
    table = _table(synth_set, 12)
    out = tmp_path / "prepared"
    first = prepare.prepare_table(table, out, size=SIZE, shard_size=6, progress=False)
    old = _tree_digest(first.cache_dir)
    second = prepare.prepare_table(table, out, size=(48, 32), shard_size=6, progress=False)
    assert second.cache_dir != first.cache_dir and second.shards_reused == 0
    assert _tree_digest(first.cache_dir) == old  # the old cache is left alone, never reused
    frames = _load(out)
    key = second.cache_dir.name
    for frame in frames.values():
        assert frame["cache_file"].map(lambda p: Path(p).parent.name == key).all()
        assert (frame["cache_height"] == 48).all()
    _assert_cache_matches_source(frames["train"], (48, 32), rows=2)


def test_a_cache_of_an_older_preprocessing_is_rebuilt(ray_session, synth_set, tmp_path, monkeypatch) -> None:
    """Version 3 stretched images without a window to their 99.5th percentile, which saturated calcifications:
    its cache is left alone and a new one is built, not trusted."""
    table = _table(synth_set, 6)
    out = tmp_path / "prepared"
    with monkeypatch.context() as patch:
        patch.setattr(prepare, "PREPROCESS_VERSION", 3)
        first = prepare.prepare_table(table, out, size=SIZE, shard_size=6, progress=False)
    old = _tree_digest(first.cache_dir)
    second = prepare.prepare_table(table, out, size=SIZE, shard_size=6, progress=False)
    assert second.cache_dir != first.cache_dir and second.shards_reused == 0
    assert _tree_digest(first.cache_dir) == old
    assert json.loads((second.cache_dir / "settings.json").read_text())["preprocess"] == prepare.PREPROCESS_VERSION


# --------------------------------------------------------------------------------------------------------
# Leaks: patients, exams and identical pixels in two splits are refused, naming them


def _split(table: pd.DataFrame) -> pd.DataFrame:
    return importers.split_patients(table, fractions=(0.5, 0.25, 0.25), seed=0)


@pytest.mark.parametrize("column", ["patient_id", "exam_id"])
def test_patient_or_exam_in_two_splits_is_refused_before_ray(synth_set, tmp_path, column) -> None:
    table = _split(_table(synth_set))
    other = table[table["split"] != table.at[0, "split"]].index[0]
    table.at[other, column] = table.at[0, column]
    with pytest.raises(PrepareError, match=re.escape(str(table.at[0, column]))):
        prepare.prepare_table(table, tmp_path / "out", size=SIZE, progress=False)
    assert not (tmp_path / "out" / "cache").exists()  # refused before a single image was decoded


@pytest.mark.slow
def test_identical_pixels_in_two_splits_are_refused_across_merged_sources(ray_session, synth_set, tmp_path) -> None:
    """The same image, exported again by a second source under another id and patient, lands in another split."""
    table = _split(_table(synth_set, 12))
    original = table.iloc[0]
    copy = tmp_path / "inhouse" / "export_0001.dcm"
    copy.parent.mkdir()
    shutil.copyfile(original["path"], copy)
    second_csv = _write_csv(
        tmp_path / "inhouse.csv",
        pd.DataFrame(
            [
                {
                    "image_id": "INHOUSE_0001",
                    "path": str(copy),
                    "label": 0,
                    "patient_id": "INH-7",
                    "laterality": original["laterality"],
                    "view": original["view"],
                    "dataset": "INHOUSE",
                }
            ]
        ),
    )
    inhouse = importers.import_source("generic", [second_csv], tmp_path / "inhouse")
    inhouse["split"] = next(s for s in manifest.SPLITS if s != original["split"])
    merged = pd.concat([table, inhouse], ignore_index=True)
    with pytest.raises(PrepareError) as caught:
        prepare.prepare_table(merged, tmp_path / "out", size=SIZE, shard_size=6, progress=False)
    message = str(caught.value)
    assert "same pixels" in message and original["image_id"] in message and "INHOUSE_0001" in message
    assert "INH-7" in message and original["patient_id"] in message
    assert not list((tmp_path / "out").glob("*.parquet"))


# --------------------------------------------------------------------------------------------------------
# Subsets: seeded, patient-level, label-stratified (no Ray)


def _big_table(patients: int = 60) -> pd.DataFrame:
    rows = []
    for p in range(patients):
        for image in range(4):
            rows.append(
                {
                    "image_id": f"P{p:03d}_{image}",
                    "path": f"/data/P{p:03d}/{image}.dcm",
                    "label": int(p % 6 == 0 and image < 2),
                    "patient_id": f"P{p:03d}",
                    "exam_id": f"P{p:03d}_E1",
                    "laterality": "LR"[image % 2],
                    "view": "CC",
                    "dataset": "X",
                }
            )
    return pd.DataFrame(rows)


def _args(*extra: str) -> object:
    base = ["--source", "generic", "--csv", "m.csv", "--images", "/data", "--out", "/elsewhere/out"]
    return prepare.build_parser().parse_args([*base, *extra])


def test_smoke_test_is_a_seeded_random_patient_subset() -> None:
    table = _big_table()
    first = prepare.plan(table, _args("--smoke-test"))
    again = prepare.plan(table, _args("--smoke-test"))
    other = prepare.plan(table, _args("--smoke-test", "--seed", "1"))
    patients = sorted(first["patient_id"].unique())
    assert 14 <= len(patients) <= 18 and first["label"].sum() > 0
    assert patients != sorted(table["patient_id"].unique())[: len(patients)]  # not "the first 16"
    assert patients == sorted(again["patient_id"].unique())
    assert patients != sorted(other["patient_id"].unique())
    assert first.groupby("patient_id").size().eq(4).all()  # whole patients


@pytest.mark.parametrize(
    ("flags", "kept_patients"),
    [
        (("--dataset_partition", "0.5"), (19, 23)),
        (("--finite_sample_rate", "0.5"), (19, 23)),
        (("--finite-sample-rate", "0.25"), (9, 12)),
        (("--rows_experiment", "40"), (9, 11)),
    ],
)
def test_training_subsets_are_patient_level_and_seeded(flags, kept_patients) -> None:
    table = _big_table()
    full = prepare.plan(table, _args())
    subset = prepare.plan(table, _args(*flags))
    again = prepare.plan(table, _args(*flags))
    pd.testing.assert_frame_equal(subset, again)
    for role in ("valid", "test"):  # only the training split shrinks, so runs stay comparable
        assert set(subset.loc[subset["split"] == role, "image_id"]) == set(full.loc[full["split"] == role, "image_id"])
    train = subset[subset["split"] == "train"]
    assert kept_patients[0] <= train["patient_id"].nunique() <= kept_patients[1]
    assert train.groupby("patient_id").size().eq(4).all() and train["label"].sum() > 0
    assert set(train["patient_id"]) != set(
        sorted(full.loc[full["split"] == "train", "patient_id"])[: train["patient_id"].nunique()]
    )


@pytest.mark.parametrize(
    "flags",
    [
        ("--dataset_partition", "0.5", "--finite_sample_rate", "0.3"),
        ("--dataset_partition", "0.5", "--rows_experiment", "10"),
        ("--dataset_partition", "1.5"),
        ("--split", "0.5", "0.5", "0.5"),
        ("--size", "0", "10"),
        ("--max-bad-fraction", "2"),
    ],
)
def test_bad_flags_are_refused_before_ray(flags) -> None:
    with pytest.raises(ValueError):
        prepare.plan(_big_table(), _args(*flags))


@pytest.mark.parametrize(
    "flags",
    [
        ("--size", "16", "16"),  # training refuses a side under 32, and then such a cache
        ("--size", "33", "17"),
        ("--seed", "-1"),
        ("--dataset_partition", "0"),
        ("--rows_experiment", "0"),
    ],
)
def test_bad_values_name_their_flag(flags) -> None:
    with pytest.raises(ValueError, match=re.escape(flags[0])):
        prepare.plan(_big_table(), _args(*flags))


# --------------------------------------------------------------------------------------------------------
# Shard size and the reduced JPEG 2000 decode


@pytest.mark.parametrize(
    ("n_images", "shard_size", "shards"),
    [
        (1, 1, 1),
        (6, 1, 6),  # a handful of images: one per shard, so every core gets one
        (16, 1, 16),
        (48, 3, 16),  # at least 16 shards while shards are small
        (64, 4, 16),
        (300, 4, 75),  # the case fixed 256-image shards served badly: 256 + 44 on two tasks
        (10_000, 79, 127),  # about 128 shards
        (100_000, 256, 391),  # capped at 256 images
    ],
)
def test_auto_shard_size(n_images, shard_size, shards) -> None:
    assert prepare.auto_shard_size(n_images) == shard_size
    assert -(-n_images // shard_size) == shards


def test_shard_size_and_decode_flags() -> None:
    args = _args()
    assert args.shard_size is None and args.full_resolution_decode is False  # automatic size, reduced decode
    args = _args("--shard-size", "32", "--full-resolution-decode")
    assert args.shard_size == 32 and args.full_resolution_decode is True
    with pytest.raises(ValueError):
        prepare.plan(_big_table(), _args("--shard-size", "0"))


@pytest.mark.slow
def test_full_resolution_decode_builds_its_own_cache(ray_session, testdata, tmp_path) -> None:
    table = pd.DataFrame(
        {
            "image_id": ["MG1", "RG3"],
            "path": [str(testdata / "MG1_J2KI.dcm"), str(testdata / "RG3_J2KR.dcm")],
            "label": [1, 0],
            "patient_id": ["p1", "p2"],
            "exam_id": ["e1", "e2"],
            "laterality": ["L", "R"],
            "view": ["MLO", "CC"],
            "dataset": ["NEMA", "NEMA"],
            "split": ["train", "train"],
        }
    )
    out = tmp_path / "prepared"
    # Both runs write the manifests to the same --out, so each is read before the next run replaces it.
    frames = {}
    reduced = prepare.prepare_table(table, out, size=SIZE, progress=False)
    frames["reduced"] = pd.read_parquet(reduced.paths["train"])
    full = prepare.prepare_table(table, out, size=SIZE, progress=False, reduced_decode=False)
    frames["full"] = pd.read_parquet(full.paths["train"])
    assert reduced.cache_dir != full.cache_dir and full.shards_reused == 0  # the decode is part of the cache key
    assert (reduced.shard_size, reduced.shards_total) == (1, 2)  # two images, two shards: both cores work
    assert (frames["reduced"]["prep_decode_reduction"] > 0).all()
    assert (frames["full"]["prep_decode_reduction"] == 0).all()
    for name, reduced_decode in (("reduced", True), ("full", False)):
        for row in frames[name].itertuples(index=False):
            cached = cache.read_image(
                str(out / row.cache_file), row.cache_offset, row.cache_nbytes, row.cache_height, row.cache_width
            )
            expected, _ = imaging.preprocess_file(row.path, SIZE, row.laterality, reduced_decode=reduced_decode)
            np.testing.assert_array_equal(cached, expected)


# --------------------------------------------------------------------------------------------------------
# Memory: bounded tasks in flight, driver RSS flat between N and 4N images


def _reset_peak_rss() -> None:
    # Linux: "5" resets VmHWM to the current RSS. Without it the peak is the process's lifetime peak,
    # which only makes the bound looser.
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def _peak_rss_mib() -> float:
    try:
        status = Path("/proc/self/status").read_text()
        return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) / 1024
    except (OSError, AttributeError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@pytest.mark.slow
def test_driver_memory_is_bounded(ray_session, synth_set, tmp_path) -> None:
    table = _table(synth_set)
    peaks, results = {}, {}
    for n in (15, 60):
        _reset_peak_rss()
        results[n] = prepare.prepare_table(table.iloc[:n], tmp_path / f"n{n}", size=SIZE, shard_size=3, progress=False)
        peaks[n] = _peak_rss_mib()
    print(f"driver peak RSS: N=15 {peaks[15]:.0f} MiB, 4N=60 {peaks[60]:.0f} MiB")
    bound = prepare.IN_FLIGHT_PER_CPU * int(ray_session.cluster_resources()["CPU"])
    assert results[60].shards_total == 20 and results[60].peak_in_flight == bound  # streamed, not all at once
    assert peaks[60] - peaks[15] < 150  # generous: the driver holds small index frames, never pixels
    bounded = prepare.prepare_table(
        table.iloc[:12], tmp_path / "bounded", size=SIZE, shard_size=1, progress=False, max_in_flight=2
    )
    assert bounded.peak_in_flight == 2 and bounded.n_cached == 12


def test_laterality_disagreements_between_table_and_file_are_counted() -> None:
    frame = pd.DataFrame(
        {
            "image_id": ["a", "b", "c", "d", "e"],
            "laterality": ["L", "R", "L", "U", "R"],
            "prep_tag_laterality": ["R", "R", "", "L", None],
        }
    )
    assert prepare.laterality_disagreements(frame) == ["a"]
    assert prepare.laterality_disagreements(frame.drop(columns=["prep_tag_laterality"])) == []
