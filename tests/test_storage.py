"""Storage locations that are URIs: manifests, pixel shards and sweep checkpoints on S3 (a local moto server).

No Ray here: these are the pieces a multi-node sweep reads from a bucket, run in this process. gs:// goes
through the same code (pyarrow's GcsFileSystem) but has no local server to test against.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.fs as pafs
import pytest
from s3_server import KEY, LocalS3

from mammo_ray import cache, cli, config, export, manifest, predict, storage, train
from mammo_ray.manifest import ManifestError

SIZE = (64, 48)
ENV = {
    "AWS_ACCESS_KEY_ID": KEY,
    "AWS_SECRET_ACCESS_KEY": KEY,
    "AWS_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",  # no credential look-up on an instance-metadata address that is not there
}


@pytest.fixture(scope="module")
def s3():
    with pytest.MonkeyPatch.context() as patch:
        for key, value in ENV.items():
            patch.setenv(key, value)
        server = LocalS3()
        for bucket in ("data", "runs"):
            server.make_bucket(bucket)
        yield server
        server.stop()


# --------------------------------------------------------------------------------------------------
# Locations (no server needed).


@pytest.mark.parametrize(
    ("location", "names", "expected"),
    [
        ("s3://b/prep", ("cache", "s0.bin"), "s3://b/prep/cache/s0.bin"),
        ("s3://b/prep?endpoint_override=http%3A%2F%2Fh%3A9&scheme=http", ("x.parquet",),
         "s3://b/prep/x.parquet?endpoint_override=http%3A%2F%2Fh%3A9&scheme=http"),
        ("gs://b/a/b", ("../c",), "gs://b/a/c"),
        ("s3://b", ("runs",), "s3://b/runs"),
        ("s3://k:s@b/x?region=eu-west-1", ("y",), "s3://k:s@b/x/y?region=eu-west-1"),
    ],
)  # fmt: skip
def test_join_keeps_scheme_bucket_and_query(location: str, names: tuple[str, ...], expected: str) -> None:
    assert storage.join(location, *names) == expected


@pytest.mark.parametrize(
    ("location", "is_uri", "public", "name", "parent"),
    [
        ("s3://b/prep/train.parquet?scheme=http", True, "s3://b/prep/train.parquet?scheme=http", "train.parquet",
         "s3://b/prep?scheme=http"),
        ("s3://AKIA:secret@b/x.csv", True, "s3://b/x.csv", "x.csv", "s3://AKIA:secret@b"),
        ("gs://b/p/", True, "gs://b/p/", "p", "gs://b"),
        ("/data/prep/train.parquet", False, "/data/prep/train.parquet", "train.parquet", Path("/data/prep")),
        ("relative/train.parquet", False, "relative/train.parquet", "train.parquet", Path("relative")),
    ],
)  # fmt: skip
def test_location_parts(location: str, is_uri: bool, public: str, name: str, parent: str | Path) -> None:
    assert storage.is_uri(location) is is_uri
    assert storage.public(location) == public
    assert storage.name(location) == name
    assert storage.parent(location) == parent


def test_paths_are_never_uris() -> None:
    assert not storage.is_uri(Path("/tmp/x"))
    assert not storage.is_uri("C:\\data\\x.parquet") and not storage.is_uri("c://x")  # one letter is a drive
    assert storage.join(Path("/tmp"), "a") == Path("/tmp/a")


def test_bad_uri_option_names_the_uri_without_credentials() -> None:
    with pytest.raises(storage.StorageError, match=r"s3://b/x\?bogus=1: cannot use") as caught:
        storage.resolve("s3://user:topsecret@b/x?bogus=1")
    assert "topsecret" not in str(caught.value)


def test_resolve_gives_the_bucket_path_that_pyarrow_and_ray_use() -> None:
    uri = "s3://b/prep/cache/s0.bin?endpoint_override=http%3A%2F%2F127.0.0.1%3A9&scheme=http"
    fs, path = storage.resolve(uri)
    expected_fs, expected_path = pafs.FileSystem.from_uri(uri)
    assert path == expected_path == "b/prep/cache/s0.bin"
    assert fs.type_name == expected_fs.type_name == "s3"
    assert storage.resolve(storage.join(uri, "..", "s1.bin"))[0] is fs  # one client per bucket and options


# --------------------------------------------------------------------------------------------------
# A prepared folder (manifests + pixel shards) on the bucket.


def _write_prepared(folder: Path) -> dict[str, np.ndarray]:
    """Three split manifests (Parquet, plus train.csv) whose images sit in two shards, with relative cache paths."""
    rng = np.random.default_rng(0)
    images, rows = {}, []
    shards = {"cache/s0.bin": bytearray(), "cache/s1.bin": bytearray()}
    for split, patients in (("train", 3), ("valid", 2), ("test", 2)):
        for i in range(4 * patients):
            image_id = f"{split}-{i}"
            pixels = rng.integers(0, 65535, SIZE, dtype=np.uint16)
            shard = f"cache/s{i % 2}.bin"
            blob = cache.encode(pixels)
            rows.append(
                dict(
                    image_id=image_id,
                    path=f"/prepare-machine/images/{image_id}.dcm",  # absolute, as prepare writes: never opened
                    label=i % 2,
                    patient_id=f"{split}-p{i % patients}",
                    exam_id=f"{split}-e{i // 2}",
                    laterality="LR"[i % 2],
                    view="CC",
                    dataset="SYN",
                    split=split,
                    cache_file=shard,
                    cache_offset=len(shards[shard]),
                    cache_nbytes=len(blob),
                    cache_height=SIZE[0],
                    cache_width=SIZE[1],
                )
            )
            shards[shard] += blob
            images[image_id] = pixels
    for name, blob in shards.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(bytes(blob))
    table = pd.DataFrame(rows)
    for split in ("train", "valid", "test"):
        table[table["split"] == split].to_parquet(folder / f"{split}.parquet", index=False)
    table[table["split"] == "train"].to_csv(folder / "train.csv", index=False)
    table.drop(columns=["view"]).to_parquet(folder / "no_view.parquet", index=False)
    (folder / "broken.parquet").write_bytes(b"not a parquet file")
    table.assign(cache_file="cache/gone.bin").head(3).to_parquet(folder / "lost_shard.parquet", index=False)
    return images


@pytest.fixture(scope="module")
def prepared(s3, tmp_path_factory):
    """The prepared folder, locally and at s3://data/prep/."""
    folder = tmp_path_factory.mktemp("prepared")
    images = _write_prepared(folder)
    s3.upload(folder, "data/prep")
    return {"folder": folder, "images": images, "files": s3.files("data/prep")}


def _batch(frame: pd.DataFrame) -> dict[str, np.ndarray]:
    return {column: frame[column].to_numpy() for column in frame.columns}


@pytest.mark.parametrize("name", ["train.parquet", "train.csv"])
def test_manifest_on_s3_resolves_its_shards_next_to_it(s3, prepared, name: str) -> None:
    uri = s3.uri(f"data/prep/{name}")
    frame = manifest.read_manifest(uri, "train")
    query = uri.split("?", 1)[1]
    assert sorted(frame["cache_file"].unique()) == [s3.uri("data/prep/cache/s0.bin"), s3.uri("data/prep/cache/s1.bin")]
    assert all(value.endswith(f"?{query}") for value in frame["cache_file"])  # the endpoint travels with each row
    assert frame["path"].str.startswith("/prepare-machine/").all()  # absolute paths are kept as they are
    assert frame.attrs["source"] == uri


def test_pixels_from_s3_match_and_each_shard_opens_once_per_batch(s3, prepared, monkeypatch) -> None:
    frames = manifest.load_manifests(
        {"train": s3.uri("data/prep/train.parquet"), "valid": s3.uri("data/prep/valid.parquet")}
    )
    opened = []
    real_open = storage.open_input_file
    monkeypatch.setattr(storage, "open_input_file", lambda location: opened.append(location) or real_open(location))
    train_frame = frames["train"]
    assert train_frame["cache_file"].iloc[:4].nunique() == 2  # rows alternate between the two shards
    images = cache.read_images(_batch(train_frame))
    assert sorted(opened) == sorted(train_frame["cache_file"].unique())
    for image_id, pixels in zip(train_frame["image_id"], images, strict=True):
        np.testing.assert_array_equal(pixels, prepared["images"][image_id])
    one = train_frame.iloc[3]
    single = cache.read_image(one.cache_file, one.cache_offset, one.cache_nbytes, one.cache_height, one.cache_width)
    np.testing.assert_array_equal(single, prepared["images"][one.image_id])


@pytest.mark.parametrize(
    ("path", "needle"),
    [
        ("data/prep/nosuch.parquet", r"manifest s3://data/prep/nosuch\.parquet\?\S+ does not exist"),
        ("nobucket/prep/train.parquet", r"manifest s3://nobucket/prep/train\.parquet\?\S+ does not exist"),
        ("data/prep/no_view.parquet", r"manifest s3://data/prep/no_view\.parquet\?\S+: missing column\(s\) view"),
        ("data/prep/broken.parquet", r"manifest s3://data/prep/broken\.parquet\?\S+: cannot read it"),
        ("data/prep/lost_shard.parquet",
         r"manifest s3://data/prep/lost_shard\.parquet\?\S+: 1 missing pixel-cache shard\(s\), "
         r"e\.g\. s3://data/prep/cache/gone\.bin\?"),
    ],
)  # fmt: skip
def test_manifest_errors_name_the_uri_without_credentials(s3, prepared, path: str, needle: str) -> None:
    with pytest.raises(ManifestError, match=needle) as caught:
        manifest.load_manifests({"train": s3.uri(path, credentials=True)})
    assert f"{KEY}:{KEY}@" not in str(caught.value)


def test_patient_overlap_between_s3_manifests_is_refused(s3, prepared) -> None:
    uri = s3.uri("data/prep/train.parquet")
    with pytest.raises(ManifestError, match="appear in both train and valid.*refusing to train"):
        manifest.load_manifests({"train": uri, "valid": uri})


def test_unreachable_endpoint_names_the_manifest() -> None:
    # Port 9 (discard) on loopback refuses the connection; pyarrow retries for a few seconds, then gives up.
    uri = "s3://data/prep/train.parquet?endpoint_override=http%3A%2F%2F127.0.0.1%3A9&scheme=http"
    with pytest.raises(ManifestError, match=r"manifest s3://data/prep/train\.parquet\?\S+: cannot reach it"):
        manifest.read_manifest(uri)


def test_truncated_shard_on_s3_names_it(s3, prepared, tmp_path) -> None:
    shard = prepared["folder"] / "cache" / "s0.bin"
    with s3.fs.open_output_stream("data/cut/s0.bin") as out:
        out.write(shard.read_bytes()[:100])
    with pytest.raises(OSError, match=r"pixel cache s3://data/cut/s0\.bin\?\S+: (truncated|cannot read) .*offset 0"):
        cache.read_image(s3.uri("data/cut/s0.bin", credentials=True), 0, 500, *SIZE)


def test_reading_never_writes_to_the_data_folder(s3, prepared) -> None:
    manifest.load_manifests({"train": s3.uri("data/prep/train.parquet"), "test": s3.uri("data/prep/test.parquet")})
    assert s3.files("data/prep") == prepared["files"]


# --------------------------------------------------------------------------------------------------
# A sweep whose Train runs are on the bucket: checkpoints found there, the best one exported locally.


def _checkpoint(
    folder: Path, cfg, net, optimizer, valid: pd.DataFrame, report: dict, seed: int, history: list | None = None
) -> None:
    rng = np.random.default_rng(seed)
    predictions = valid[list(predict.PREDICTION_COLUMNS[:7])].assign(
        prob=rng.uniform(size=len(valid)), aleatoric=np.nan, epistemic=np.nan
    )
    folder.mkdir(parents=True)
    train._write_checkpoint(
        folder,
        model=net,
        optimizer=optimizer,
        epoch=report["epoch"],
        history=history or [report],
        config_yaml=config.dump(cfg),
        predictions=predictions,
        metrics={},
        report=report,
    )


def test_export_takes_the_curves_of_every_epoch_from_the_runs_latest_checkpoint(prepared, tmp_path) -> None:
    """The best epoch's checkpoint holds the history up to it; the run's latest (which Ray keeps) holds every epoch.
    The demo's bundle drew 2 of its trial's 8 epochs, so the drop after the selected epoch was not shown."""
    cfg = config.load("demo")
    cli.apply_smoke_test(cfg)
    net = train.model_from_config(cfg)
    optimizer = train.build_optimizer("adamw", [{"params": list(net.parameters()), "weight_decay": 0.0}], 1e-3)
    valid = manifest.read_manifest(prepared["folder"] / "valid.parquet", "valid")
    reports = [{"epoch": e, "val_auc": auc, "val_loss": 0.5} for e, auc in enumerate([0.6, 0.7, 0.55, 0.52], 1)]
    runs = tmp_path / "exp" / export.TRAIN_RUNS / "trial_a"
    for name, upto in (("checkpoint_001", 2), ("checkpoint_003", 4), ("checkpoint_000", 1)):
        _checkpoint(runs / name, cfg, net, optimizer, valid, reports[upto - 1], upto, history=reports[:upto])
    (tmp_path / "exp" / "config.yaml").write_text(config.dump(cfg))
    assert export.last_checkpoint(tmp_path / "exp", runs / "checkpoint_001") == runs / "checkpoint_003"
    out = tmp_path / "bundle"
    assert export.main(["--experiment", str(tmp_path / "exp"), "--out", str(out), "--bootstrap", "20"]) == 0
    assert json.loads((out / "metrics.json").read_text())["selected"]["epoch"] == 2
    assert pd.read_csv(out / "history.csv")["epoch"].tolist() == [1, 2, 3, 4]
    # A latest history that does not reach the selected epoch (another run's, damaged) is not trusted.
    shutil.rmtree(runs / "checkpoint_003")  # written whole (a history edited afterwards is a damaged checkpoint)
    _checkpoint(runs / "checkpoint_003", cfg, net, optimizer, valid, reports[3], 4, history=reports[2:])
    assert export.main(["--experiment", str(tmp_path / "exp"), "--out", str(out), "--bootstrap", "20"]) == 0
    assert pd.read_csv(out / "history.csv")["epoch"].tolist() == [1, 2]


@pytest.fixture(scope="module")
def s3_experiment(s3, prepared, tmp_path_factory):
    """A finished sweep's layout on s3://runs/mr/exp1: two trials' checkpoints, one of them half-uploaded."""
    cfg = config.load("demo")
    cli.apply_smoke_test(cfg)
    cfg.name = "exp1"
    net = train.model_from_config(cfg)
    optimizer = train.build_optimizer("adamw", [{"params": list(net.parameters()), "weight_decay": 0.0}], 1e-3)
    valid = manifest.read_manifest(prepared["folder"] / "valid.parquet", "valid")
    root = tmp_path_factory.mktemp("experiment") / "exp1"
    runs = root / export.TRAIN_RUNS
    reports = {
        ("trial_a", "checkpoint_000"): {"epoch": 1, "val_auc": 0.61, "val_loss": 0.70},
        ("trial_a", "checkpoint_001"): {"epoch": 2, "val_auc": 0.74, "val_loss": 0.66},
        ("trial_b", "checkpoint_000"): {"epoch": 1, "val_auc": 0.69, "val_loss": 0.58},
        ("trial_b", "checkpoint_001"): {"epoch": 2, "val_auc": 0.99, "val_loss": 0.10},  # upload unfinished
    }
    for seed, ((run, name), report) in enumerate(reports.items()):
        _checkpoint(runs / run / name, cfg, net, optimizer, valid, report, seed)
    (runs / "trial_b" / "checkpoint_001" / "model.safetensors").unlink()
    (root / "config.yaml").write_text(config.dump(cfg))
    (root / "manifests.json").write_text(json.dumps({"test": storage.public(s3.uri("data/prep/test.parquet"))}))
    s3.upload(root, "runs/mr/exp1")
    return {"uri": s3.uri("runs/mr/exp1"), "reports": reports}


@pytest.mark.parametrize(
    ("metric", "mode", "expected"),
    [("val_auc", "max", "trial_a/checkpoint_001"), ("val_loss", "min", "trial_b/checkpoint_000")],
)
def test_best_checkpoint_on_s3(s3_experiment, metric: str, mode: str, expected: str) -> None:
    uri = s3_experiment["uri"]
    table = export.find_checkpoints(uri)
    assert len(table) == 3  # the checkpoint without weights is still being uploaded: skipped
    assert set(table["run"]) == {"trial_a", "trial_b"}
    best = export.best_checkpoint(uri, metric, mode)
    assert best == storage.join(uri, export.TRAIN_RUNS, *expected.split("/"))


def test_export_command_downloads_only_the_best_checkpoint_from_s3(s3_experiment, prepared, tmp_path, monkeypatch):
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))  # where the downloaded checkpoint goes, briefly
    fetched = []
    real_download = storage.download
    monkeypatch.setattr(storage, "download", lambda *a: fetched.append((a[0], tuple(a[1]))) or real_download(*a))
    monkeypatch.chdir(tmp_path)
    uri = s3_experiment["uri"]
    assert export.main(["--experiment", uri, "--bootstrap", "20"]) == 0
    best = storage.join(uri, export.TRAIN_RUNS, "trial_a", "checkpoint_001")
    assert fetched == [(best, export.CHECKPOINT_FILES)]  # one checkpoint, and not its optimiser state
    bundle = tmp_path / "results" / "exp1" / "best"  # a URI experiment exports to the local results/<name>/best
    metrics = json.loads((bundle / "metrics.json").read_text())
    assert metrics["selected"]["checkpoint"] == best and metrics["selected"]["epoch"] == 2
    # The test manifest recorded by the sweep is on the bucket too; its pixels were read from there.
    test = pd.read_csv(bundle / "test_predictions.csv")
    assert sorted(test["image_id"]) == sorted(i for i in prepared["images"] if i.startswith("test-"))
    assert not any(scratch.iterdir())  # the download is gone


def test_export_through_the_local_pointer(s3_experiment, tmp_path) -> None:
    """``export --experiment results/<name>`` finds the checkpoints a URI sweep left on the bucket."""
    local = tmp_path / "exp1"
    local.mkdir()
    (local / export.STORAGE_POINTER).write_text(json.dumps({"experiment": s3_experiment["uri"]}))
    assert export.main(["--experiment", str(local), "--metric", "val_loss", "--mode", "min", "--bootstrap", "20"]) == 0
    metrics = json.loads((local / "best" / "metrics.json").read_text())
    assert metrics["selected"]["report"]["val_loss"] == pytest.approx(0.58)
    assert "test" not in metrics  # no manifests.json beside the pointer and no --test: validation only


def test_export_of_an_empty_s3_experiment_names_it(s3, capsys) -> None:
    assert export.main(["--experiment", s3.uri("runs/nothing-here", credentials=True)]) == 2
    err = capsys.readouterr().err
    assert "s3://runs/nothing-here?" in err and "no finished checkpoints under train_runs/" in err
    assert f"{KEY}:{KEY}@" not in err


def test_write_read_and_delete_on_s3(s3) -> None:
    folder = s3.uri("runs/scratch/sweep", credentials=True)
    target = storage.join(folder, "sub", "config.yaml")
    assert not storage.exists(folder)
    storage.write_text(target, "name: x\n")
    assert storage.is_file(target) and storage.exists(folder) and not storage.is_file(folder)
    assert storage.read_text(target) == "name: x\n"
    assert storage.missing([target, storage.join(folder, "sub", "nope.yaml")]) == [
        storage.join(folder, "sub", "nope.yaml")
    ]
    storage.delete_dir(folder)
    assert not storage.exists(folder) and s3.files("runs/scratch") == []
    storage.delete_dir(folder)  # already gone: nothing to do


def test_check_reachable(s3) -> None:
    storage.check_reachable(s3.uri("runs/not/yet/there"))  # a missing prefix is fine: Ray creates it
    storage.check_reachable("/any/local/path")  # local paths are Ray's and the file system's business
    with pytest.raises(storage.StorageError, match=r"s3://nobucket/x\?\S+: bucket 'nobucket' does not exist"):
        storage.check_reachable(s3.uri("nobucket/x", credentials=True))


class _RefusingFileSystem(pafs.LocalFileSystem):
    """Answers every lookup the way pyarrow's object-store file systems report an HTTP 403."""

    def get_file_info(self, paths):
        raise OSError("google::cloud::Status(PERMISSION_DENIED: Permission denied)")


@pytest.mark.parametrize(
    ("location", "names_bucket_permission"),
    [
        ("gs://mammo/mammo-ray", True),  # the probe reads the bucket's metadata: storage.buckets.get
        ("gcs://mammo/mammo-ray", True),
        ("s3://mammo/mammo-ray", False),
    ],
)
def test_check_reachable_on_refused_access_names_what_gcs_needs(monkeypatch, location, names_bucket_permission) -> None:
    """roles/storage.objectAdmin, which `ray up` gives its GCP service account, lacks storage.buckets.get."""
    monkeypatch.setattr(storage, "resolve", lambda loc: (_RefusingFileSystem(), "mammo/mammo-ray"))
    with pytest.raises(storage.StorageError, match=rf"^{location}: cannot reach it \(.*PERMISSION_DENIED") as caught:
        storage.check_reachable(location)
    assert ("storage.buckets.get" in str(caught.value)) == names_bucket_permission


# --------------------------------------------------------------------------------------------------
# A multi-node cluster without --storage is refused (ray.nodes() stubbed: no Ray started here).


@pytest.mark.parametrize(
    ("started_here", "storage_arg", "alive", "refused"),
    [
        (False, None, 2, True),  # joined with --address, or through RAY_ADDRESS (a `ray job submit` driver)
        (False, None, 3, True),
        (False, None, 1, False),  # one node: the local results folder is that node's disk
        (False, "s3://runs/mammo-ray", 2, False),
        (True, None, 2, False),  # a local Ray started by tune itself
    ],
)
def test_multi_node_cluster_without_storage_is_refused(monkeypatch, started_here, storage_arg, alive, refused) -> None:
    """The check once ran only with --address, so a job-submitted driver joining through RAY_ADDRESS skipped it."""
    import argparse

    import ray

    from mammo_ray import cli, tune

    nodes = [{"Alive": True}] * alive + [{"Alive": False}]
    monkeypatch.setattr(ray, "nodes", lambda: nodes)
    monkeypatch.setattr(cli, "_STARTED_HERE", started_here)
    monkeypatch.setenv("RAY_ADDRESS", "head:6379")
    args = argparse.Namespace(address=None, storage=storage_arg, results="results")
    if not refused:
        tune.check_storage(args)
        return
    with pytest.raises(ValueError, match=rf"the cluster at head:6379 has {alive} nodes but results would go to the "
                                         r"local folder results: pass --storage s3://…, gs://…"):  # fmt: skip
        tune.check_storage(args)
        return
    with pytest.raises(ValueError, match=rf"has {alive} nodes but results would go to the local folder results: "
                                         r"pass --storage s3://…, gs://…"):  # fmt: skip
        tune.check_storage(args)


def test_train_refuses_its_local_out_dir_on_a_joined_multi_node_cluster(monkeypatch, tmp_path, capsys) -> None:
    """train has no --storage: on a multi-node cluster its run folder on this machine failed at the first
    checkpoint of a worker on another node."""
    import ray

    from mammo_ray import cli, config, train

    monkeypatch.setattr(cli, "start_ray", lambda *a, **k: {})
    monkeypatch.setattr(cli, "_STARTED_HERE", False)
    monkeypatch.setattr(ray, "nodes", lambda: [{"Alive": True}] * 2)
    monkeypatch.setenv("RAY_ADDRESS", "head:6379")
    assert train.run_single(config.load("demo"), {}, tmp_path / "run", address=None) == 2
    err = capsys.readouterr().err
    assert "the cluster at head:6379 has 2 nodes" in err and "use tune with --storage" in err


def test_the_bundle_records_how_its_training_images_were_made(prepared, tmp_path) -> None:
    """predict makes raw files at the training cache's size with its decode setting (preprocessing.json)."""
    cfg = config.load("demo", {"data.image_size": [32, 32]})
    train = manifest.read_manifest(prepared["folder"] / "train.parquet", "train")
    record = export.preprocessing_record(cfg, {"train": train})
    assert record["size"] == list(SIZE) and record["reduced_decode"] is True  # no settings.json: the rows' size
    copy = tmp_path / "prepared"
    shutil.copytree(prepared["folder"], copy)
    (copy / "cache" / "settings.json").write_text(json.dumps({"size": list(SIZE), "reduced_decode": False}))
    train = manifest.read_manifest(copy / "train.parquet", "train")
    assert export.preprocessing_record(cfg, {"train": train})["reduced_decode"] is False  # --full-resolution-decode
    # Two manifests prepared differently and joined: the larger share decides, and the record lists both.
    joined = pd.concat(
        [train, manifest.read_manifest(prepared["folder"] / "valid.parquet", "valid")], ignore_index=True
    )
    mixed = export.preprocessing_record(cfg, {"train": joined})
    assert mixed["reduced_decode"] is False and len(mixed["caches"]) == 2
    cfg.data.use_cache = False
    assert export.preprocessing_record(cfg, {"train": train})["size"] == [32, 32]  # decoded on the fly
    assert "not at hand" in export.preprocessing_record(cfg, {})["source"]
