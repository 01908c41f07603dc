"""The ``predict`` command on a bundle built here (no Ray, no training): inputs, outputs and bad arguments."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from safetensors.torch import save_file

from mammo_ray import config, predict
from mammo_ray.train import model_from_config


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    """A bundle as export writes it: random weights for the demo's model at 64×48, its config and thresholds."""
    import torch

    folder = tmp_path_factory.mktemp("bundle")
    cfg = config.load("demo", {"data.image_size": [64, 48], "train.threshold": 0.4})
    torch.manual_seed(0)
    net = model_from_config(cfg, for_inference=True)
    save_file({key: value.contiguous() for key, value in net.state_dict().items()}, folder / "model.safetensors")
    config.save(cfg, folder / "config.yaml")
    thresholds = {
        "default": "0.3",
        "0.3": {"threshold": 0.3},
        "youden": {"threshold": 0.5},
        "provenance": {"fitted_on": "validation", "n_images": 8},  # not a threshold, and never listed as one
    }
    (folder / "thresholds.json").write_text(json.dumps(thresholds))
    return folder


@pytest.fixture(scope="module")
def dicoms(synthetic_data) -> list[Path]:
    return sorted(Path(synthetic_data["manifest_csv"]).parent.rglob("*.dcm"))[:4]


def run(bundle: Path, source: Path, out: Path, *extra: str) -> int:
    return predict.main(["--model", str(bundle), "--input", str(source), "--out", str(out), *extra])


def test_a_folder_gives_one_row_per_image_with_the_documented_columns(bundle, dicoms, tmp_path):
    """Files named by their UID (a suffix like ``.320``) are scored: the folder scan once skipped them; hidden
    folders and files that are neither DICOM nor PNG are not scored, and an unreadable .dcm gets its error row."""
    images = tmp_path / "images"
    (images / "sub").mkdir(parents=True)
    names = ["a.dcm", "IM00002", "1.2.840.113619.2.55.3.320", "sub/b.DCM"]
    for name, path in zip(names, dicoms, strict=True):
        shutil.copy(path, images / name)
    (images / "broken.dcm").write_bytes(b"not a dicom file")
    (images / "notes.txt").write_text("reader notes")
    (images / ".git").mkdir()
    (images / ".git" / "HEAD").write_text("ref: refs/heads/main")
    out = tmp_path / "scores.csv"
    assert run(bundle, images, out) == 0
    table = pd.read_csv(out, dtype={"patient_id": str, "exam_id": str})
    assert list(table.columns) == list(predict.OUTPUT_COLUMNS)
    assert sorted(table["image_id"]) == sorted([*names, "broken.dcm"])
    scored = table[table["error"].isna()]
    assert len(scored) == 4 and scored["prob"].between(0, 1).all()
    assert (scored["path"].map(lambda p: Path(p).is_file())).all()
    assert (scored["patient_id"] != "").all() and scored["laterality"].isin(["L", "R"]).all()
    assert set(scored["decision"]) <= {0, 1} and (scored["label"] == -1).all()
    assert (table["threshold"] == 0.3).all() and (table["threshold_name"].astype(str) == "0.3").all()
    broken = table[table["image_id"] == "broken.dcm"].iloc[0]
    assert broken["decision"] == -1 and np.isnan(broken["prob"]) and broken["path"].endswith("broken.dcm")
    assert not list(images.glob("*.csv"))  # nothing written into the input folder


def test_a_manifest_needs_only_image_id_and_path_and_a_blank_label_is_unknown(bundle, dicoms, tmp_path):
    frame = pd.DataFrame({"image_id": ["x", "y"], "path": [str(dicoms[0]), str(dicoms[1])], "label": [1, None]})
    frame.to_csv(tmp_path / "m.csv", index=False)
    out = tmp_path / "out" / "scores.csv"  # its folder is created
    assert run(bundle, tmp_path / "m.csv", out) == 0
    table = pd.read_csv(out)
    assert table["label"].tolist() == [1, -1]  # the blank label was INT64_MIN
    assert table["prob"].notna().all()


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_a_blank_path_in_a_manifest_is_an_error_row_and_the_rest_are_scored(bundle, dicoms, tmp_path, fmt):
    """One blank path crashed the run with a TypeError, and no CSV was written."""
    frame = pd.DataFrame({"image_id": ["a", "b", "c"], "path": [str(dicoms[0]), None, str(dicoms[1])]})
    source = tmp_path / f"m.{fmt}"
    frame.to_csv(source, index=False) if fmt == "csv" else frame.to_parquet(source)
    out = tmp_path / "scores.csv"
    assert run(bundle, source, out) == 0
    table = pd.read_csv(out, keep_default_na=False)
    assert table["image_id"].tolist() == ["a", "b", "c"]
    blank = table.iloc[1]
    # the second data row of the file, as every manifest error counts rows (it said "row 1")
    assert blank["error"] == "empty path (manifest row 2, rows numbered from 1, header not counted)"
    assert blank["decision"] == -1 and blank["path"] == ""
    assert blank["prob"] == "" and table.loc[[0, 2], "error"].eq("").all()


def test_nothing_readable_is_an_error_after_the_csv_with_the_reasons(bundle, tmp_path, capsys):
    (tmp_path / "m.csv").write_text("image_id,path\na,data/missing1.dcm\nb,data/missing2.dcm\n")
    out = tmp_path / "scores.csv"  # not in data/, the images' folder
    assert run(bundle, tmp_path / "m.csv", out) == 1
    assert pd.read_csv(out)["error"].notna().all()
    assert "no image" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("setup", "extra", "needle"),
    [
        ("empty", [], "no DICOM or PNG files"),
        ("out_is_input", [], "is the --input manifest itself"),
        ("out_in_input", [], "inside the --input folder"),
        ("out_is_folder", [], "is a folder"),
        # Before, a manifest's or a single file's image folder was not protected: this --out replaced the image.
        ("out_is_an_image", [], "a folder that holds input images"),
        ("out_beside_the_file", [], "a folder that holds input images"),
        # Before, every image was scored and then the CSV's write failed with a traceback.
        ("out_unwritable", [], "cannot write in its folder"),
        ("dup_ids", [], "appear more than once"),
        (None, ["--threshold", "5"], "must lie in [0, 1]"),
        (None, ["--threshold", "nan"], "must lie in [0, 1]"),
        (None, ["--threshold", "spec0.5"], "unknown threshold 'spec0.5'; the bundle has: 0.3, youden"),
    ],
)
def test_bad_inputs_and_outputs_are_refused_before_scoring(bundle, dicoms, tmp_path, capsys, setup, extra, needle):
    folder = tmp_path / "in"
    folder.mkdir()
    source, out = folder, tmp_path / "scores.csv"
    if setup != "empty":
        shutil.copy(dicoms[0], folder / "a.dcm")
    if setup in ("out_is_input", "dup_ids", "out_is_an_image"):
        ids = ["a", "a"] if setup == "dup_ids" else ["a", "b"]
        source = tmp_path / "m.csv"
        pd.DataFrame({"image_id": ids, "path": [str(folder / "a.dcm")] * 2}).to_csv(source, index=False)
        if setup == "out_is_input":
            out = source
    if setup == "out_in_input":
        out = folder / "scores.csv"
    if setup == "out_is_an_image":
        out = folder / "a.dcm"
    if setup == "out_beside_the_file":
        source, out = folder / "a.dcm", folder / "scores.csv"
    if setup == "out_unwritable":
        out = Path("/proc/scores.csv")  # a folder nobody, root included, can create a file in
    image = (folder / "a.dcm").read_bytes() if (folder / "a.dcm").is_file() else None
    if setup == "out_is_folder":
        out = tmp_path
    before = source.read_bytes() if source.is_file() else None
    assert run(bundle, source, out, *extra) == 2
    assert needle in capsys.readouterr().err
    if before is not None:
        assert source.read_bytes() == before
    if image is not None:
        assert (folder / "a.dcm").read_bytes() == image
    assert not (tmp_path / "scores.csv").is_file() and not (folder / "scores.csv").exists()


@pytest.mark.parametrize(
    "extra", [["--batch-size", "0"], ["--batch-size", "-1"], ["--mc-samples", "-3"], ["--device", "gpu"]]
)
def test_bad_numbers_and_devices_are_usage_errors(bundle, tmp_path, extra):
    with pytest.raises(SystemExit) as exit_info:
        run(bundle, tmp_path, tmp_path / "s.csv", *extra)
    assert exit_info.value.code == 2


def test_a_damaged_or_mismatched_bundle_names_its_file(bundle, tmp_path, capsys):
    damaged = tmp_path / "damaged"
    shutil.copytree(bundle, damaged)
    (damaged / "model.safetensors").write_bytes((bundle / "model.safetensors").read_bytes()[:100])
    other = tmp_path / "other"
    shutil.copytree(bundle, other)
    config.save(config.load(other / "config.yaml", {"model.backbone": "convnext_femto"}), other / "config.yaml")
    for folder in (damaged, other):
        assert run(folder, tmp_path, tmp_path / "s.csv") == 2
        err = capsys.readouterr().err
        assert f"{folder / 'model.safetensors'}: cannot be loaded" in err


def test_a_bundle_without_its_record_loads_unchecked_and_a_damaged_record_is_named(bundle, tmp_path, caplog, capsys):
    """Bundles exported before bundle.json existed load as before, with a warning; a record that cannot be read is
    an error naming the bundle and the record, not a pass."""
    with caplog.at_level("WARNING", logger="mammo_ray.predict"):
        predict.load_bundle(bundle)
    assert f"{bundle} has no bundle.json" in caplog.text
    damaged = tmp_path / "damaged"
    shutil.copytree(bundle, damaged)
    (damaged / "bundle.json").write_text('{"files": ')
    assert run(damaged, tmp_path, tmp_path / "s.csv") == 2
    assert f"{damaged}: bundle.json is not a bundle record" in capsys.readouterr().err


def test_the_bundles_own_threshold_applies_without_thresholds_json(bundle):
    """resolve_threshold took a default and ignored it: 0.3 whatever the bundle's train.threshold."""
    assert predict.resolve_threshold({}, None, 0.4) == ("0.4", 0.4)
    assert predict.resolve_threshold({"default": "youden", "youden": {"threshold": 0.2}}, None, 0.4) == ("youden", 0.2)
    assert predict.resolve_threshold({}, "0.25") == ("0.25", 0.25)


def test_mc_dropout_scores_repeat_run_to_run(bundle, dicoms, tmp_path):
    """The dropout masks were unseeded: two runs of the same command gave different prob and epistemic."""
    images = tmp_path / "images"
    images.mkdir()
    for path in dicoms[:2]:
        shutil.copy(path, images / path.name)
    first, second = tmp_path / "a.csv", tmp_path / "b.csv"
    assert run(bundle, images, first, "--mc-samples", "3") == 0
    assert run(bundle, images, second, "--mc-samples", "3") == 0
    assert first.read_text() == second.read_text()
    assert pd.read_csv(first)["epistemic"].notna().all()


def test_no_breast_score_without_the_woman_and_exam(bundle, dicoms, tmp_path):
    """A manifest with laterality but no patient_id/exam_id pooled every L image of the file into one breast."""
    frame = pd.DataFrame(
        {"image_id": ["a", "b", "c"], "path": [str(d) for d in dicoms[:3]], "laterality": ["L", "L", "R"]}
    )
    frame.to_csv(tmp_path / "m.csv", index=False)
    assert run(bundle, tmp_path / "m.csv", tmp_path / "s.csv") == 0
    table = pd.read_csv(tmp_path / "s.csv")
    assert table["prob"].notna().all() and table["breast_score"].isna().all()


def test_raw_files_are_made_as_the_training_cache_made_them(bundle, testdata, tmp_path):
    """A bundle trained from a 256×192 cache scores a raw file the way its training images were made: preprocessed
    at 256×192 (its JPEG 2000 level chosen for that size), then resized to the model's 64×48. Preprocessing straight
    at 64×48 picks a coarser level and resizes once, which gives other pixels."""
    import torch

    from mammo_ray import data, imaging

    source = testdata / "MG1_J2KI.dcm"
    trained = tmp_path / "bundle"
    shutil.copytree(bundle, trained)
    record = {"size": [256, 192], "reduced_decode": True, "source": "the training manifest's pixel cache"}
    (trained / "preprocessing.json").write_text(json.dumps(record))
    assert predict.read_preprocessing(trained) == record

    cached = imaging.preprocess_file(source, size=(256, 192))[0]  # what prepare --size 256 192 caches
    as_trained = data.resize_uint16(cached, (64, 48))  # what the training loop fed the model
    direct = imaging.preprocess_file(source, size=(64, 48))[0]
    assert not np.array_equal(as_trained, direct)

    assert run(trained, source, tmp_path / "scores.csv") == 0
    scores = pd.read_csv(tmp_path / "scores.csv")
    net, _, _ = predict.load_bundle(trained)
    with torch.no_grad():
        expected = torch.sigmoid(net(torch.from_numpy(data.normalise(as_trained[None] / data.PIXEL_SCALE)))).item()
    assert scores["prob"].iloc[0] == pytest.approx(expected, abs=1e-6)

    assert run(bundle, source, tmp_path / "older.csv") == 0  # a bundle without the record: as before, at 64×48
    older = pd.read_csv(tmp_path / "older.csv")["prob"].iloc[0]
    with torch.no_grad():
        before = torch.sigmoid(net(torch.from_numpy(data.normalise(direct[None] / data.PIXEL_SCALE)))).item()
    assert older == pytest.approx(before, abs=1e-6)


@pytest.mark.parametrize("text", ['{"size": [256]}', '{"reduced_decode": true}', "not json"])
def test_a_damaged_preprocessing_record_is_named(bundle, tmp_path, text):
    trained = tmp_path / "bundle"
    shutil.copytree(bundle, trained)
    (trained / "preprocessing.json").write_text(text)
    with pytest.raises(ValueError, match="preprocessing.json"):
        predict.read_preprocessing(trained)


def test_mc_dropout_prob_and_variance_come_from_the_stochastic_passes_only() -> None:
    """The dropout-off pass was stacked with the K dropout passes, which biased the mean towards it and the
    variance low (Gal & Ghahramani average stochastic passes only)."""
    import torch

    cfg = config.load("demo", {"data.image_size": [64, 48], "model.dropout": 0.5})
    torch.manual_seed(0)
    net = model_from_config(cfg, for_inference=True).eval()
    images = torch.randn(3, 1, 64, 48)
    torch.manual_seed(1)
    scored = predict.predict_tensor(net, images, mc_samples=4)
    torch.manual_seed(1)
    with torch.no_grad():
        deterministic = torch.sigmoid(net(images)[:, 0])
        predict._enable_dropout(net)
        passes = torch.stack([torch.sigmoid(net(images)[:, 0]) for _ in range(4)])
    assert np.allclose(scored["prob"], passes.mean(0).numpy(), atol=1e-6)
    assert np.allclose(scored["epistemic"], passes.var(0, unbiased=False).numpy(), atol=1e-9)
    assert np.allclose(scored["logit"], torch.logit(deterministic).numpy(), atol=1e-4)  # the loss's pass


def test_an_attenuation_heads_probability_integrates_its_noise() -> None:
    """prob was sigmoid(mu), not the likelihood E[sigmoid(mu + sigma eps)] that the attenuation loss trains."""
    import torch

    output = torch.tensor([[2.0, 3.0], [-1.0, 3.0], [0.5, -10.0], [3.0, 60.0]])
    prob = predict._probability(output).numpy()
    mu, sigma = output[:, 0], torch.exp(output[:, 1].clamp(-40, 40) / 2)
    torch.manual_seed(0)
    monte_carlo = torch.sigmoid(mu + sigma * torch.randn(200_000, 4)).mean(0).numpy()
    assert np.allclose(prob[:3], monte_carlo[:3], atol=0.02)  # probit approximation (0.881 -> 0.660 for row 0)
    assert abs(prob[0] - 0.881) > 0.2 and prob[3] == pytest.approx(0.5, abs=1e-3)
    scored = predict.predict_tensor(_FixedHead(output), torch.zeros(4, 1, 8, 8))
    assert scored["aleatoric"][3] == pytest.approx(float(np.exp(40.0)), rel=1e-5)  # clamped as the loss clamps


class _FixedHead:
    """A stand-in model that returns a fixed output, with the calls predict_tensor makes."""

    training = False

    def __init__(self, output):
        self.output = output

    def __call__(self, images):
        return self.output

    def eval(self):
        return self

    def train(self, mode=True):
        return self

    def modules(self):
        return []
