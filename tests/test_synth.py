"""Tests for mammo_ray.synth: DICOM headers and pixels, CSV layouts, labels and prevalence, reproducibility,
the complete-marker / atomic-rename behaviour, and that cancers are findable by morphology but not by
global image statistics."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from scipy import ndimage
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import GroupKFold, cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from mammo_ray import synth

SMOKE = {"patients": synth.SMOKE_PATIENTS, "size": synth.SMOKE_SIZE, "prevalence": 0.05, "seed": 0}
# Big enough for AUCs with a few dozen positive breasts, small enough to generate in about a second.
STUDY = {"patients": 60, "size": (256, 208), "prevalence": 0.2, "seed": 1}


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, pd.DataFrame]:
    out = tmp_path_factory.mktemp("synth") / "smoke"
    summary = synth.generate(out, progress=False, **SMOKE)
    return out, summary, pd.read_csv(summary["manifest_csv"])


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, pd.DataFrame]:
    out = tmp_path_factory.mktemp("synth") / "study"
    summary = synth.generate(out, progress=False, **STUDY)
    return out, pd.read_csv(summary["manifest_csv"])


def read(out: Path, relative: str) -> pydicom.Dataset:
    return pydicom.dcmread(out / relative)


def display(ds: pydicom.Dataset) -> np.ndarray:
    """Stored values to [0, 1] with bright = dense (modality LUT, bit depth, MONOCHROME1 inverted)."""
    values = ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    values /= 2**ds.BitsStored - 1
    return 1 - values if ds.PhotometricInterpretation == "MONOCHROME1" else values


# --------------------------------------------------------------------------------------------------------
# Layout, headers, pixels


def test_summary_matches_files(smoke: tuple[Path, dict, pd.DataFrame]) -> None:
    out, summary, manifest = smoke
    assert set(summary) >= {
        "n_images",
        "n_positive_images",
        "n_patients",
        "n_exams",
        "manifest_csv",
        "embed_csv",
        "reference_csv",
        "dicom_dir",
    }
    assert summary["n_images"] == len(manifest) == 4 * summary["n_exams"]
    assert summary["n_positive_images"] == manifest["label"].sum()
    assert summary["n_patients"] == manifest["patient_id"].nunique() == SMOKE["patients"]
    assert summary["n_exams"] == manifest["exam_id"].nunique()
    assert Path(summary["dicom_dir"]) == out / "dicom"
    dicoms = sorted(p.relative_to(out).as_posix() for p in (out / "dicom").rglob("*.dcm"))
    assert dicoms == sorted(manifest["path"])
    for path, row in zip(manifest["path"], manifest.itertuples(), strict=True):
        assert path == f"dicom/{row.patient_id}/{row.exam_id}/{row.image_id}.dcm"
    marker = json.loads((out / synth.MARKER_FILE).read_text())
    assert marker["params"]["patients"] == SMOKE["patients"]


@pytest.mark.parametrize(
    ("csv_key", "columns"),
    [
        ("manifest_csv", synth.MANIFEST_COLUMNS),
        ("embed_csv", synth.EMBED_COLUMNS),
        ("embed_clinical_csv", synth.EMBED_CLINICAL_COLUMNS),
        ("reference_csv", synth.REFERENCE_COLUMNS),
    ],
)
def test_csv_columns(smoke: tuple[Path, dict, pd.DataFrame], csv_key: str, columns: tuple[str, ...]) -> None:
    frame = pd.read_csv(smoke[1][csv_key])
    assert tuple(frame.columns) == columns
    assert len(frame)


def test_tables_agree(smoke: tuple[Path, dict, pd.DataFrame]) -> None:
    _, summary, manifest = smoke
    embed = pd.read_csv(summary["embed_csv"])
    reference = pd.read_csv(summary["reference_csv"])
    clinical = pd.read_csv(summary["embed_clinical_csv"])
    assert list(embed["anon_dicom_path"]) == list(manifest["path"]) == list(reference["path_eq"])
    assert list(embed["cancer"]) == list(manifest["label"]) == list(reference["cancer"])
    assert (reference["datasettype"] == "SYNTH").all() and (manifest["dataset"] == "SYNTH").all()
    assert list(embed["ImageLateralityFinal"]) == list(manifest["laterality"])
    assert list(embed["ViewPosition"]) == list(manifest["view"])
    assert embed["tissueden"].isin([1, 2, 3, 4]).all()
    assert list(manifest["density"]) == ["ABCD"[d - 1] for d in embed["tissueden"]]
    assert set(manifest["birads"]) <= set(range(7))
    # Cancers carry a malignant pathology code on their exam's clinical rows; nothing else does.
    malignant = clinical[clinical["path_severity"].isin([0, 1])]
    positive = manifest[manifest["label"] == 1]
    assert len(malignant) == positive.groupby(["exam_id", "laterality"]).ngroups
    assert set(clinical["acc_anon"]) == set(embed["acc_anon"])


EXPECTED_HEADER = [
    ("Modality", "MG"),
    ("SOPClassUID", "1.2.840.10008.5.1.4.1.1.1.2"),
    ("PresentationIntentType", "FOR PRESENTATION"),
    ("BitsAllocated", 16),
    ("PixelRepresentation", 0),
    ("SamplesPerPixel", 1),
    ("RescaleSlope", 1),
    ("RescaleIntercept", 0),
    ("BurnedInAnnotation", "YES"),
]


@pytest.mark.parametrize(("keyword", "expected"), EXPECTED_HEADER)
def test_fixed_header_fields(smoke: tuple[Path, dict, pd.DataFrame], keyword: str, expected: object) -> None:
    out, _, manifest = smoke
    for path in manifest["path"][::7]:
        assert read(out, path).get(keyword) == expected


def test_per_image_header_fields(smoke: tuple[Path, dict, pd.DataFrame]) -> None:
    out, _, manifest = smoke
    study_uids: dict[str, set[str]] = {}
    sop_uids = set()
    for row in manifest.itertuples():
        ds = read(out, row.path)
        assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert ds.PatientID == row.patient_id
        assert ds.ImageLaterality == row.laterality
        assert ds.ViewPosition == row.view
        assert ds.Manufacturer == row.manufacturer
        assert ds.PatientAge == f"{row.age:03d}Y"
        assert ds.BitsStored in (12, 14, 16)
        assert ds.HighBit == ds.BitsStored - 1
        assert (ds.Rows, ds.Columns) == SMOKE["size"]
        assert float(ds.PixelSpacing[0]) == pytest.approx(240.0 / SMOKE["size"][0], rel=1e-4)
        assert ds.PhotometricInterpretation in ("MONOCHROME1", "MONOCHROME2")
        study_uids.setdefault(row.exam_id, set()).add(ds.StudyInstanceUID)
        sop_uids.add(ds.SOPInstanceUID)
    assert all(len(uids) == 1 for uids in study_uids.values())
    assert len({next(iter(u)) for u in study_uids.values()}) == len(study_uids)
    assert len(sop_uids) == len(manifest)


def test_header_variety(study: tuple[Path, pd.DataFrame]) -> None:
    """A multi-vendor archive: all bit depths, both photometric interpretations, files with and without windows."""
    out, manifest = study
    headers = [read(out, path) for path in manifest["path"]]
    photometric = pd.Series([ds.PhotometricInterpretation for ds in headers])
    assert set(photometric) == {"MONOCHROME1", "MONOCHROME2"}
    assert 0.08 < (photometric == "MONOCHROME1").mean() < 0.4
    assert {ds.BitsStored for ds in headers} == {12, 14, 16}
    windowed = np.array(["WindowCenter" in ds for ds in headers])
    assert 0.7 < windowed.mean() < 1.0
    assert {ds.get("VOILUTFunction") for ds in headers} >= {"LINEAR", "SIGMOID", None}
    assert manifest["manufacturer"].nunique() >= 3


def test_pixels_read_back(smoke: tuple[Path, dict, pd.DataFrame]) -> None:
    out, _, manifest = smoke
    seen = set()
    for row in manifest.itertuples():
        ds = read(out, row.path)
        pixels = ds.pixel_array
        assert pixels.dtype == np.uint16 and pixels.shape == SMOKE["size"]
        top = 2**ds.BitsStored - 1
        assert pixels.max() <= top
        # The burned-in marker is white on screen: the top value, or 0 for MONOCHROME1.
        white = 0 if ds.PhotometricInterpretation == "MONOCHROME1" else top
        assert (pixels == white).sum() > 20
        # Air is dark on screen: low stored values for MONOCHROME2, high ones for MONOCHROME1.
        air = np.median(display(ds)[-10:, :])
        assert air < 0.15
        if "WindowCenter" in ds:
            center = float(np.atleast_1d(ds.WindowCenter)[0])
            assert 0 < center < top
        seen.add(ds.PhotometricInterpretation)
    assert seen == {"MONOCHROME1", "MONOCHROME2"}


def test_orientation_as_stored(smoke: tuple[Path, dict, pd.DataFrame]) -> None:
    """Left breasts have the chest wall on the left edge, right breasts on the right: preprocessing must flip."""
    out, _, manifest = smoke
    for row in manifest.itertuples():
        image = display(read(out, row.path))
        band = image.shape[1] // 10
        # Compare the middle rows only: the burned-in marker sits in a corner on the nipple side.
        middle = image[image.shape[0] // 4 : 3 * image.shape[0] // 4]
        left, right = middle[:, :band].mean(), middle[:, -band:].mean()
        assert (left > right) == (row.laterality == "L"), row.image_id


def test_exam_structure(smoke: tuple[Path, dict, pd.DataFrame]) -> None:
    manifest = smoke[2]
    per_exam = manifest.groupby("exam_id")[["laterality", "view"]].apply(
        lambda frame: sorted(zip(frame["laterality"], frame["view"], strict=True))
    )
    assert all(views == [("L", "CC"), ("L", "MLO"), ("R", "CC"), ("R", "MLO")] for views in per_exam)
    exams_per_patient = manifest.groupby("patient_id")["exam_id"].nunique()
    assert exams_per_patient.between(1, 3).all() and exams_per_patient.nunique() > 1
    counts = manifest.groupby(["laterality", "view"]).size()
    assert counts.nunique() == 1 and len(counts) == 4


def test_positive_breasts_have_both_views_labelled(study: tuple[Path, pd.DataFrame]) -> None:
    manifest = study[1]
    breasts = manifest.groupby(["exam_id", "laterality"])
    assert (breasts["label"].nunique() == 1).all()
    assert (breasts["view"].apply(sorted).map(tuple) == ("CC", "MLO")).all()


@pytest.mark.parametrize(
    ("patients", "prevalence", "expected_positive_breasts"),
    [
        (12, 0.0, 0),
        (12, 0.01, synth.MIN_POSITIVE_BREASTS),  # any cancers at all: at least two
        (12, 1.0, None),  # every breast
        (200, 0.05, None),
        (200, 0.3, None),
    ],
)
def test_prevalence(patients: int, prevalence: float, expected_positive_breasts: int | None) -> None:
    """The positive share of breasts is the requested prevalence (the plan is checked; nothing is rendered)."""
    plan = synth._plan(0, patients, prevalence, bank_size=8)
    n_breasts = sum(2 * len(p.exams) for p in plan)
    n_positive = sum(len(e.cancer) for p in plan for e in p.exams)
    if expected_positive_breasts is not None:
        assert n_positive == expected_positive_breasts
    else:
        assert n_positive == round(prevalence * n_breasts)
    assert all(f.malignant for p in plan for e in p.exams for f in e.cancer.values())


def test_prevalence_in_written_set(smoke: tuple[Path, dict, pd.DataFrame], study: tuple[Path, pd.DataFrame]) -> None:
    for manifest, prevalence in ((smoke[2], SMOKE["prevalence"]), (study[1], STUDY["prevalence"])):
        breasts = manifest.groupby(["exam_id", "laterality"])["label"].first()
        assert breasts.sum() >= synth.MIN_POSITIVE_BREASTS
        assert abs(breasts.mean() - prevalence) <= max(0.02, 1 / len(breasts))


# --------------------------------------------------------------------------------------------------------
# Reproducibility and the complete marker


def _fingerprint(out: Path) -> dict[str, bytes]:
    files = {p.name: p.read_bytes() for p in out.glob("*.csv")}
    for path in sorted((out / "dicom").rglob("*.dcm")):
        files[path.name] = read(out, path.relative_to(out).as_posix()).pixel_array.tobytes()
    return files


def test_same_seed_same_data(tmp_path: Path) -> None:
    params = {"patients": 3, "size": (96, 80), "prevalence": 0.3, "progress": False}
    first = _fingerprint(Path(synth.generate(tmp_path / "a", seed=5, **params)["dicom_dir"]).parent)
    second = _fingerprint(Path(synth.generate(tmp_path / "b", seed=5, **params)["dicom_dir"]).parent)
    other = _fingerprint(Path(synth.generate(tmp_path / "c", seed=6, **params)["dicom_dir"]).parent)
    assert first == second
    pixels = [name for name in first if name.endswith(".dcm")]
    assert pixels and any(first[name] != other.get(name) for name in pixels)


def test_mass_masking_hides_masses_behind_dense_tissue(monkeypatch: pytest.MonkeyPatch) -> None:
    """The probe knob ``_MASS_MASKING`` (off in the shipped data) scales a mass's added density by the local fat
    share: never brighter than the unmasked mass, darker over glands, and no change to a breast without a mass."""
    plan = synth._plan(0, 40, 0.3, 8)
    canvas = synth._Canvas((256, 208), 0, 8)

    def render(patient: synth._Patient, exam: synth._Exam, side: str) -> np.ndarray:
        rng = synth._rng(0, 3, patient.index, exam.number, 0, 0)
        return synth._render(canvas, rng, patient, patient.breasts[side], exam, side, "CC", 0).copy()

    cases = [(p, e, side) for p in plan for e in p.exams for side in synth._SIDES]
    mass = next(c for c in cases if c[1].cancer.get(c[2]) and c[1].cancer[c[2]].kind == "spiculated_mass")
    plain = next(c for c in cases if not c[1].cancer.get(c[2]) and not c[0].breasts[c[2]].benign)
    shipped = render(*mass), render(*plain)
    monkeypatch.setattr(synth, "_MASS_MASKING", 1.0)
    masked = render(*mass), render(*plain)
    assert (masked[0] <= shipped[0] + 1e-6).all()
    assert (shipped[0] - masked[0]).max() > 0.05
    np.testing.assert_array_equal(masked[1], shipped[1])


def test_patients_do_not_depend_on_cohort_size() -> None:
    small, large = synth._plan(3, 5, 0.0, 8), synth._plan(3, 9, 0.0, 8)
    assert [p.exams[0].study_date for p in small] == [p.exams[0].study_date for p in large[:5]]


def test_complete_folder_is_reused(smoke: tuple[Path, dict, pd.DataFrame]) -> None:
    out, summary, _ = smoke
    before = (out / "manifest.csv").stat().st_mtime_ns
    again = synth.generate(out, progress=False, **SMOKE)
    assert again == summary
    assert (out / "manifest.csv").stat().st_mtime_ns == before


@pytest.mark.parametrize(
    "change",
    [{"patients": 13}, {"prevalence": 0.1}, {"size": (128, 96)}, {"seed": 1}],
)
def test_other_parameters_are_refused(smoke: tuple[Path, dict, pd.DataFrame], change: dict) -> None:
    out = smoke[0]
    with pytest.raises(FileExistsError, match=str(out)):
        synth.generate(out, progress=False, **{**SMOKE, **change})


def test_crash_leaves_nothing_to_trust(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "crash"
    written = []

    def failing_write(path: object, ds: object, **kwargs: object) -> None:
        if len(written) == 5:
            raise OSError("disk full (simulated)")
        written.append(path)
        original(path, ds, **kwargs)

    original = pydicom.dcmwrite
    monkeypatch.setattr(synth.pydicom, "dcmwrite", failing_write)
    with pytest.raises(OSError, match="simulated"):
        synth.generate(out, patients=2, size=(96, 80), progress=False)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []  # the partial folder is gone too
    monkeypatch.undo()
    summary = synth.generate(out, patients=2, size=(96, 80), progress=False)
    assert (out / synth.MARKER_FILE).is_file() and summary["n_images"] >= 8


def test_a_complete_folder_missing_one_of_its_tables_is_not_reused(tmp_path: Path) -> None:
    out = tmp_path / "set"
    synth.generate(out, patients=1, size=(96, 80), progress=False)
    (out / "clinical_embed.csv").unlink()  # --source embed needs it
    with pytest.raises(FileExistsError, match="lacks embed_clinical_csv"):
        synth.generate(out, patients=1, size=(96, 80), progress=False)


def test_the_floor_of_two_cancers_is_said(capsys: pytest.CaptureFixture[str]) -> None:
    plan = synth._plan(0, 1, 0.01, 8)
    assert sum(len(exam.cancer) for patient in plan for exam in patient.exams) == 2
    assert "gives 0 cancer(s); drawing 2" in capsys.readouterr().err
    synth._plan(0, 100, 0.05, 8)
    assert capsys.readouterr().err == ""


def test_stale_partial_of_dead_process_is_removed(tmp_path: Path) -> None:
    out = tmp_path / "set"
    stale = synth._partial_name(out).with_name(synth._partial_name(out).name.rsplit("-", 1)[0] + "-999999999")
    (stale / "dicom").mkdir(parents=True)
    synth.generate(out, patients=1, size=(96, 80), progress=False)
    assert not stale.exists() and (out / synth.MARKER_FILE).is_file()


@pytest.mark.parametrize("content", ["empty", "foreign", "file"])
def test_existing_output_without_marker(tmp_path: Path, content: str) -> None:
    out = tmp_path / "out"
    if content == "file":
        out.write_text("not a folder")
    else:
        out.mkdir()
        if content == "foreign":
            (out / "notes.txt").write_text("someone else's")
    if content == "empty":
        summary = synth.generate(out, patients=1, size=(96, 80), progress=False)
        assert Path(summary["manifest_csv"]).is_file()
    else:
        with pytest.raises(FileExistsError, match=str(out)):
            synth.generate(out, patients=1, size=(96, 80), progress=False)


@pytest.mark.parametrize(
    "bad",
    [{"patients": 0}, {"prevalence": 1.5}, {"prevalence": -0.1}, {"size": (32, 32)}, {"size": (128,)}, {"seed": -1}],
)
def test_invalid_parameters(tmp_path: Path, bad: dict) -> None:
    with pytest.raises(ValueError):
        synth.generate(tmp_path / "x", progress=False, **bad)
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize(
    ("patients", "prevalence", "size"),
    [(1, 1.0, synth.MIN_SIZE), (2, 0.0, (96, 200)), (2, 1.0, (200, 96))],
    ids=["smallest-all-positive", "wide-all-negative", "tall-all-positive"],
)
def test_degenerate_sets(tmp_path: Path, patients: int, prevalence: float, size: tuple[int, int]) -> None:
    summary = synth.generate(tmp_path / "x", patients=patients, prevalence=prevalence, size=size, progress=False)
    manifest = pd.read_csv(summary["manifest_csv"])
    assert set(manifest["label"]) == {int(prevalence)}
    for path in manifest["path"]:
        assert read(tmp_path / "x", path).pixel_array.shape == size


def test_main_smoke_test(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli"
    assert synth.main(["--out", str(out), "--smoke-test", "--quiet"]) == 0
    summary = json.loads(capsys.readouterr().out)
    manifest = pd.read_csv(summary["manifest_csv"])
    assert manifest["patient_id"].nunique() == synth.SMOKE_PATIENTS
    assert manifest.groupby(["exam_id", "laterality"])["label"].first().sum() >= 2
    assert read(out, manifest["path"][0]).Rows == synth.SMOKE_SIZE[0]
    # Same command again: reused. Other parameters on the same folder: a clear error, exit status 2.
    assert synth.main(["--out", str(out), "--smoke-test", "--quiet"]) == 0
    assert synth.main(["--out", str(out), "--smoke-test", "--seed", "3", "--quiet"]) == 2
    assert str(out) in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------------
# Learnable but not trivial


def quantiles(values: np.ndarray, fractions: list[float]) -> list[float]:
    """Order statistics by one partial sort (np.percentile sorts once per call and is several times slower)."""
    ranks = [min(len(values) - 1, int(round(f * (len(values) - 1)))) for f in fractions]
    return list(np.partition(values, ranks)[ranks])


def breast_mask(image: np.ndarray) -> np.ndarray:
    """Largest bright component: what a breast crop keeps (the marker and air drop out)."""
    low, middle = quantiles(image.ravel(), [0.05, 0.5])
    labels, count = ndimage.label(image > 0.5 * (low + middle))
    if count == 0:
        return np.zeros(image.shape, dtype=bool)
    return labels == 1 + int(np.argmax(np.bincount(labels.ravel())[1:]))


def global_features(image: np.ndarray, mask: np.ndarray) -> list[float]:
    """Whole-image and breast-region intensity statistics: mean, spread, extremes and histogram moments."""
    features = []
    for values in (image.ravel(), image[mask]):
        mean, std = values.mean(), values.std() + 1e-9
        standard = (values - mean) / std
        squared = standard * standard  # products, not **: float powers are slow
        features += [
            mean,
            std,
            values.max(),
            *quantiles(values, [0.01, 0.5, 0.99, 0.999]),
            (squared * standard).mean(),  # skewness
            (squared * squared).mean() - 3,  # kurtosis
        ]
    return features


def lesion_features(image: np.ndarray, mask: np.ndarray) -> list[float]:
    """A local-maximum feature at the scale of a calcification cluster, on at most 256 rows: the largest number
    of bright specks (pixels well above their 3x3 neighbourhood) within one cluster-sized window inside the
    breast. Blob (mass) detectors are no use here by design: benign masses are as common, as large and as
    bright as the malignant ones."""
    factor = max(1, image.shape[0] // 256)
    if factor > 1:
        rows, cols = (image.shape[0] // factor) * factor, (image.shape[1] // factor) * factor
        image = image[:rows, :cols].reshape(rows // factor, factor, cols // factor, factor).mean(axis=(1, 3))
        mask = mask[:rows:factor, :cols:factor]
    scale = image.shape[0] / 256
    inside = ndimage.binary_erosion(mask, iterations=max(1, round(8 * scale)))
    specks = ((image - ndimage.uniform_filter(image, size=3)) > 0.1) & inside
    window = max(3, round(21 * scale) | 1)
    return [float(ndimage.uniform_filter(specks.astype(np.float32), size=window).max() * window**2)]


def cross_validated_auc(features: np.ndarray, labels: np.ndarray, groups: np.ndarray) -> float:
    """Logistic regression, 5-fold cross-validation grouped by patient (no patient in train and test)."""
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, class_weight="balanced"))
    scores = cross_val_predict(model, features, labels, groups=groups, cv=GroupKFold(5), method="predict_proba")
    return float(roc_auc_score(labels, scores[:, 1]))


@pytest.fixture(scope="module")
def study_features(study: tuple[Path, pd.DataFrame]) -> dict[str, np.ndarray]:
    out, manifest = study
    global_rows, lesion_rows = [], []
    for path in manifest["path"]:
        image = display(read(out, path))
        mask = breast_mask(image)
        global_rows.append(global_features(image, mask))
        lesion_rows.append(lesion_features(image, mask))
    return {
        "global": np.nan_to_num(np.asarray(global_rows, dtype=float)),
        "lesion": np.asarray(lesion_rows, dtype=float),
        "labels": manifest["label"].to_numpy(),
        "groups": manifest["patient_id"].to_numpy(),
    }


def test_global_statistics_near_chance(study_features: dict[str, np.ndarray]) -> None:
    auc = cross_validated_auc(study_features["global"], study_features["labels"], study_features["groups"])
    assert auc < 0.7, f"global image statistics give the label away (AUC {auc:.3f})"


@pytest.mark.parametrize("column", range(18))
def test_no_single_statistic_gives_it_away(study_features: dict[str, np.ndarray], column: int) -> None:
    auc = roc_auc_score(study_features["labels"], study_features["global"][:, column])
    assert 0.3 < auc < 0.7, f"statistic {column} has AUC {auc:.3f}"


def test_lesion_morphology_beats_global_statistics(study_features: dict[str, np.ndarray]) -> None:
    """One untrained lesion-aware feature beats a trained model on all the global statistics. It can only find
    the calcification clusters (half of the cancers), so about 0.75 is its ceiling."""
    labels, groups = study_features["labels"], study_features["groups"]
    global_auc = cross_validated_auc(study_features["global"], labels, groups)
    lesion_auc = roc_auc_score(labels, study_features["lesion"][:, 0])
    assert lesion_auc > 0.65 and lesion_auc > global_auc + 0.1, (lesion_auc, global_auc)
