"""Synthetic screening mammograms written as real DICOM files, for the demo and the tests.

``python -m mammo_ray.synth --out DIR`` writes a small screening cohort that every stage of mammo_ray can
read as if it were an export from a breast-imaging archive: DICOM files (Digital Mammography X-Ray Image
Storage - For Presentation, uncompressed Explicit VR Little Endian) plus metadata tables in three layouts.

Output layout (paths inside the CSVs are relative to ``DIR``)::

    DIR/dicom/<patient_id>/<exam_id>/<image_id>.dcm   e.g. dicom/SYN00012/SYN00012_E2/SYN00012_E2_LMLO.dcm
    DIR/manifest.csv            generic manifest (``prepare --source generic``): image_id, path, label,
                                patient_id, exam_id, laterality, view, dataset ("SYNTH"), age, density (A-D),
                                manufacturer, birads (0-6)
    DIR/metadata_embed.csv      EMBED image table, one row per image: empi_anon, acc_anon, study_date_anon,
                                StudyDescription, SeriesDescription, FinalImageType ("2D"), ImageLateralityFinal,
                                ViewPosition, spot_mag, anon_dicom_path, Manufacturer, ManufacturerModelName,
                                PhotometricInterpretation, Rows, Columns, tissueden (1-4), age_at_study,
                                ETHNICITY_DESC, asses (EMBED letter), side, path_severity, cancer (0/1)
    DIR/clinical_embed.csv      EMBED clinical table, one row per finding (at least one per exam): empi_anon,
                                acc_anon, study_date_anon, desc, side, asses, tissueden, age_at_study,
                                path_severity, ETHNICITY_DESC. ``prepare --source embed`` needs both tables.
    DIR/metadata_reference.csv  the reference script's layout (``prepare --source seed``): path_eq, cancer,
                                datasettype ("SYNTH"), patient_id, tissueden, ETHNICITY_DESC
    DIR/synth.json              written last: generator version, parameters and counts. Its presence means the
                                folder is complete.

Ids: ``patient_id`` SYN00012 is ``empi_anon`` 10000012 in the EMBED tables; ``exam_id`` SYN00012_E2 is
``acc_anon`` 2000000000000122 (patient * 10 + exam number). EMBED codes follow the EMBED Open Data README
(Jeong et al., Radiology: AI 2023): ``tissueden`` 1-4 = BI-RADS density a-d; ``asses`` N/B/P/A/S/M/K =
BI-RADS 1/2/3/0/4/5/6; ``path_severity`` 0 = invasive cancer, 1 = DCIS, 4 = benign, blank = no biopsy.
``cancer`` (EMBED tables) = ``label`` (manifest) = the image's breast holds a cancer at that exam. Pathology
sits on the screening exam itself and exams are at least 400 days apart, so the EMBED importer's one-year
look-ahead gives the same labels.

What a breast imager will see. Each patient has 1-3 screening exams of four views (L/R x CC/MLO), stored as
scanners store them: a left breast has its chest wall on the left image edge, a right breast on the right
edge (back-to-back hanging), so preprocessing has to flip. The breast is a semi-ellipse from the chest wall
with a wavy outline, a peripheral thickness fall-off, a skin line and a nipple. Fibroglandular tissue is
power-law noise (spectral exponent about 3, the value measured on mammograms by Burgess et al., Med. Phys.
2001) thresholded according to the patient's BI-RADS density. MLO views add the pectoral muscle triangle
and the axillary tail. A burned-in laterality/view label sits in the corner on the nipple side, away from
the breast, so that a breast crop has something to drop. Headers vary like a multi-vendor archive:
BitsStored 12/14/16, MONOCHROME1 (stored values inverted) for about a fifth of exams, Window Center/Width
on most files (LINEAR or SIGMOID VOI LUT function, sometimes two windows), none on the rest.

Cancers: ``prevalence`` of the breasts (patient x exam x side; at least 2 when ``prevalence`` > 0) hold one,
drawn in both views at the same depth (distance from the nipple): spiculated masses (irregular, ill-defined dense
core with radiating spicules, diameter 6-15% of the breast height) or clusters of 5-20 pleomorphic
calcifications, half each, with varied size and contrast. Look-alikes are matched to them: whatever its label,
a breast shows a mass with probability 0.5 (a round, well-circumscribed benign one, sometimes with a fat halo,
of the same size and contrast, or the cancer) and calcifications with probability about 0.9 (scattered
isolated benign ones of the same size and brightness, or a cluster that gathers most of them). A cancer takes
the place of the look-alike of its kind, so a breast never shows a benign mass beside its cancer at that
exam; benign findings otherwise persist across exams. A tone curve with a shoulder compresses the densest
spots, as vendors' for-presentation processing does. So the maximum pixel, high percentiles and global
statistics stay near chance, while morphology (spiculated vs circumscribed, clustered vs scattered), which
is what a radiologist reads, tells cancers apart. ``tests/test_synth.py`` checks both.

Generation is vectorised numpy on one core: textures come from a bank of FFT noise fields computed once per
run and sliced at random offsets; findings are drawn on small patches. Same seed, same pixels and CSVs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import socket
import sys
import time
from dataclasses import dataclass, field, replace
from datetime import date, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import DigitalMammographyXRayImageStorageForPresentation, ExplicitVRLittleEndian
from scipy import fft

__all__ = [
    "DATASET_NAME",
    "EMBED_CLINICAL_COLUMNS",
    "EMBED_COLUMNS",
    "GENERATOR_VERSION",
    "MANIFEST_COLUMNS",
    "REFERENCE_COLUMNS",
    "generate",
    "main",
]

GENERATOR_VERSION = 2  # 2: thicker, longer spicules and tighter clusters (visible at 128 rows)
DATASET_NAME = "SYNTH"
MARKER_FILE = "synth.json"
SMOKE_PATIENTS = 12
SMOKE_SIZE = (128, 104)
MIN_SIZE = (64, 48)
# A set with any cancers at all should have enough to compute an AUC on the smallest runs.
MIN_POSITIVE_BREASTS = 2

MANIFEST_COLUMNS = (
    "image_id",
    "path",
    "label",
    "patient_id",
    "exam_id",
    "laterality",
    "view",
    "dataset",
    "age",
    "density",
    "manufacturer",
    "birads",
)
EMBED_COLUMNS = (
    "empi_anon",
    "acc_anon",
    "study_date_anon",
    "StudyDescription",
    "SeriesDescription",
    "FinalImageType",
    "ImageLateralityFinal",
    "ViewPosition",
    "spot_mag",
    "anon_dicom_path",
    "Manufacturer",
    "ManufacturerModelName",
    "PhotometricInterpretation",
    "Rows",
    "Columns",
    "tissueden",
    "age_at_study",
    "ETHNICITY_DESC",
    "asses",
    "side",
    "path_severity",
    "cancer",
)
EMBED_CLINICAL_COLUMNS = (
    "empi_anon",
    "acc_anon",
    "study_date_anon",
    "desc",
    "side",
    "asses",
    "tissueden",
    "age_at_study",
    "path_severity",
    "ETHNICITY_DESC",
)
REFERENCE_COLUMNS = ("path_eq", "cancer", "datasettype", "patient_id", "tissueden", "ETHNICITY_DESC")

_SIDES = ("L", "R")
_VIEWS = ("CC", "MLO")
_DENSITY_LETTERS = "ABCD"
_ASSES_TO_BIRADS = {"A": 0, "N": 1, "B": 2, "P": 3, "S": 4, "M": 5, "K": 6}
_ETHNICITIES = (
    ("Caucasian or White", 0.42),
    ("African American  or Black", 0.40),
    ("Asian", 0.07),
    ("Multiple", 0.02),
    ("Native Hawaiian or Other Pacific Islander", 0.01),
    ("Unknown, Unavailable or Unreported", 0.08),
)
# DICOM Patient Orientation (row direction, column direction) as stored for back-to-back hanging.
_PATIENT_ORIENTATION = {
    ("L", "CC"): ["A", "R"],
    ("R", "CC"): ["P", "L"],
    ("L", "MLO"): ["A", "FR"],
    ("R", "MLO"): ["P", "FL"],
}
# Field of view height of a full-field detector; pixel spacing follows from the requested rows.
_FIELD_HEIGHT_MM = 240.0


@dataclass(frozen=True)
class _Vendor:
    manufacturer: str
    model: str
    share: float
    bits_stored: tuple[int, ...]
    monochrome1_rate: float
    voi_function: str
    two_windows: bool
    marker_at_bottom: bool


# Shares loosely follow EMBED's (mostly Hologic). MONOCHROME1 rates average to about 0.2 of exams.
_VENDORS = (
    _Vendor("HOLOGIC, Inc.", "Selenia Dimensions", 0.55, (12, 14), 0.05, "LINEAR", True, False),
    _Vendor("GE MEDICAL SYSTEMS", "Senographe Pristina", 0.20, (14, 12), 0.40, "SIGMOID", False, False),
    _Vendor("SIEMENS", "Mammomat Revelation", 0.10, (16, 12), 0.0, "LINEAR", False, True),
    _Vendor("FUJIFILM Corporation", "FDR MS-3500", 0.15, (16, 14), 0.75, "LINEAR", False, False),
)
_WINDOW_RATE = 0.88

# Look-alikes are matched to the cancers: every breast shows a mass with probability 0.5 (a benign one, or the
# cancer when it is a mass) and a calcification population with probability about 0.9 (scattered benign ones, or
# the cluster when the cancer is one; see ``_findings``). Presence, number and brightness are the same for both
# labels; only morphology (spiculated vs circumscribed, clustered vs scattered) tells them apart.
_MASS_CANCER_SHARE = 0.5
_BENIGN_MASS_RATE = _MASS_CANCER_SHARE
_BENIGN_CALCS_RATE = 0.9
_CALC_COUNT = (5, 21)
# Diameter of masses as a fraction of the breast height (CC view); contrast in the float image's units, on top
# of glandular tissue whose own contrast to fat is 0.28-0.40, so that dense breasts hide some masses.
_MASS_DIAMETER = (0.06, 0.15)
_MASS_CONTRAST = (0.15, 0.35)
# Share of a mass's added density that dense tissue hides: 0 draws it on top of the tissue (as shipped), 1 scales
# it by the local fat share, so that a mass over dense glands adds nothing. A probe knob
# (``benchmarks/learnability.py --synth-set _MASS_MASKING=1``); the shipped data keep 0.
_MASS_MASKING = 0.0
_CALC_AMPLITUDE = (0.45, 0.85)
# Calcification sigma in pixels at 512 rows; scaled with the image so a calcification has a physical size.
# Larger than most real calcifications (0.1-0.5 mm) so that a cluster survives downsampling to the demo's 128 rows.
# Benign and malignant ones share size and brightness; malignant ones are more elongated (pleomorphic).
_CALC_SIGMA_512 = (0.8, 1.6)
_NOISE_SD = (0.006, 0.012)
# Start of the tone curve's shoulder, in the float image's units (0 air, about 0.75 dense tissue).
_KNEE = 0.7
# Gland-field threshold per BI-RADS density (1-4 = a-d), calibrated so that the mean glandular share of the
# breast is about 14%, 34%, 56% and 77%; and the strength of the radial bias towards the centre.
_GLAND_THRESHOLD = {1: 1.15, 2: 0.3, 3: -0.45, 4: -1.2}
_GLAND_BIAS = 2.5

# 5x7 bitmap font for the burned-in marker.
_GLYPHS = {
    "C": ("01110", "10001", "10000", "10000", "10000", "10001", "01110"),
    "L": ("10000", "10000", "10000", "10000", "10000", "10000", "11111"),
    "M": ("10001", "11011", "10101", "10101", "10001", "10001", "10001"),
    "O": ("01110", "10001", "10001", "10001", "10001", "10001", "01110"),
    "R": ("11110", "10001", "10001", "11110", "10100", "10010", "10001"),
}


# --------------------------------------------------------------------------------------------------------
# The plan: who, when, which breast is positive, and what each breast contains


@dataclass
class _Finding:
    kind: str  # "spiculated_mass", "calcification_cluster", "benign_mass", "benign_calcifications"
    depth: float  # 0 at the chest wall, 1 at the nipple
    clock: float  # angle around the nipple axis; CC and MLO project it differently
    radial: float  # 0 on the nipple axis, 1 at the skin
    size: float  # mass diameter or cluster radius, as a fraction of the image rows
    contrast: float
    count: int
    seed: int

    @property
    def malignant(self) -> bool:
        return self.kind in ("spiculated_mass", "calcification_cluster")


@dataclass
class _Breast:
    depth: float  # chest wall to nipple, fraction of the image columns (CC)
    half_height: float  # CC half height, fraction of rows
    texture: dict[str, tuple[int, int, int]]  # view -> (bank index, row offset, column offset)
    benign: list[_Finding] = field(default_factory=list)


@dataclass
class _Exam:
    number: int
    exam_id: str
    accession: int
    study_date: date
    age: int
    vendor: _Vendor
    bits_stored: int
    monochrome1: bool
    has_window: bool
    gain: float  # stored units per unit intensity, as a fraction of the largest stored value
    offset: float
    noise_sd: float
    cancer: dict[str, _Finding] = field(default_factory=dict)


@dataclass
class _Patient:
    index: int
    patient_id: str
    empi: int
    ethnicity: str
    density: int  # 1-4 = BI-RADS a-d
    fat_level: float
    gland_contrast: float
    breasts: dict[str, _Breast]
    exams: list[_Exam]


def _rng(seed: int, *keys: int) -> np.random.Generator:
    # Independent streams per entity keep patient p identical whatever the number of patients.
    return np.random.default_rng([seed, *keys])


def _choose(rng: np.random.Generator, options: tuple, weights: tuple[float, ...]) -> object:
    weights_array = np.asarray(weights, dtype=float)
    return options[int(rng.choice(len(options), p=weights_array / weights_array.sum()))]


def _plan_benign(rng: np.random.Generator, half_height: float) -> list[_Finding]:
    findings = []
    if rng.random() < _BENIGN_MASS_RATE:
        findings.append(_mass(rng, "benign_mass", half_height))
    if rng.random() < _BENIGN_CALCS_RATE:
        findings.append(
            _Finding(
                "benign_calcifications", 0.5, 0.0, 0.0, 0.0, float(rng.uniform(*_CALC_AMPLITUDE)),
                int(rng.integers(*_CALC_COUNT)), int(rng.integers(2**31)),
            )
        )  # fmt: skip
    return findings


def _location(rng: np.random.Generator) -> tuple[float, float, float]:
    return float(rng.uniform(0.22, 0.82)), float(rng.uniform(0, 2 * np.pi)), float(0.75 * np.sqrt(rng.random()))


def _mass(rng: np.random.Generator, kind: str, half_height: float) -> _Finding:
    depth, clock, radial = _location(rng)
    diameter = float(rng.uniform(*_MASS_DIAMETER)) * 2 * half_height
    contrast = float(rng.uniform(*_MASS_CONTRAST))
    return _Finding(kind, depth, clock, radial, diameter, contrast, 1, int(rng.integers(2**31)))


def _cancer(rng: np.random.Generator, half_height: float) -> _Finding:
    if rng.random() < _MASS_CANCER_SHARE:
        return _mass(rng, "spiculated_mass", half_height)
    depth, clock, radial = _location(rng)
    # Cluster radius 2-4% of the breast height: a tight group that stays a group at 128 rows.
    radius = float(rng.uniform(0.02, 0.04)) * 2 * half_height
    amplitude = float(rng.uniform(*_CALC_AMPLITUDE))
    return _Finding(
        "calcification_cluster", depth, clock, radial, radius, amplitude, int(rng.integers(*_CALC_COUNT)),
        int(rng.integers(2**31)),
    )  # fmt: skip


def _plan_patient(seed: int, index: int, bank_size: int) -> _Patient:
    rng = _rng(seed, 1, index)
    age0 = int(np.clip(rng.normal(57, 9), 40, 84))
    # Younger women have denser breasts (BI-RADS density shifts towards c/d below 50).
    young = age0 < 50
    density = int(_choose(rng, (1, 2, 3, 4), (0.06, 0.34, 0.45, 0.15) if young else (0.12, 0.45, 0.35, 0.08)))
    ethnicity = str(_choose(rng, tuple(e for e, _ in _ETHNICITIES), tuple(w for _, w in _ETHNICITIES)))
    breasts = {}
    for side in _SIDES:
        half_height = float(rng.uniform(0.36, 0.45))
        texture = {
            view: (
                int(rng.integers(bank_size)),
                int(rng.integers(0, 1 << 16)),
                int(rng.integers(0, 1 << 16)),
            )
            for view in _VIEWS
        }
        breast = _Breast(float(rng.uniform(0.55, 0.80)), half_height, texture)
        breast.benign = _plan_benign(rng, half_height)
        breasts[side] = breast
    n_exams = int(_choose(rng, (1, 2, 3), (0.35, 0.35, 0.30)))
    vendors = tuple(_VENDORS)
    home_vendor = _choose(rng, vendors, tuple(v.share for v in vendors))
    patient_id = f"SYN{index:05d}"
    study_date = date(2015, 1, 1) + timedelta(days=int(rng.integers(0, 5 * 365)))
    exams = []
    for number in range(1, n_exams + 1):
        if number > 1:
            # At least 400 days apart, so that a one-year look-ahead label never reaches back a whole exam.
            study_date += timedelta(days=int(rng.integers(400, 800)))
        vendor = home_vendor if rng.random() < 0.85 else _choose(rng, vendors, tuple(v.share for v in vendors))
        exams.append(
            _Exam(
                number=number,
                exam_id=f"{patient_id}_E{number}",
                accession=2_000_000_000_000_000 + index * 10 + number,
                study_date=study_date,
                age=age0 + (study_date - exams[0].study_date).days // 365 if exams else age0,
                vendor=vendor,
                bits_stored=int(rng.choice(vendor.bits_stored)),
                monochrome1=bool(rng.random() < vendor.monochrome1_rate),
                has_window=bool(rng.random() < _WINDOW_RATE),
                gain=float(rng.uniform(0.70, 0.85)),
                offset=float(rng.uniform(0.01, 0.05)),
                noise_sd=float(rng.uniform(*_NOISE_SD)),
            )
        )
    return _Patient(
        index=index,
        patient_id=patient_id,
        empi=10_000_000 + index,
        ethnicity=ethnicity,
        density=density,
        fat_level=float(rng.uniform(0.24, 0.34)),
        gland_contrast=float(rng.uniform(0.28, 0.40)),
        breasts=breasts,
        exams=exams,
    )


def _plan(seed: int, patients: int, prevalence: float, bank_size: int) -> list[_Patient]:
    plan = [_plan_patient(seed, index, bank_size) for index in range(patients)]
    breasts = [(p, e, side) for p, patient in enumerate(plan) for e in range(len(patient.exams)) for side in _SIDES]
    n_positive = int(round(prevalence * len(breasts)))
    if prevalence > 0 and n_positive < min(MIN_POSITIVE_BREASTS, len(breasts)):
        raised = min(MIN_POSITIVE_BREASTS, len(breasts))
        print(
            f"synth: prevalence {prevalence:g} of {len(breasts)} breasts gives {n_positive} cancer(s); drawing "
            f"{raised}, the least a data set with cancers gets (so that AUC is defined)",
            file=sys.stderr,
        )
        n_positive = raised
    chosen = _rng(seed, 4).choice(len(breasts), size=n_positive, replace=False)
    for k in sorted(int(c) for c in chosen):
        p, e, side = breasts[k]
        patient = plan[p]
        half_height = patient.breasts[side].half_height
        patient.exams[e].cancer[side] = _cancer(_rng(seed, 2, p, e, _SIDES.index(side)), half_height)
    return plan


def _findings(breast: _Breast, exam: _Exam, side: str) -> list[_Finding]:
    """What one breast shows at one exam: its persistent benign findings, with the cancer (if any) taking the
    place of the look-alike of its kind (see ``_MASS_CANCER_SHARE``), so that presence, number and brightness of
    masses and calcifications do not depend on the label."""
    cancer = exam.cancer.get(side)
    if cancer is None:
        return list(breast.benign)
    if cancer.kind == "spiculated_mass":
        return [f for f in breast.benign if f.kind != "benign_mass"] + [cancer]
    # A cluster replaces the benign mass and gathers most of the scattered calcifications: the breast keeps its
    # number of calcifications, and the rest stay scattered. Both matter. The brightest calcification of a breast
    # is the one that lands on the densest tissue, and a cluster samples one spot where scattered ones sample
    # many; and a cluster on top of all the scattered ones would add bright pixels. Either would give the label
    # away through the maximum or a high percentile.
    scattered = next((f for f in breast.benign if f.kind == "benign_calcifications"), None)
    if scattered is None:
        return [cancer]
    in_cluster = max(_CALC_COUNT[0], round(cancer.count / (_CALC_COUNT[1] - 1) * scattered.count))
    rest = max(0, scattered.count - in_cluster)
    return ([replace(scattered, count=rest)] if rest else []) + [replace(cancer, count=in_cluster)]


def _assessment(rng: np.random.Generator, findings: list[_Finding]) -> tuple[str, float]:
    """Screening BI-RADS letter and path_severity (NaN when not biopsied) of one breast at one exam."""
    kinds = {f.kind for f in findings}
    cancer = next((f for f in findings if f.malignant), None)
    if cancer is not None:
        letter = "A" if rng.random() < 0.85 else "N"  # some cancers are missed at screening (interval cancers)
        invasive_rate = 0.85 if cancer.kind == "spiculated_mass" else 0.45
        return letter, float(0 if rng.random() < invasive_rate else 1)
    if "benign_mass" in kinds:
        letter = str(_choose(rng, ("B", "A", "N"), (0.45, 0.10, 0.45)))
        return letter, (4.0 if letter == "A" and rng.random() < 0.5 else math.nan)
    if "benign_calcifications" in kinds:
        return str(_choose(rng, ("B", "A", "N"), (0.25, 0.04, 0.71))), math.nan
    return ("A" if rng.random() < 0.05 else "N"), math.nan


# --------------------------------------------------------------------------------------------------------
# Rendering


class _Canvas:
    """Grids, noise banks and work buffers shared by every image of one run (one image size)."""

    def __init__(self, size: tuple[int, int], seed: int, bank_size: int) -> None:
        rows, cols = size
        self.rows, self.cols = rows, cols
        self.ys = np.arange(rows, dtype=np.float32)[:, None]
        self.xs = np.arange(cols, dtype=np.float32)[None, :]
        self.xs2 = self.xs**2
        rng = _rng(seed, 0)
        bank_shape = (2 * rows, 2 * cols)
        # Low cut-off at about a third of the image height: glandular islands of centimetres, not one gradient.
        # Spectral exponent 3.1, near the 3 measured on mammograms, still leaves wispy edges. Stretched along x:
        # ducts and ligaments run from the chest wall to the nipple.
        self.texture = _power_law_bank(rng, bank_size, bank_shape, beta=3.1, cutoff=3.0 / rows, stretch=1.8)
        self.white = rng.standard_normal((1, *bank_shape), dtype=np.float32)
        # Temporaries allocated once: fresh arrays of this size cost page faults on every image. ``buffers`` hold
        # full images (image, thickness, work); ``scratch`` is reshaped per image into contiguous arrays just as
        # wide as the breast, because ufuncs run about twice as fast on those as on column slices.
        self.buffers = np.empty((3, rows, cols), dtype=np.float32)
        self.scratch = np.empty((5, rows * cols), dtype=np.float32)

    def slice(self, bank: np.ndarray, key: tuple[int, int, int]) -> np.ndarray:
        # No flips: reversed views are several times slower to read than forward ones.
        index, dy, dx = key
        dy, dx = dy % self.rows, dx % self.cols
        return bank[index % len(bank), dy : dy + self.rows, dx : dx + self.cols]


def _power_law_bank(
    rng: np.random.Generator, count: int, shape: tuple[int, int], beta: float, cutoff: float, stretch: float = 1.0
) -> np.ndarray:
    """Gaussian fields with power spectrum 1/(f^2 + cutoff^2)^(beta/2), each scaled to unit variance.

    ``stretch`` > 1 lengthens the structures along x (columns) by that factor.
    """
    freq_y = fft.fftfreq(shape[0]).astype(np.float32)[:, None]
    freq_x = fft.rfftfreq(shape[1]).astype(np.float32)[None, :] * np.float32(stretch)
    amplitude = (freq_y**2 + freq_x**2 + np.float32(cutoff) ** 2) ** np.float32(-beta / 4)
    amplitude[0, 0] = 0.0
    bank = np.empty((count, *shape), dtype=np.float32)
    for i in range(count):
        spectrum = fft.rfft2(rng.standard_normal(shape, dtype=np.float32))
        spectrum *= amplitude
        field_ = fft.irfft2(spectrum, s=shape)
        bank[i] = field_ / field_.std()
    return bank


@dataclass
class _Geometry:
    """One view's breast outline in canonical orientation (chest wall on the left edge), in pixels."""

    depth: float  # nipple distance from the chest wall along the centre row
    center_y: float
    half_up: float  # vertical semi-axis above the centre row
    half_down: float
    wobble: tuple[float, float, float, float]  # outline waviness: two amplitudes and two phases
    pectoral: tuple[float, float, float, float] | None = None  # width at top, height at chest wall, bow, level


def _geometry(rng: np.random.Generator, breast: _Breast, view: str, rows: int, cols: int) -> _Geometry:
    # Per-exam positioning jitter: the same breast is compressed a little differently each time.
    depth = breast.depth * cols * float(rng.uniform(0.95, 1.05))
    wobble = (float(rng.uniform(0.01, 0.035)), float(rng.uniform(0.005, 0.02)), *rng.uniform(0, 2 * np.pi, 2))
    if view == "CC":
        half = breast.half_height * rows * float(rng.uniform(0.97, 1.03))
        center = rows * float(rng.uniform(0.47, 0.53))
        return _Geometry(min(depth, 0.84 * cols), center, half, half, wobble)
    depth = min(depth * float(rng.uniform(0.98, 1.08)), 0.84 * cols)
    center = rows * float(rng.uniform(0.52, 0.60))
    half_down = min(rows * float(rng.uniform(0.36, 0.43)), rows - center - 0.03 * rows)
    # Above the centre the outline runs up into the axilla: it meets the top edge at top_width from the wall.
    top_width = depth * float(rng.uniform(0.35, 0.55))
    half_up = center / math.sqrt(1.0 - (top_width / depth) ** 2)
    pectoral = (
        top_width * float(rng.uniform(0.6, 0.9)),
        rows * float(rng.uniform(0.32, 0.6)),
        float(rng.uniform(0.0, 0.45)),
        float(rng.uniform(0.52, 0.70)),
    )
    return _Geometry(depth, center, half_up, half_down, wobble, pectoral)


def _project(finding: _Finding, geometry: _Geometry, view: str) -> tuple[float, float]:
    """Pixel position of a finding: the same depth (distance from the nipple, relative to the breast) in both
    views, the rule radiologists use to match a finding between CC and MLO."""
    x = finding.depth * geometry.depth
    # CC shows the lateral-medial offset, MLO an oblique (45 degree) superior-inferior one.
    component = math.sin(finding.clock) if view == "CC" else math.cos(finding.clock - math.pi / 4)
    half = geometry.half_up if component < 0 else geometry.half_down
    y = geometry.center_y + component * finding.radial * half * math.sqrt(max(0.0, 1.0 - finding.depth**2))
    return x, y


def _patch(canvas: _Canvas, x: float, y: float, reach: float) -> tuple[slice, slice, np.ndarray, np.ndarray] | None:
    y0, y1 = max(0, int(y - reach)), min(canvas.rows, int(y + reach) + 2)
    x0, x1 = max(0, int(x - reach)), min(canvas.cols, int(x + reach) + 2)
    if y0 >= y1 or x0 >= x1:
        return None
    return slice(y0, y1), slice(x0, x1), canvas.ys[y0:y1] - np.float32(y), canvas.xs[:, x0:x1] - np.float32(x)


def _spiculated_mass(rng: np.random.Generator, dy: np.ndarray, dx: np.ndarray, radius: float) -> np.ndarray:
    rr = np.sqrt(dy**2 + dx**2)
    theta = np.arctan2(dy, dx)
    phases = rng.uniform(0, 2 * np.pi, 3)
    # Irregular, lobulated outline.
    edge = radius * (
        1 + 0.18 * np.sin(3 * theta + phases[0]) + 0.10 * np.sin(5 * theta + phases[1]) + 0.06 * np.sin(7 * theta)
    )
    # Ill-defined margin: the density ramps down over a third of the radius instead of stopping at an edge.
    core = np.clip((edge - rr) / (0.35 * radius) + 0.5, 0, 1)
    dome = np.sqrt(np.clip(1 - (rr / (edge + 1e-3)) ** 2, 0, 1))
    profile = 0.75 * core + 0.35 * dome  # dense core, densest in the middle
    # Spicules all around, thick and long enough to stay visible at the demo's 128 rows.
    n_spicules = int(rng.integers(6, 15))
    angles = np.linspace(0, 2 * np.pi, n_spicules, endpoint=False) + rng.uniform(0, 2 * np.pi)
    angles = (angles + rng.normal(0, 0.6 * np.pi / n_spicules, n_spicules)).astype(np.float32)[:, None, None]
    lengths = (radius * rng.uniform(2.2, 3.6, n_spicules)).astype(np.float32)[:, None, None]
    widths = np.maximum(radius * rng.uniform(0.16, 0.28, n_spicules), 0.8).astype(np.float32)[:, None, None]
    along = dx * np.cos(angles) + dy * np.sin(angles)
    across = np.abs(dx * np.sin(angles) - dy * np.cos(angles))
    taper = np.clip(1 - along / lengths, 0, 1)
    spicules = np.exp(-((across / (widths * (0.4 + taper))) ** 2)) * np.sqrt(taper) * (along > 0.3 * radius)
    return np.maximum(profile, spicules.max(axis=0))


def _benign_mass(rng: np.random.Generator, dy: np.ndarray, dx: np.ndarray, radius: float) -> np.ndarray:
    angle = rng.uniform(0, np.pi)
    aspect = rng.uniform(0.7, 1.0)
    u = (dx * math.cos(angle) + dy * math.sin(angle)) / radius
    v = (-dx * math.sin(angle) + dy * math.cos(angle)) / (radius * aspect)
    rr = np.sqrt(u**2 + v**2)
    # Circumscribed: a sharp one-pixel margin, a flat dense interior.
    body = np.clip((1 - rr) * radius + 0.5, 0, 1) * (0.85 + 0.25 * np.sqrt(np.clip(1 - rr**2, 0, 1)))
    if rng.random() < 0.4:  # fat halo (the "halo sign" of a benign mass)
        halo_width = max(1.2, 0.08 * radius) / radius
        body = body - 0.35 * np.clip(1 - np.abs(rr - 1 - halo_width) / halo_width, 0, 1)
    return body


def _calcifications(
    rng: np.random.Generator, positions: np.ndarray, sigma_scale: float, pleomorphic: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Small (elongated) Gaussian sprites for calcifications at sub-pixel ``positions`` (n x 2, rows/columns).

    Returns the sprites (n x P x P) and the integer pixel of each sprite's top-left corner. Sub-pixel ones keep
    their integrated brightness (partial volume), so a calcification has the same physical size at every image
    size.
    """
    n = len(positions)
    sigma = rng.uniform(*_CALC_SIGMA_512, n) * sigma_scale
    drawn = np.maximum(sigma, 0.55)
    weight = (sigma / drawn) ** 2 * rng.uniform(0.6, 1.0, n)
    aspect = rng.uniform(1.0, 2.5 if pleomorphic else 1.4, n)
    angle = rng.uniform(0, np.pi, n)
    half = int(math.ceil(3 * 2.5 * _CALC_SIGMA_512[1] * max(sigma_scale, 0.25))) + 1
    corner = np.floor(positions).astype(int) - half
    grid = np.arange(-half, half + 1, dtype=np.float32)
    frac = (positions - np.floor(positions)).astype(np.float32)
    ddy = grid[None, :, None] - frac[:, 0, None, None]
    ddx = grid[None, None, :] - frac[:, 1, None, None]
    cos, sin = np.cos(angle).astype(np.float32)[:, None, None], np.sin(angle).astype(np.float32)[:, None, None]
    major = (drawn * aspect).astype(np.float32)[:, None, None]
    minor = drawn.astype(np.float32)[:, None, None]
    u = (ddx * cos + ddy * sin) / major
    v = (ddy * cos - ddx * sin) / minor
    sprites = weight.astype(np.float32)[:, None, None] * np.exp(-0.5 * (u * u + v * v))
    return sprites, corner


def _stamp(target: np.ndarray, sprite: np.ndarray, corner: tuple[int, int], combine: np.ufunc = np.add) -> None:
    """Combine a sprite into ``target`` at ``corner``, clipped to the target's bounds."""
    y0, x0 = corner
    size_y, size_x = sprite.shape
    ty0, tx0 = max(0, y0), max(0, x0)
    ty1, tx1 = min(target.shape[0], y0 + size_y), min(target.shape[1], x0 + size_x)
    if ty0 >= ty1 or tx0 >= tx1:
        return
    region = target[ty0:ty1, tx0:tx1]
    combine(region, sprite[ty0 - y0 : ty1 - y0, tx0 - x0 : tx1 - x0], out=region)


def _cluster_offsets(rng: np.random.Generator, finding: _Finding, radius_px: float) -> np.ndarray:
    n = finding.count
    if rng.random() < 0.5:  # round cluster
        offsets = rng.normal(0, 0.5 * radius_px, (n, 2))
    else:  # linear or segmental: along a line, like calcifications in a duct
        angle = rng.uniform(0, np.pi)
        t = rng.uniform(-radius_px, radius_px, n)
        s = rng.normal(0, 0.25 * radius_px, n)
        offsets = np.stack([t * math.sin(angle) + s * math.cos(angle), t * math.cos(angle) - s * math.sin(angle)], 1)
    return np.clip(offsets, -1.6 * radius_px, 1.6 * radius_px)


def _draw_finding(
    image: np.ndarray,
    thickness: np.ndarray,
    canvas: _Canvas,
    finding: _Finding,
    geometry: _Geometry,
    view: str,
    seed: int,
    fat_share: np.ndarray | None = None,
) -> None:
    rng = np.random.default_rng([finding.seed, _VIEWS.index(view), seed])
    sigma_scale = canvas.rows / 512.0
    if finding.kind == "benign_calcifications":
        # Scattered singles anywhere in the breast (off the pectoral muscle): as bright as malignant ones, rounder,
        # no grouping. Positions by rejection sampling on the thickness map: cheaper than listing the breast pixels.
        candidates = rng.random((8 * finding.count + 16, 2)) * (canvas.rows - 1, geometry.depth)
        cy, cx = candidates[:, 0].astype(int), candidates[:, 1].astype(int)
        keep = thickness[cy, cx] > 0.6
        if geometry.pectoral is not None:
            top, height, _, _ = geometry.pectoral
            keep &= (cy > height + 2) | (cx > top + 2)
        positions = candidates[keep][: finding.count]
        sprites, corners = _calcifications(rng, positions, sigma_scale, pleomorphic=False)
        for sprite, corner, (y, x) in zip(sprites, corners, positions.astype(int), strict=True):
            _stamp(image, finding.contrast * thickness[y, x] * sprite, tuple(corner))
        return
    x, y = _project(finding, geometry, view)
    if finding.kind in ("spiculated_mass", "benign_mass"):
        radius = 0.5 * finding.size * canvas.rows * float(rng.uniform(0.92, 1.08))
        reach = radius * (3.7 if finding.kind == "spiculated_mass" else 1.4) + 2
        box = _patch(canvas, x, y, reach)
        if box is None:
            return
        rows, cols, dy, dx = box
        draw = _spiculated_mass if finding.kind == "spiculated_mass" else _benign_mass
        density = finding.contrast * draw(rng, dy, dx, radius) * thickness[rows, cols]
        if fat_share is not None:
            density *= fat_share[rows, cols]
        image[rows, cols] += density
        return
    radius = finding.size * canvas.rows
    offsets = _cluster_offsets(rng, finding, radius)
    box = _patch(canvas, x, y, 1.6 * radius + 3 + 3 * 2.5 * _CALC_SIGMA_512[1] * sigma_scale)
    if box is None:
        return
    rows, cols, _, _ = box
    sprites, corners = _calcifications(rng, offsets + (y - rows.start, x - cols.start), sigma_scale, pleomorphic=True)
    spots = np.zeros((rows.stop - rows.start, cols.stop - cols.start), dtype=np.float32)
    for sprite, corner in zip(sprites, corners, strict=True):
        # Maximum, not sum: overlapping specks of a cluster must not outshine a lone benign one.
        _stamp(spots, sprite, tuple(corner), np.maximum)
    image[rows, cols] += finding.contrast * spots * thickness[rows, cols]


def _render(
    canvas: _Canvas,
    rng: np.random.Generator,
    patient: _Patient,
    breast: _Breast,
    exam: _Exam,
    side: str,
    view: str,
    seed: int,
) -> np.ndarray:
    """Float image, 0 = air and about 1 = dense tissue, chest wall on the left edge (``_to_stored`` mirrors right
    breasts). The result is one of the canvas' buffers, valid until the next call.
    """
    rows = canvas.rows
    geometry = _geometry(rng, breast, view, rows, canvas.cols)
    amp1, amp2, phase1, phase2 = geometry.wobble
    ys = canvas.ys
    # Per-row terms are (rows, 1) and cost nothing; full-size work is done in place in the canvas buffers.
    rows_frac = ys / rows
    depth_row = geometry.depth * (
        1 + amp1 * np.sin(2 * np.pi * 1.3 * rows_frac + phase1) + amp2 * np.sin(2 * np.pi * 3.1 * rows_frac + phase2)
    )
    offset_row = ys - np.float32(geometry.center_y)
    half_row = np.where(offset_row < 0, np.float32(geometry.half_up), np.float32(geometry.half_down))
    # Only the columns the breast can reach get the anatomy; the rest is air.
    reach = min(canvas.cols, int(float(depth_row.max()) + 0.03 * rows + 4))
    image, thickness, work, gland, one_minus_r = (flat[: rows * reach].reshape(rows, reach) for flat in canvas.scratch)

    # Normalised elliptic radius r (1 on the skin); everything anatomical is a function of 1 - r.
    np.multiply(canvas.xs2[:, :reach], (1 / depth_row**2).astype(np.float32), out=one_minus_r)
    one_minus_r += ((offset_row / half_row) ** 2).astype(np.float32)
    np.sqrt(one_minus_r, out=one_minus_r)
    np.subtract(1, one_minus_r, out=one_minus_r)
    # Peripheral fall-off: the compressed breast thins over the outer sixth towards the skin.
    np.multiply(one_minus_r, 1 / 0.16, out=thickness)
    np.clip(thickness, 0, 1, out=thickness)
    np.subtract(2, thickness, out=work)
    thickness *= work

    dy_jitter, dx_jitter = (int(v) for v in rng.integers(-rows // 40 - 1, rows // 40 + 2, 2))
    index, oy, ox = breast.texture[view]
    glands = canvas.slice(canvas.texture, (index, oy + dy_jitter, ox + dx_jitter))[:, :reach]
    # BI-RADS a-d: threshold of the gland field, so density d leaves little fat and a almost no glands. A radial
    # bias gathers the glands into a central cone behind the nipple with a subcutaneous fat layer around it.
    threshold = _GLAND_THRESHOLD[patient.density] + float(rng.normal(0, 0.1))
    softness = 0.5  # below ~0.3 the tissue looks like fog, above ~2 like paper cut-outs
    np.multiply(one_minus_r, softness * _GLAND_BIAS, out=gland)
    gland += 0.5 - softness * (threshold + 0.45 * _GLAND_BIAS)
    np.multiply(glands, softness, out=work)
    gland += work
    np.clip(gland, 0, 1, out=gland)
    np.multiply(gland, patient.gland_contrast, out=image)
    image += patient.fat_level
    image *= thickness

    # Skin line: a thin brighter band along the outline.
    scale = 0.5 * (geometry.depth + geometry.half_down) / max(1.5, 2.5 * rows / 512)
    np.abs(one_minus_r, out=work)
    work *= -scale
    work += 1
    np.clip(work, 0, 1, out=work)
    work *= 0.08
    image += work
    background = float(rng.uniform(0.02, 0.05))  # air
    full_image, full_thickness, work = canvas.buffers
    np.add(image, background, out=full_image[:, :reach])
    full_image[:, reach:] = background
    full_thickness[:, :reach] = thickness
    full_thickness[:, reach:] = 0
    image, thickness = full_image, full_thickness

    if geometry.pectoral is not None:
        _draw_pectoral(image, canvas, geometry.pectoral, glands)
    _draw_nipple(image, canvas, geometry, patient.fat_level)

    findings = _findings(breast, exam, side)
    fat_share = None
    if _MASS_MASKING and any(f.kind in ("spiculated_mass", "benign_mass") for f in findings):
        fat_share = np.ones_like(thickness)
        fat_share[:, :reach] -= _MASS_MASKING * gland
    for finding in findings:
        _draw_finding(image, thickness, canvas, finding, geometry, view, seed, fat_share)

    noise = canvas.slice(canvas.white, tuple(int(v) for v in rng.integers(0, 1 << 16, 3)))
    np.multiply(noise, exam.noise_sd, out=work)
    image += work
    return image


def _draw_pectoral(
    image: np.ndarray, canvas: _Canvas, pectoral: tuple[float, float, float, float], texture: np.ndarray
) -> None:
    top, height, bow, level = pectoral
    rows, cols = slice(0, min(canvas.rows, int(height) + 3)), slice(0, min(canvas.cols, int(top) + 3))
    u = canvas.xs[:, cols] / top
    v = canvas.ys[rows] / height
    # Convex (bowed) anterior edge, as the muscle usually looks on an MLO.
    level_set = u + v - bow * u * v
    weight = np.clip((1 - level_set) * min(top, height) / 2 + 0.5, 0, 1)
    muscle = level * (0.92 + 0.08 * (1 - v)) + 0.03 * texture[rows, cols]
    image[rows, cols] = image[rows, cols] * (1 - weight) + muscle * weight


def _draw_nipple(image: np.ndarray, canvas: _Canvas, geometry: _Geometry, level: float) -> None:
    radius = 0.022 * canvas.rows
    box = _patch(canvas, geometry.depth, geometry.center_y, radius + 2)
    if box is None:
        return
    rows, cols, dy, dx = box
    disc = np.clip((radius - np.sqrt(dy**2 + dx**2)) + 0.5, 0, 1) * (dx > -0.3 * radius)
    image[rows, cols] = np.maximum(image[rows, cols], 0.9 * level * disc + 0.03)


def _marker_mask(text: str, scale: int) -> np.ndarray:
    glyphs = [np.array([[c == "1" for c in row] for row in _GLYPHS[ch]]) for ch in text]
    spaced = []
    for i, glyph in enumerate(glyphs):
        spaced.append(glyph)
        if i < len(glyphs) - 1:
            spaced.append(np.zeros((7, 1), dtype=bool))
    letters = np.kron(np.hstack(spaced), np.ones((scale, scale), dtype=bool))
    pad = 2 * scale
    box = np.zeros((letters.shape[0] + 2 * pad, letters.shape[1] + 2 * pad), dtype=bool)
    box[pad:-pad, pad:-pad] = letters
    box[:scale], box[-scale:], box[:, :scale], box[:, -scale:] = True, True, True, True
    return box


def _burn_marker(stored: np.ndarray, side: str, view: str, vendor: _Vendor, value: int) -> None:
    """Burn the laterality/view label into the corner on the nipple side (away from the chest wall)."""
    rows, cols = stored.shape
    scale = max(1, round(rows / 170))
    text = side + view
    mask = _marker_mask(text, scale)
    if mask.shape[1] > 0.3 * cols:  # tiny images: the lead letter alone, as on an old film marker
        mask = _marker_mask(side, scale)
    margin_y, margin_x = max(2, rows // 40), max(2, cols // 40)
    y0 = rows - margin_y - mask.shape[0] if vendor.marker_at_bottom else margin_y
    x0 = cols - margin_x - mask.shape[1] if side == "L" else margin_x
    region = stored[y0 : y0 + mask.shape[0], x0 : x0 + mask.shape[1]]
    region[mask] = value


# --------------------------------------------------------------------------------------------------------
# DICOM


def _uid(*parts: object) -> str:
    # 2.25.<128-bit integer> (ISO/IEC 9834-8); derived from a hash so that the same seed gives the same UIDs.
    digest = hashlib.sha256(":".join(str(p) for p in ("mammo_ray.synth", *parts)).encode()).hexdigest()
    return f"2.25.{int(digest[:32], 16)}"


def _ds_number(value: float) -> str:
    return f"{value:.6g}"


def _exam_dataset(patient: _Patient, exam: _Exam, size: tuple[int, int], seed: int) -> Dataset:
    """Header elements shared by the four images of an exam; ``_set_image`` fills in the rest."""
    rows, cols = size
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = DigitalMammographyXRayImageStorageForPresentation
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    study_date = exam.study_date.strftime("%Y%m%d")
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.SOPClassUID = DigitalMammographyXRayImageStorageForPresentation
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = study_date
    ds.StudyTime = "091500"
    ds.AccessionNumber = str(exam.accession)
    ds.Modality = "MG"
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.Manufacturer = exam.vendor.manufacturer
    ds.ManufacturerModelName = exam.vendor.model
    ds.InstitutionName = "mammo_ray synthetic"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "MG Screening Bilateral"
    ds.PatientName = f"SYNTH^{patient.patient_id}"
    ds.PatientID = patient.patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = "F"
    ds.PatientAge = f"{exam.age:03d}Y"
    ds.BodyPartExamined = "BREAST"
    ds.BurnedInAnnotation = "YES"
    ds.StudyInstanceUID = _uid(seed, exam.exam_id, "study")
    ds.StudyID = str(exam.number)
    ds.InstanceNumber = 1
    ds.BreastImplantPresent = "NO"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME1" if exam.monochrome1 else "MONOCHROME2"
    ds.Rows, ds.Columns = rows, cols
    spacing = _ds_number(_FIELD_HEIGHT_MM / rows)
    ds.PixelSpacing = [spacing, spacing]
    ds.ImagerPixelSpacing = [spacing, spacing]
    ds.BitsAllocated = 16
    ds.BitsStored = exam.bits_stored
    ds.HighBit = exam.bits_stored - 1
    ds.PixelRepresentation = 0
    # LOG relationship; the sign says which way round the stored values run (PS3.3 C.8.11.3.1.2).
    ds.PixelIntensityRelationship = "LOG"
    ds.PixelIntensityRelationshipSign = 1 if exam.monochrome1 else -1
    ds.RescaleIntercept = "0"
    ds.RescaleSlope = "1"
    ds.RescaleType = "US"
    windows = _windows(exam, patient)
    if exam.has_window:
        centers, widths = [_ds_number(c) for c, _ in windows], [_ds_number(w) for _, w in windows]
        explanations = ["NORMAL", "HARDER"][: len(windows)]
        ds.WindowCenter = centers if len(centers) > 1 else centers[0]
        ds.WindowWidth = widths if len(widths) > 1 else widths[0]
        ds.WindowCenterWidthExplanation = explanations if len(explanations) > 1 else explanations[0]
        ds.VOILUTFunction = exam.vendor.voi_function
    return ds


def _set_image(ds: Dataset, side: str, view: str, image_id: str, pixels: np.ndarray, seed: int) -> None:
    view_index = 2 * _SIDES.index(side) + _VIEWS.index(view)
    sop_uid = _uid(seed, image_id, "sop")
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    ds.SOPInstanceUID = sop_uid
    ds.ContentTime = f"0916{10 * view_index:02d}"
    ds.SeriesDescription = f"{side} {view}"
    ds.SeriesInstanceUID = _uid(seed, image_id, "series")
    ds.SeriesNumber = view_index + 1
    ds.PatientOrientation = _PATIENT_ORIENTATION[(side, view)]
    ds.ImageLaterality = side
    ds.ViewPosition = view
    ds.PositionerPrimaryAngle = 0 if view == "CC" else (45 if side == "L" else -45)
    ds.PixelData = pixels.tobytes()


def _windows(exam: _Exam, patient: _Patient) -> list[tuple[int, int]]:
    """Window Center/Width pairs in stored units: a window a technologist would leave on, fat edge to dense."""
    top = (1 << exam.bits_stored) - 1
    gain, offset = exam.gain * top, exam.offset * top
    low = offset + gain * 0.6 * patient.fat_level
    high = offset + gain * (patient.fat_level + patient.gland_contrast + 0.1)
    center, width = 0.5 * (low + high), high - low
    windows = [(round(center), round(width))]
    if exam.vendor.two_windows:
        windows.append((round(center + 0.1 * width), round(0.8 * width)))
    if exam.monochrome1:
        windows = [(top - c, w) for c, w in windows]
    return windows


def _to_stored(image: np.ndarray, exam: _Exam, side: str, view: str, work: np.ndarray) -> np.ndarray:
    """Quantise to the exam's bit depth, mirror right breasts, invert for MONOCHROME1 and burn in the marker."""
    top = (1 << exam.bits_stored) - 1
    # Tone curve with a shoulder, as in vendors' for-presentation processing: the densest spots (calcifications
    # on dense tissue) are compressed towards white instead of running far above everything else.
    bright = image > _KNEE
    image[bright] = _KNEE + (1 - _KNEE) * np.tanh((image[bright] - _KNEE) / (1 - _KNEE))
    np.multiply(image, exam.gain * top, out=work)
    work += exam.offset * top + 0.5
    np.clip(work, 0, top, out=work)
    stored = work.astype(np.uint16)
    if side == "R":  # stored with the chest wall on the right edge, as scanners do for back-to-back hanging
        stored = np.ascontiguousarray(stored[:, ::-1])
    if exam.monochrome1:
        np.subtract(top, stored, out=stored)
    # Burned-in text is white on screen: the top stored value, or 0 where MONOCHROME1 shows 0 as white.
    _burn_marker(stored, side, view, exam.vendor, 0 if exam.monochrome1 else top)
    return stored


# --------------------------------------------------------------------------------------------------------
# Writing the data set


def _params(patients: int, prevalence: float, size: tuple[int, int], seed: int) -> dict:
    return {
        "generator_version": GENERATOR_VERSION,
        "patients": patients,
        "prevalence": prevalence,
        "size": [size[0], size[1]],
        "seed": seed,
    }


def _summary(out_dir: Path, counts: dict) -> dict:
    return {
        "n_images": int(counts["n_images"]),
        "n_positive_images": int(counts["n_positive_images"]),
        "n_patients": int(counts["n_patients"]),
        "n_exams": int(counts["n_exams"]),
        "manifest_csv": str(out_dir / "manifest.csv"),
        "embed_csv": str(out_dir / "metadata_embed.csv"),
        "embed_clinical_csv": str(out_dir / "clinical_embed.csv"),
        "reference_csv": str(out_dir / "metadata_reference.csv"),
        "dicom_dir": str(out_dir / "dicom"),
    }


def _validate(patients: int, prevalence: float, size: tuple[int, int], seed: int) -> tuple[int, float, tuple, int]:
    if isinstance(patients, bool) or int(patients) != patients or patients < 1:
        raise ValueError(f"patients must be a positive integer, got {patients!r}")
    if not 0.0 <= float(prevalence) <= 1.0:
        raise ValueError(f"prevalence must lie in [0, 1], got {prevalence!r}")
    if len(size) != 2 or any(int(s) != s for s in size):
        raise ValueError(f"size must be two integers (rows, columns), got {size!r}")
    rows, cols = int(size[0]), int(size[1])
    if rows < MIN_SIZE[0] or cols < MIN_SIZE[1]:
        raise ValueError(f"size must be at least {MIN_SIZE[0]}x{MIN_SIZE[1]} (rows x columns), got {rows}x{cols}")
    if int(seed) != seed or seed < 0:
        raise ValueError(f"seed must be an integer of 0 or more, got {seed!r}")
    return int(patients), float(prevalence), (rows, cols), int(seed)


def _read_marker(out_dir: Path) -> dict | None:
    try:
        return json.loads((out_dir / MARKER_FILE).read_text())
    except (OSError, ValueError):
        return None


def _existing(out_dir: Path, params: dict) -> dict | None:
    """Summary of a complete data set with these parameters; None when out_dir is absent or empty."""
    if not out_dir.exists():
        return None
    if not out_dir.is_dir():
        raise FileExistsError(f"{out_dir} exists and is not a folder")
    marker = _read_marker(out_dir)
    if marker is None:
        if not any(out_dir.iterdir()):
            return None
        raise FileExistsError(
            f"{out_dir} exists but holds no complete synthetic data set (no readable {MARKER_FILE}); "
            "remove it or choose another --out"
        )
    if marker.get("params") != params:
        raise FileExistsError(
            f"{out_dir} already holds a synthetic data set made with other parameters "
            f"({json.dumps(marker.get('params'), sort_keys=True)}, asked for {json.dumps(params, sort_keys=True)}); "
            "remove it or choose another --out"
        )
    summary = _summary(out_dir, marker["counts"])
    missing = [
        name
        for name in ("manifest_csv", "embed_csv", "embed_clinical_csv", "reference_csv", "dicom_dir")
        if not Path(summary[name]).exists()
    ]
    if missing:
        raise FileExistsError(f"{out_dir} is marked complete but lacks {', '.join(missing)}; remove it and rerun")
    return summary


def _partial_name(out_dir: Path) -> Path:
    return out_dir.parent / f".{out_dir.name}.partial-{socket.gethostname()}-{os.getpid()}"


def _remove_stale_partials(out_dir: Path) -> None:
    """Delete partial folders left by killed runs on this host (their process is gone)."""
    prefix = f".{out_dir.name}.partial-{socket.gethostname()}-"
    if not out_dir.parent.is_dir():
        return
    for candidate in out_dir.parent.glob(f"{prefix}*"):
        pid_text = candidate.name[len(prefix) :]
        if not pid_text.isdigit() or int(pid_text) == os.getpid():
            continue
        try:
            os.kill(int(pid_text), 0)
        except ProcessLookupError:
            shutil.rmtree(candidate, ignore_errors=True)
        except PermissionError:  # alive, owned by someone else
            continue


class _Progress:
    def __init__(self, total: int, enabled: bool) -> None:
        self.total, self.enabled = total, enabled
        self.start = time.perf_counter()
        self.next_report = 0.0
        self.tty = enabled and sys.stderr.isatty()

    def update(self, done: int) -> None:
        if not self.enabled or (done < self.total and done / self.total < self.next_report):
            return
        self.next_report = done / self.total + (0.02 if self.tty else 0.1)
        elapsed = time.perf_counter() - self.start
        line = f"synth: {done}/{self.total} images, {elapsed:.1f} s"
        print(
            ("\r" + line) if self.tty else line, end="\n" if not self.tty or done == self.total else "", file=sys.stderr
        )
        sys.stderr.flush()


def _write(root: Path, patients: int, prevalence: float, size: tuple[int, int], seed: int, progress: bool) -> dict:
    bank_size = 8
    plan = _plan(seed, patients, prevalence, bank_size)
    canvas = _Canvas(size, seed, bank_size)
    tables: dict[str, list[dict]] = {"manifest": [], "embed": [], "clinical": [], "reference": []}
    meter = _Progress(sum(4 * len(p.exams) for p in plan), progress)
    # The values are ours (and the tests read them back); pydicom's per-element validation would cost a tenth
    # of the run.
    with pydicom.config.disable_value_validation():
        for patient in plan:
            for exam in patient.exams:
                _write_exam(root, patient, exam, canvas, seed, tables)
                meter.update(len(tables["manifest"]))
    files = (
        ("manifest.csv", "manifest", MANIFEST_COLUMNS),
        ("metadata_embed.csv", "embed", EMBED_COLUMNS),
        ("clinical_embed.csv", "clinical", EMBED_CLINICAL_COLUMNS),
        ("metadata_reference.csv", "reference", REFERENCE_COLUMNS),
    )
    for name, key, columns in files:
        frame = pd.DataFrame(tables[key], columns=list(columns))
        if "path_severity" in frame.columns:
            frame["path_severity"] = frame["path_severity"].astype("Int64")  # blank, not "nan", when not biopsied
        frame.to_csv(root / name, index=False, lineterminator="\n")
    manifest = tables["manifest"]
    return {
        "n_images": len(manifest),
        "n_positive_images": sum(row["label"] for row in manifest),
        "n_patients": len(plan),
        "n_exams": sum(len(p.exams) for p in plan),
        "n_breasts": sum(2 * len(p.exams) for p in plan),
        "n_positive_breasts": sum(len(e.cancer) for p in plan for e in p.exams),
        "n_monochrome1_images": sum(row["PhotometricInterpretation"] == "MONOCHROME1" for row in tables["embed"]),
    }


def _write_exam(
    root: Path, patient: _Patient, exam: _Exam, canvas: _Canvas, seed: int, tables: dict[str, list[dict]]
) -> None:
    """Render and write the four images of one exam and append their rows to the tables."""
    size = (canvas.rows, canvas.cols)
    exam_dir = root / "dicom" / patient.patient_id / exam.exam_id
    exam_dir.mkdir(parents=True)
    ds = _exam_dataset(patient, exam, size, seed)
    assess_rng = _rng(seed, 5, patient.index, exam.number)
    common = {
        "empi_anon": patient.empi,
        "acc_anon": exam.accession,
        "study_date_anon": exam.study_date.isoformat(),
        "tissueden": patient.density,
        "age_at_study": exam.age,
    }
    findings_rows = []
    for side in _SIDES:
        breast = patient.breasts[side]
        letter, severity = _assessment(assess_rng, _findings(breast, exam, side))
        label = int(side in exam.cancer)
        # A missed cancer (assessed N at screening) still has its pathology, found at a later work-up.
        has_finding = letter != "N" or not math.isnan(severity)
        finding_side = side if has_finding else ""
        if has_finding:
            findings_rows.append({**common, "side": side, "asses": letter, "path_severity": severity})
        for view in _VIEWS:
            image_id = f"{exam.exam_id}_{side}{view}"
            relative = f"dicom/{patient.patient_id}/{exam.exam_id}/{image_id}.dcm"
            view_rng = _rng(seed, 3, patient.index, exam.number, _SIDES.index(side), _VIEWS.index(view))
            image = _render(canvas, view_rng, patient, breast, exam, side, view, seed)
            stored = _to_stored(image, exam, side, view, canvas.buffers[2])
            _set_image(ds, side, view, image_id, stored, seed)
            pydicom.dcmwrite(exam_dir / f"{image_id}.dcm", ds, enforce_file_format=True)
            tables["manifest"].append(
                {
                    "image_id": image_id,
                    "path": relative,
                    "label": label,
                    "patient_id": patient.patient_id,
                    "exam_id": exam.exam_id,
                    "laterality": side,
                    "view": view,
                    "dataset": DATASET_NAME,
                    "age": exam.age,
                    "density": _DENSITY_LETTERS[patient.density - 1],
                    "manufacturer": exam.vendor.manufacturer,
                    "birads": _ASSES_TO_BIRADS[letter],
                }
            )
            tables["embed"].append(
                {
                    **common,
                    "StudyDescription": "MG Screening Bilateral",
                    "SeriesDescription": f"{side} {view}",
                    "FinalImageType": "2D",
                    "ImageLateralityFinal": side,
                    "ViewPosition": view,
                    "spot_mag": math.nan,
                    "anon_dicom_path": relative,
                    "Manufacturer": exam.vendor.manufacturer,
                    "ManufacturerModelName": exam.vendor.model,
                    "PhotometricInterpretation": ds.PhotometricInterpretation,
                    "Rows": size[0],
                    "Columns": size[1],
                    "ETHNICITY_DESC": patient.ethnicity,
                    "asses": letter,
                    "side": finding_side,
                    "path_severity": severity,
                    "cancer": label,
                }
            )
            tables["reference"].append(
                {
                    "path_eq": relative,
                    "cancer": label,
                    "datasettype": DATASET_NAME,
                    "patient_id": patient.patient_id,
                    "tissueden": patient.density,
                    "ETHNICITY_DESC": patient.ethnicity,
                }
            )
    # EMBED's clinical table has one row per finding; a negative exam has one row with no side.
    if not findings_rows:
        findings_rows.append({**common, "side": "", "asses": "N", "path_severity": math.nan})
    for row in findings_rows:
        tables["clinical"].append({**row, "desc": "MG Screening Bilateral", "ETHNICITY_DESC": patient.ethnicity})


def generate(
    out_dir: str | os.PathLike,
    *,
    patients: int = 600,
    prevalence: float = 0.05,
    size: tuple[int, int] = (512, 416),
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """Write a synthetic screening-mammography data set as DICOM files plus metadata CSVs.

    The set is built in a hidden sibling folder and renamed into place at the end, with ``synth.json``
    written last, so an interrupted run never leaves a folder that looks complete. Calling again with the
    same parameters on a complete folder returns at once.

    Args:
        out_dir: Folder to create (or an empty one). See the module docstring for its layout.
        patients: Number of women; each has 1-3 exams of 4 images.
        prevalence: Fraction of breasts (patient x exam x side) with a cancer; when above 0, at least 2.
        size: Rows and columns of the stored images.
        seed: Seed of everything random; the same seed gives identical pixels and CSVs.
        progress: Print progress lines to stderr.

    Returns:
        ``n_images``, ``n_positive_images``, ``n_patients``, ``n_exams``, and the paths ``manifest_csv``,
        ``embed_csv``, ``embed_clinical_csv``, ``reference_csv`` and ``dicom_dir`` (strings).

    Raises:
        ValueError: A parameter is out of range.
        FileExistsError: ``out_dir`` holds something else: another data set (the message names the folder
            and both parameter sets), a partial or foreign folder, or a file.
    """
    patients, prevalence, size, seed = _validate(patients, prevalence, size, seed)
    out_dir = Path(out_dir).expanduser().absolute()
    params = _params(patients, prevalence, size, seed)
    existing = _existing(out_dir, params)
    if existing is not None:
        return existing
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(out_dir)
    partial = _partial_name(out_dir)
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    start = time.perf_counter()
    try:
        counts = _write(partial, patients, prevalence, size, seed, progress)
        marker = {"generator": "mammo_ray.synth", "params": params, "counts": counts}
        (partial / MARKER_FILE).write_text(json.dumps(marker, indent=2, sort_keys=True) + "\n")
        if out_dir.is_dir() and not any(out_dir.iterdir()):
            out_dir.rmdir()
        try:
            partial.rename(out_dir)
        except OSError:
            # Another process finished the same folder first: use it if it matches, else say why not.
            existing = _existing(out_dir, params)
            if existing is None:
                raise
            shutil.rmtree(partial, ignore_errors=True)
            return existing
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    if progress:
        print(
            f"synth: wrote {counts['n_images']} images to {out_dir} in {time.perf_counter() - start:.1f} s",
            file=sys.stderr,
        )
    return _summary(out_dir, counts)


def main(argv: list[str] | None = None) -> int:
    """Command line: ``python -m mammo_ray.synth --out DIR [--patients N] [--prevalence P] [--size H W]``.

    Args:
        argv: Arguments without the program name; ``sys.argv[1:]`` when None.

    Returns:
        0 on success, 2 when the output folder holds something else or a parameter is invalid.
    """
    parser = argparse.ArgumentParser(
        prog="python -m mammo_ray.synth",
        description="Write a synthetic screening-mammography data set (DICOM + EMBED-style and reference CSVs).",
    )
    parser.add_argument(
        "--out",
        required=True,
        type=Path,
        help="output folder: new or empty, or an earlier set made with the same parameters (reused as it is)",
    )
    parser.add_argument("--patients", type=int, default=600, help="number of women (default 600)")
    parser.add_argument("--prevalence", type=float, default=0.05, help="fraction of breasts with cancer (default 0.05)")
    parser.add_argument(
        "--size", type=int, nargs=2, default=(512, 416), metavar=("H", "W"), help="rows and columns (default 512 416)"
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument(
        "--smoke-test",
        action="store_true",
        help=f"tiny set: {SMOKE_PATIENTS} patients at {SMOKE_SIZE[0]}x{SMOKE_SIZE[1]} (overrides --patients/--size)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    args = parser.parse_args(argv)
    patients, size = (SMOKE_PATIENTS, SMOKE_SIZE) if args.smoke_test else (args.patients, tuple(args.size))
    try:
        summary = generate(
            args.out, patients=patients, prevalence=args.prevalence, size=size, seed=args.seed, progress=not args.quiet
        )
    except (FileExistsError, ValueError) as err:
        print(f"synth: error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    # The importable module's main, not this ``__main__`` copy's: Ray pickles ``__main__`` by value (see prepare.py).
    from mammo_ray import synth as _module

    raise SystemExit(_module.main())
