"""Importers: each public data set's own metadata tables → manifest rows, plus patient-level splitting.

Every importer is a pure function on tables (no image I/O, no Ray). It reads the CSVs a data set ships
with, keeps the images a screening classifier should see, derives the binary label the way that data
set's curators (or the papers built on it) define cancer, and returns one row per image with the
manifest columns of DESIGN.md "Manifests" (``split`` is added later by :func:`split_patients`).

Data sets and the references behind each label rule:

- **EMBED**: Jeong et al. 2023, "The EMory BrEast imaging Dataset (EMBED): a racially diverse, granular
  dataset of 3.4 million screening and diagnostic mammographic images", Radiology: Artificial
  Intelligence 5(1):e220047; table layout and merge rules from the EMBED_Open_Data README.
- **CSAW-CC**: Dembrower et al. 2020, "A multi-million mammography image dataset and population-based
  screening cohort for the training and evaluation of deep neural networks — the Cohort of Screen-Aged
  Women (CSAW)", Journal of Digital Imaging 33:408-413.
- **RSNA**: RSNA Screening Mammography Breast Cancer Detection challenge (Kaggle, 2023), ``train.csv``.
- **VinDr-Mammo**: Nguyen et al. 2023, "VinDr-Mammo: a large-scale benchmark dataset for computer-aided
  diagnosis in full-field digital mammography", Scientific Data 10:277.
- **CBIS-DDSM**: Lee et al. 2017, "A curated mammography data set for use in computer-aided detection and
  diagnosis research", Scientific Data 4:170177.

Paths come back joined with ``images_root`` as absolute POSIX strings (URIs such as ``s3://`` are joined
as text), so a manifest written anywhere still points at the images.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path, PurePosixPath

import numpy as np
import pandas as pd

from mammo_ray import manifest

SOURCES = ("embed", "csaw", "rsna", "vindr", "cbis", "seed", "generic")
MANIFEST_COLUMNS = ("image_id", "path", "label", "patient_id", "exam_id", "laterality", "view", "dataset")
OPTIONAL_COLUMNS = ("age", "density", "manufacturer", "birads")
SPLIT_NAMES = ("train", "valid", "test")

CsvPaths = str | Path | Sequence[str | Path]

# EMBED codes (EMBED_Open_Data README, "Clinical Data"): path_severity 0 = invasive cancer, 1 = non-invasive
# cancer (DCIS); 2 high-risk, 3 borderline, 4 benign, 5 normal tissue, 6 non-breast cancer.
EMBED_MALIGNANT_SEVERITY = (0, 1)
# asses letter → BI-RADS category (EMBED README section VI, and the release's
# references/AWS_Open_Data_Clinical_Legend.csv, which adds X = "No Assessment"). Ranked so that the "worst" assessment
# of a breast wins: a screening recall (A = BI-RADS 0) outranks 1-3 but not the diagnostic 4/5/6. X and a blank give
# no category.
_EMBED_ASSES = {"N": "1", "B": "2", "P": "3", "A": "0", "S": "4", "M": "5", "K": "6"}
_EMBED_ASSES_RANK = {letter: rank for rank, letter in enumerate("NBPASMK")}
_EMBED_ASSES_CODES = (*_EMBED_ASSES, "X")
# tissueden (README section VI and the legend): 1-4 = BI-RADS density A-D, 5 = normal male (no density); blank: none.
_EMBED_TISSUEDEN_CODES = ("1", "2", "3", "4", "5")
# FinalImageType (README section VII), compared upper-case without punctuation ("C-view", "cview"): 2D full-field
# images are imported; C-view (synthetic 2D from tomosynthesis) only with include_cview; 3D (tomosynthesis, not in the
# open release) and ROI_SSC/ROI_SS (radiologists' screen saves with a burned-in circle, not in the open release) never.
_EMBED_IMAGE_TYPES = {"2D": "2D", "CVIEW": "C-view", "3D": "3D", "ROISSC": "ROI_SSC", "ROISS": "ROI_SS"}
_DENSITY_CODES = {"1": "A", "2": "B", "3": "C", "4": "D"}
_VIEW_CODES = ("CC", "MLO", "ML", "LM", "XCCL", "XCCM", "AT", "LMO", "SIO", "FB", "CV", "RL", "RM", "TAN")


class ImportErrorWithContext(ValueError):
    """A source table that cannot become a manifest; the message names the file and what is wrong.

    Attributes:
        file: the offending file (or files), when known.
        missing: the missing column names, when that is the problem.
        rows: the first offending rows (numbered as :data:`manifest.ROW_COUNTING` says), when that is the problem.
    """

    def __init__(self, message: str, *, file: object = None, missing: Iterable[str] = (), rows: Iterable = ()):
        super().__init__(message)
        self.file = None if file is None else str(file)
        self.missing = list(missing)
        self.rows = list(rows)


# --------------------------------------------------------------------------------------------------------
# Small helpers shared by the importers


def _as_list(csv_paths: CsvPaths) -> list[Path]:
    if isinstance(csv_paths, (str, Path)):
        csv_paths = [csv_paths]
    paths = [Path(p) for p in csv_paths]
    if not paths:
        raise ValueError("no metadata CSV given (pass at least one --csv)")
    return paths


def _examples(values: Iterable, limit: int = 5) -> str:
    values = list(values)
    shown = ", ".join(str(v) for v in values[:limit])
    return shown + (f" and {len(values) - limit} more" if len(values) > limit else "")


def _read_csv(path: Path, wanted: Iterable[str] | None = None) -> pd.DataFrame:
    """Read a CSV as text (ids keep their leading zeros and full precision), header names stripped."""
    if not path.is_file():
        raise ImportErrorWithContext(f"{path}: file not found", file=path)
    keep = None if wanted is None else {w.strip() for w in wanted}
    try:
        frame = pd.read_csv(
            path,
            dtype=str,
            # Big tables (EMBED metadata has >100 columns): read only what the importer uses.
            usecols=None if keep is None else (lambda name: str(name).strip() in keep),
        )
    except Exception as err:  # pandas raises many types for a malformed file
        raise ImportErrorWithContext(f"{path}: cannot read it as CSV ({type(err).__name__}: {err})", file=path) from err
    frame.columns = [str(c).strip() for c in frame.columns]
    return frame


def _read_csv_header(path: Path) -> list[str]:
    if not path.is_file():
        raise ImportErrorWithContext(f"{path}: file not found", file=path)
    try:
        return [str(c).strip() for c in pd.read_csv(path, nrows=0).columns]
    except Exception as err:
        raise ImportErrorWithContext(f"{path}: cannot read it as CSV ({type(err).__name__}: {err})", file=path) from err


def _require(frame: pd.DataFrame, path: Path, required: Iterable[str | tuple[str, ...]], what: str) -> None:
    """Raise naming the file and every missing column; a tuple means "any one of these spellings"."""
    missing = []
    for item in required:
        options = (item,) if isinstance(item, str) else item
        if not any(o in frame.columns for o in options):
            missing.append(" or ".join(repr(o) for o in options))
    if missing:
        raise ImportErrorWithContext(
            f"{path}: not a {what} table: missing column(s) {', '.join(missing)}; found {_examples(frame.columns, 30)}",
            file=path,
            missing=missing,
        )


def _pick(frame: pd.DataFrame, *names: str) -> str | None:
    return next((n for n in names if n in frame.columns), None)


_norm_id = manifest.norm_id  # ids as clean text, as read_manifest reads them
# Rows are named as every manifest error names them (data rows from 1, header not counted). The tables here are read
# whole with a fresh index, so a row's index label is its position in its file.
_row_label = manifest.row_label
_row_number = manifest.row_number
ROW_COUNTING = manifest.ROW_COUNTING


def _check_binary(values: pd.Series, path: Path | str, column: str) -> pd.Series:
    """Labels as int 0/1; anything else is an error naming the first bad rows and their count."""
    numeric = pd.to_numeric(values, errors="coerce")
    bad = values.index[~numeric.isin([0, 1])]
    if len(bad):
        shown = [f"{_row_label(i)} ({values[i]!r})" for i in bad]
        raise ImportErrorWithContext(
            f"{path}: {len(bad)} label(s) in column {column!r} outside {{0, 1}}: {_examples(shown)} ({ROW_COUNTING})",
            file=path,
            rows=[_row_number(i) for i in bad[:5]],
        )
    return numeric.astype("int64")


_SIDES = ("L", "LEFT", "R", "RIGHT")


def _blank(values: pd.Series) -> pd.Series:
    text = values.astype("string").str.strip()
    return (text.isna() | (text == "")).astype(bool)


def _refuse_rows(values: pd.Series, bad: pd.Series, path: Path | str, column: str, expected: str | None) -> None:
    """Raise naming the file, the column, the first rows where ``bad`` holds and their values.

    A coded column read without this check turned every value outside its code set into "no cancer" (or dropped
    the row), silently. ``expected`` says what the column may hold; None means it may not be blank.
    """
    bad = bad.fillna(False).astype(bool)
    if not bad.any():
        return
    index = values.index[bad.to_numpy()]
    if expected is None:
        shown, what = [_row_label(i) for i in index], "is blank"
    else:
        blank = _blank(values)
        shown = [f"{_row_label(i)} ({'blank' if blank[i] else repr(values[i])})" for i in index]
        what = f"is not {expected}"
    raise ImportErrorWithContext(
        f"{path}: {len(index)} row(s) whose {column!r} {what}: {_examples(shown)} ({ROW_COUNTING})",
        file=path,
        rows=[_row_number(i) for i in index[:5]],
    )


def _refuse_unknown(values: pd.Series, known: Iterable[str], path: Path | str, column: str, expected: str) -> None:
    """Refuse a filled-in value outside ``known`` (compared stripped and upper-case); blanks pass."""
    text = values.astype("string").str.strip().str.upper()
    _refuse_rows(values, ~_blank(values) & ~text.isin(list(known)), path, column, expected)


def _laterality(values: pd.Series) -> pd.Series:
    text = values.astype("string").str.strip().str.upper()
    mapped = text.map({"L": "L", "LEFT": "L", "R": "R", "RIGHT": "R"})
    return mapped.fillna("U").astype(object)


def _laterality_or_name(values: pd.Series, parsed: pd.Series, where: pd.Series) -> pd.Series:
    """A table's laterality column, and where a row's value is not L/R (blank, ``X``, ``B``), what its file name
    says, else "U".

    A value that is neither blank nor "U" and is not a side is warned about with its rows: an image of unknown side
    is scored as a breast of its own at breast level. ``where`` names each row ("file.csv row 3").
    """
    given = _laterality(values)
    text = values.astype("string").str.strip().str.upper()
    odd = given.eq("U") & text.notna() & ~text.isin(["", "U", "UNKNOWN"])
    if odd.any():
        shown = [f"{where[i]} ({values[i]!r})" for i in odd[odd].index[:3]]
        warnings.warn(
            f"{int(odd.sum())} laterality value(s) other than L, R, LEFT or RIGHT, e.g. {', '.join(shown)} "
            f"({ROW_COUNTING}): those "
            "rows take the side their file name gives (…_L_CC, RMLO), else U; an image of unknown side counts as a "
            "breast of its own in the breast-level metrics",
            UserWarning,
            stacklevel=3,
        )
    return given.where(given != "U", parsed)


def _row_names(path: Path | str, index: pd.Index) -> pd.Series:
    """ "file.csv row N" for each data row of one file's table, kept through a concat of several files (and through
    the filtering and grouping after it), so that :func:`_finalize` names the file and its own row."""
    return pd.Series([f"{path} {_row_label(i)}" for i in index], index=index, dtype=object)


def _row_name_number(name: str) -> int:
    """N of a :func:`_row_names` name."""
    return int(str(name).rsplit(" ", 1)[1])


def _view(values: pd.Series) -> pd.Series:
    # CC and MLO are the screening views; anything else (ML, LM, XCCL, AT...) is kept as its own code.
    text = values.astype("string").str.strip().str.upper().str.replace(" ", "", regex=False)
    return text.fillna("U").replace("", "U").astype(object)


def _density(values: pd.Series) -> pd.Series:
    """BI-RADS density as "A".."D": accepts 1-4 (EMBED ``tissueden``, CBIS), letters, or "DENSITY A" (VinDr)."""
    text = _norm_id(values).str.upper().str.replace("DENSITY", "", regex=False).str.strip()
    mapped = text.map(lambda v: _DENSITY_CODES.get(v, v if v in ("A", "B", "C", "D") else None), na_action="ignore")
    return mapped.astype(object).where(mapped.notna(), None)


def _text_or_none(values: pd.Series) -> pd.Series:
    text = values.astype("string").str.strip()
    text = text.where(text != "")
    return text.astype(object).where(text.notna(), None)


def _root(images_root: str | Path) -> str:
    root = str(images_root)
    if "://" in root:
        return root.rstrip("/")
    return Path(os.path.abspath(os.path.expanduser(root))).as_posix()


def _is_absolute(path: str) -> bool:
    return "://" in path or path.startswith("/") or bool(re.match(r"^[A-Za-z]:/", path))


def _clean_relative(path: str) -> str:
    path = path.strip().replace("\\", "/")
    while path.startswith("./"):
        path = path[2:]
    return path


def _join(root: str, relative: pd.Series) -> pd.Series:
    """Join relative paths under the images root; absolute paths and URIs are kept as they are, blanks stay
    blank (and are reported by :func:`_finalize`)."""
    joined = []
    for value in relative:
        if pd.isna(value) or not str(value).strip():
            joined.append(None)
            continue
        path = _clean_relative(str(value))
        joined.append(path if _is_absolute(path) else f"{root}/{path}")
    return pd.Series(joined, index=relative.index, dtype=object)


def _finalize(frame: pd.DataFrame, files: Sequence[Path], extra: Sequence[str] = ()) -> pd.DataFrame:
    """Order and type the manifest columns, then refuse empty ids and duplicate image ids."""
    where = ", ".join(str(f) for f in files)
    if frame.empty:
        raise ImportErrorWithContext(f"{where}: no image rows left after filtering", file=where)
    out = pd.DataFrame(index=frame.index)
    for column in MANIFEST_COLUMNS:
        out[column] = frame[column]
    for column in OPTIONAL_COLUMNS:
        out[column] = frame[column] if column in frame.columns else None
    for column in extra:
        if column in frame.columns:
            out[column] = _text_or_none(frame[column])
    for column in ("path", "image_id", "patient_id", "exam_id"):
        text = out[column].astype("string").str.strip()
        empty = out.index[text.isna() | (text == "")]
        if len(empty):
            if ROW_NAME in frame.columns:  # the file and its own row, not the row of the concat or the filtered table
                names = [frame.at[i, ROW_NAME] for i in empty]
                rows = [_row_name_number(name) for name in names[:5]]
            else:  # a table given to _finalize without its rows' names: its own rows
                names, rows = [_row_label(i) for i in empty], [_row_number(i) for i in empty[:5]]
            raise ImportErrorWithContext(
                f"{where}: {len(empty)} row(s) with an empty {column}, e.g. {_examples(names)} ({ROW_COUNTING})",
                file=where,
                rows=rows,
            )
        out[column] = text.astype(str)
    for column in ("laterality", "view", "dataset"):
        out[column] = out[column].astype(str)
    out["label"] = out["label"].astype("int64")
    out["age"] = pd.to_numeric(out["age"], errors="coerce").astype("float64")
    for column in ("density", "manufacturer", "birads"):
        values = out[column].astype(object)
        out[column] = values.where(values.notna(), None)
    duplicated = out["image_id"][out["image_id"].duplicated()].unique()
    if len(duplicated):
        shown = list(duplicated)
        if ROW_NAME in frame.columns:
            rows = frame[ROW_NAME].groupby(out["image_id"]).agg(lambda names: _examples(names, 3))
            shown = [f"{image_id} ({rows[image_id]})" for image_id in duplicated]
        raise ImportErrorWithContext(
            f"{where}: {len(duplicated)} duplicate image_id(s): {_examples(shown)}"
            + (f" ({ROW_COUNTING})" if ROW_NAME in frame.columns else ""),
            file=where,
        )
    return out.reset_index(drop=True)


ROW_NAME = "_row_name"  # "file.csv row N", carried by importers that concatenate several files
_LAT_TOKENS = {"L": "L", "LEFT": "L", "R": "R", "RIGHT": "R"}
_COMBINED = re.compile(r"^(L|R)(" + "|".join(sorted(_VIEW_CODES, key=len, reverse=True)) + r")$")


def _parse_name(path: str) -> tuple[str, str]:
    """Laterality and view from a file name such as ``p1_L_CC.png``, ``RMLO.dcm`` or ``left-cc.png``."""
    stem = PurePosixPath(path.replace("\\", "/")).stem.upper()
    laterality, view = "U", "U"
    for token in re.split(r"[^A-Z0-9]+", stem):
        combined = _COMBINED.match(token)
        if combined:
            laterality, view = combined.group(1), combined.group(2)
        elif token in _LAT_TOKENS and laterality == "U":
            laterality = _LAT_TOKENS[token]
        elif token in _VIEW_CODES and view == "U":
            view = token
    return laterality, view


def _parse_names(paths: pd.Series) -> tuple[pd.Series, pd.Series]:
    parsed = [_parse_name(str(p)) for p in paths]
    return (
        pd.Series([p[0] for p in parsed], index=paths.index, dtype=object),
        pd.Series([p[1] for p in parsed], index=paths.index, dtype=object),
    )


# --------------------------------------------------------------------------------------------------------
# Dispatch


def import_source(source: str, csv_paths: CsvPaths, images_root: str | Path, **options) -> pd.DataFrame:
    """Build manifest rows from one source's own tables.

    Args:
        source: one of :data:`SOURCES`.
        csv_paths: the source's metadata CSV(s); sources that ship several tables take all of them.
        images_root: the folder (or URI) the source's relative image paths hang from.
        **options: passed to the source's importer (e.g. ``include_cview=True`` for EMBED).

    Returns:
        One row per image with the manifest columns (no ``split``).

    Raises:
        ValueError: unknown source, listing :data:`SOURCES`.
        ImportErrorWithContext: a table that cannot be imported, naming the file and the problem.
    """
    importers = {
        "embed": import_embed,
        "csaw": import_csaw,
        "rsna": import_rsna,
        "vindr": import_vindr,
        "cbis": import_cbis,
        "seed": import_seed,
        "generic": import_generic,
    }
    key = str(source).strip().lower()
    if key not in importers:
        raise ValueError(f"unknown source {source!r}; choose one of {', '.join(SOURCES)}")
    return importers[key](csv_paths, images_root, **options)


# --------------------------------------------------------------------------------------------------------
# EMBED

_EMBED_META_REQUIRED = (
    "empi_anon",
    "acc_anon",
    "anon_dicom_path",
    "ImageLateralityFinal",
    "ViewPosition",
    "FinalImageType",
)
_EMBED_META_OPTIONAL = ("Manufacturer", "spot_mag", "study_date_anon", "StudyDescription")
_EMBED_CLIN_REQUIRED = ("empi_anon", "acc_anon", "side", "path_severity")
_EMBED_CLIN_OPTIONAL = ("bside", "asses", "tissueden", "age_at_study", "study_date_anon", "desc")


def _embed_relative(path: str) -> str:
    """Re-root ``anon_dicom_path`` (``/mnt/NAS2/mammo/anon_dicom/cohort_1/<empi>/<study>/<series>/<sop>.dcm``
    in the release, ``images/cohort_1/...`` in the AWS bucket) so that it starts at the cohort folder."""
    path = path.strip().replace("\\", "/")
    parts = [p for p in path.split("/") if p]
    for i, part in enumerate(parts):
        if re.fullmatch(r"cohort_?\d+", part, flags=re.IGNORECASE):
            return "/".join(parts[i:])
    if "/anon_dicom/" in path:
        return path.split("/anon_dicom/", 1)[1]
    if path.startswith("images/"):
        return path[len("images/") :]
    return path


_EMBED_SIDES = {"L": "L", "R": "R", "B": "B", "LEFT": "L", "RIGHT": "R", "BILATERAL": "B"}


def _embed_side(values: pd.Series) -> pd.Series:
    text = values.astype("string").str.strip().str.upper()
    return text.map(_EMBED_SIDES)


def _embed_image_type(values: pd.Series) -> pd.Series:
    return values.astype("string").str.upper().str.replace(r"[^A-Z0-9]", "", regex=True)


def _embed_image_type_kept(values: pd.Series, include_cview: bool) -> pd.Series:
    return _embed_image_type(values).isin(["2D", "CVIEW"] if include_cview else ["2D"]).fillna(False).astype(bool)


def _check_embed_metadata(frame: pd.DataFrame, path: Path, include_cview: bool) -> None:
    """Refuse a ``FinalImageType`` outside the README's types: it decides whether the row is a full-field image, and
    a value read as "not 2D" dropped the image without a word (a misspelt "2-D" screening image). A blank one is left
    out with a warning that counts it and names its first rows: the importer cannot tell it from a C-view or a screen
    save, and the README, which does not document blanks, does not rule them out either, so one blank cell of a
    480,000-row table should not stop the import. Then a kept image's ``ImageLateralityFinal`` must be L, R or blank.
    """
    image_type = frame["FinalImageType"]
    blank = _blank(image_type)
    known = _embed_image_type(image_type).isin(list(_EMBED_IMAGE_TYPES)).fillna(False).astype(bool)
    expected = f"one of {', '.join(_EMBED_IMAGE_TYPES.values())}"
    _refuse_rows(image_type, ~known & ~blank, path, "FinalImageType", expected)
    if blank.any():
        rows = [_row_label(i) for i in image_type.index[blank.to_numpy()]]
        warnings.warn(
            f"{path}: {len(rows)} row(s) with a blank 'FinalImageType' left out, e.g. {_examples(rows)} "
            f"({ROW_COUNTING}): the importer cannot tell a full-field image from a C-view or a screen save",
            UserWarning,
            stacklevel=3,
        )
    kept = frame[_embed_image_type_kept(image_type, include_cview)]
    _refuse_unknown(kept["ImageLateralityFinal"], _SIDES, path, "ImageLateralityFinal", "L or R")


def _check_embed_clinical(frame: pd.DataFrame, path: Path) -> None:
    """Refuse codes outside the EMBED README's sets (section VI) and its clinical legend: ``path_severity`` 0-6 or
    blank (no pathology), ``side``/``bside`` L, R, B or blank, ``asses`` A, N, B, P, S, M, K, X (no assessment) or
    blank, ``tissueden`` 1-5 or blank. Before, ``path_severity`` "malignant" was read as no cancer, an unknown side as
    both breasts, and an unknown assessment or density as none (BI-RADS "4" or density "C" left the columns empty)."""
    severity = pd.to_numeric(frame["path_severity"], errors="coerce")
    outside = ~_blank(frame["path_severity"]) & ~severity.isin(range(7))
    _refuse_rows(frame["path_severity"], outside, path, "path_severity", "a code 0-6 or blank")
    for column in ("side", "bside"):
        if column in frame.columns:
            _refuse_unknown(frame[column], _EMBED_SIDES, path, column, "L, R, B or blank")
    if "asses" in frame.columns:
        expected = "a BI-RADS letter A, N, B, P, S, M, K, X (no assessment) or blank"
        _refuse_unknown(frame["asses"], _EMBED_ASSES_CODES, path, "asses", expected)
    if "tissueden" in frame.columns:
        # 2.0 (a float column after a spreadsheet) is 2, as ids are read.
        density = _norm_id(frame["tissueden"])
        _refuse_unknown(density, _EMBED_TISSUEDEN_CODES, path, "tissueden", "a code 1-4, 5 (normal male) or blank")


def import_embed(
    csv_paths: CsvPaths,
    images_root: str | Path,
    *,
    window_days: int | None = 365,
    include_cview: bool = False,
    include_spot_mag: bool = False,
    screening_only: bool = False,
) -> pd.DataFrame:
    """EMBED: join the image table (``EMBED_OpenData_metadata*.csv``) with the clinical table
    (``EMBED_OpenData_clinical*.csv``, one row per finding). Files are told apart by their columns.

    Label rule (one label per image = per exam × breast). An image is positive when a clinical row of the
    same patient carries a pathology result ``path_severity`` in {0, 1} (invasive or in-situ cancer) for
    that breast, and that row belongs either to the image's own exam or to an exam of the same patient
    dated 0 to ``window_days`` days after it. The breast of a pathology result is ``bside`` when present,
    else the finding's ``side``; ``B`` (bilateral) and a blank side apply to both breasts, which is how the
    EMBED README (section VIII) tells users to join findings to images. The forward window follows the
    EMBED README (section IX: pathology may be recorded only on the diagnostic work-up, so attribute it
    back to earlier exams by date) and the EMBED screening-label workflow
    (``resources/notebooks/screening_label_assignment.ipynb``: recall work-up within 180 days, interval
    cancers within 365 days). ``window_days=None`` or 0 uses the exam's own findings only. Images whose
    exam has no clinical row have no known outcome and are dropped with a warning. A ``path_severity`` outside
    0-6, a ``side``/``bside`` outside L/R/B, an ``asses`` outside A/N/B/P/S/M/K/X, a ``tissueden`` outside 1-5, a
    ``FinalImageType`` outside the README's types (or blank) and a kept image's ``ImageLateralityFinal`` outside L/R
    are refused, naming the file, row, column and value (blanks stay: no pathology, both breasts, no assessment, no
    density, unknown side). The codes are those of the EMBED README (sections VI and VII) and the release's clinical
    legend (``references/AWS_Open_Data_Clinical_Legend.csv``).

    Kept images: ``FinalImageType`` "2D", the full-field digital mammogram. "C-view" (a synthetic 2D image
    reconstructed from tomosynthesis, about a quarter of the open release's images) is left out unless
    ``include_cview``: its pixels differ from a full-field image's, and an exam holding both would show each view
    twice. "3D" and the screen saves "ROI_SSC"/"ROI_SS" (not in the open release) are always left out.
    Leaving them out is expected of the release's own tables, so it is not an error; any other value, or a blank
    one, is (the importer cannot tell whether it is a full-field image). Spot-compression and magnification views
    (``spot_mag`` = 1) are dropped unless ``include_spot_mag``, because they exist mostly for suspicious findings and
    would hand the model a shortcut. ``screening_only`` keeps exams whose description mentions "screen".

    Mapping: ``empi_anon`` → patient_id, ``acc_anon`` → exam_id, ``ImageLateralityFinal`` → laterality,
    ``ViewPosition`` → view, ``Manufacturer`` → manufacturer, ``age_at_study`` → age, ``tissueden``
    1-4 → density A-D (5, "normal male", → None), worst ``asses`` of that breast → birads ("0".."6"; X, "no
    assessment", → None), ``anon_dicom_path`` re-rooted at its ``cohort_N`` folder → path and image_id.

    Args:
        csv_paths: at least one metadata and one clinical table (several of each are concatenated).
        images_root: the folder holding ``cohort_1/``, ``cohort_2/``.
        window_days: days after an exam during which a malignant pathology still labels it positive.
        include_cview: keep synthetic 2D (C-view) images too.
        include_spot_mag: keep spot-compression / magnification views.
        screening_only: keep screening exams only.
    """
    paths = _as_list(csv_paths)
    metadata, clinical = [], []
    for path in paths:
        header = _read_csv_header(path)
        if "anon_dicom_path" in header:
            frame = _read_csv(path, _EMBED_META_REQUIRED + _EMBED_META_OPTIONAL)
            _require(frame, path, _EMBED_META_REQUIRED, "EMBED metadata")
            _check_embed_metadata(frame, path, include_cview)
            frame[ROW_NAME] = _row_names(path, frame.index)
            metadata.append(frame)
        elif "path_severity" in header or "asses" in header or "side" in header:
            frame = _read_csv(path, _EMBED_CLIN_REQUIRED + _EMBED_CLIN_OPTIONAL)
            _require(frame, path, _EMBED_CLIN_REQUIRED, "EMBED clinical")
            _check_embed_clinical(frame, path)
            clinical.append(frame)
        else:
            raise ImportErrorWithContext(
                f"{path}: neither an EMBED metadata table (needs 'anon_dicom_path') nor a clinical table "
                f"(needs 'path_severity'); found {_examples(header, 30)}",
                file=path,
                missing=["anon_dicom_path or path_severity"],
            )
    where = ", ".join(str(p) for p in paths)
    if not metadata or not clinical:
        lacking = "metadata (EMBED_OpenData_metadata.csv)" if not metadata else "clinical (EMBED_OpenData_clinical.csv)"
        raise ImportErrorWithContext(f"{where}: EMBED needs both tables; no {lacking} table given", file=where)

    meta = pd.concat(metadata, ignore_index=True)
    clin = pd.concat(clinical, ignore_index=True)
    for frame in (meta, clin):
        frame["empi_anon"] = _norm_id(frame["empi_anon"])
        frame["acc_anon"] = _norm_id(frame["acc_anon"])

    keep = _embed_image_type_kept(meta["FinalImageType"], include_cview)
    if "spot_mag" in meta.columns and not include_spot_mag:
        keep &= pd.to_numeric(meta["spot_mag"], errors="coerce").fillna(0) != 1
    meta = meta[keep].drop_duplicates(subset="anon_dicom_path").copy()

    if screening_only:
        desc = clin.groupby("acc_anon")["desc"].first() if "desc" in clin.columns else None
        if desc is None and "StudyDescription" in meta.columns:
            desc = meta.groupby("acc_anon")["StudyDescription"].first()
        if desc is None:
            raise ImportErrorWithContext(
                f"{where}: screening_only needs 'desc' (clinical) or 'StudyDescription' (metadata)",
                file=where,
                missing=["desc or StudyDescription"],
            )
        screening = set(desc.index[desc.astype("string").str.contains("screen", case=False, na=False)])
        meta = meta[meta["acc_anon"].isin(screening)]

    known = set(clin["acc_anon"])
    unknown = ~meta["acc_anon"].isin(known)
    if unknown.any():
        warnings.warn(
            f"EMBED: dropped {int(unknown.sum())} image(s) of {meta.loc[unknown, 'acc_anon'].nunique()} exam(s) "
            f"with no clinical row (outcome unknown), e.g. exams {_examples(meta.loc[unknown, 'acc_anon'].unique())}",
            UserWarning,
            stacklevel=2,
        )
        meta = meta[~unknown]

    meta["laterality"] = _laterality(meta["ImageLateralityFinal"])
    # Exam dates: the clinical date (report signed) first, the acquisition date where the report has none.
    exam_date = pd.Series(dtype="datetime64[ns]")
    if "study_date_anon" in clin.columns:
        exam_date = pd.to_datetime(clin.groupby("acc_anon")["study_date_anon"].first(), errors="coerce", format="mixed")
    if "study_date_anon" in meta.columns:
        acquired = pd.to_datetime(meta.groupby("acc_anon")["study_date_anon"].first(), errors="coerce", format="mixed")
        exam_date = exam_date.combine_first(acquired) if len(exam_date) else acquired

    # Malignant pathology events: (patient, exam, breast, date).
    event_side = _embed_side(clin["side"])
    if "bside" in clin.columns:
        bside = _embed_side(clin["bside"])
        event_side = bside.where(bside.notna(), event_side)
    severity = pd.to_numeric(clin["path_severity"], errors="coerce")
    events = pd.DataFrame(
        {
            "empi_anon": clin["empi_anon"],
            "event_acc": clin["acc_anon"],
            "event_side": event_side.fillna("B").astype(object),
        }
    )[severity.isin(EMBED_MALIGNANT_SEVERITY).to_numpy()]
    events["event_date"] = events["event_acc"].map(exam_date) if len(exam_date) else pd.NaT

    breasts = meta[["empi_anon", "acc_anon", "laterality"]].drop_duplicates()
    breasts["date"] = breasts["acc_anon"].map(exam_date) if len(exam_date) else pd.NaT
    pairs = breasts.merge(events, on="empi_anon", how="inner")
    side_match = (pairs["event_side"] == "B") | (pairs["event_side"] == pairs["laterality"])
    same_exam = pairs["event_acc"] == pairs["acc_anon"]
    if window_days:
        delta = (pd.to_datetime(pairs["event_date"]) - pd.to_datetime(pairs["date"])).dt.days
        within = delta.between(0, window_days).fillna(False).astype(bool)
    else:
        within = pd.Series(False, index=pairs.index)
    positive = pairs[side_match & (same_exam | within)]
    positive_keys = set(zip(positive["acc_anon"], positive["laterality"], strict=True))

    # Per-breast BI-RADS: the worst assessment among findings on that breast (or bilateral / unsided).
    birads: dict[tuple[str, str], str] = {}
    if "asses" in clin.columns:
        letters = clin["asses"].astype("string").str.strip().str.upper()
        rank = letters.map(_EMBED_ASSES_RANK)
        finding_side = _embed_side(clin["side"]).fillna("B")
        assessed = pd.DataFrame({"acc": clin["acc_anon"], "side": finding_side, "rank": rank}).dropna(subset=["rank"])
        expanded = pd.concat(
            [
                assessed[assessed["side"].isin(["L", "B"])].assign(side="L"),
                assessed[assessed["side"].isin(["R", "B"])].assign(side="R"),
            ]
        )
        worst = expanded.groupby(["acc", "side"])["rank"].max()
        order = "NBPASMK"
        birads = {key: _EMBED_ASSES[order[int(r)]] for key, r in worst.items()}

    def per_exam(column: str) -> pd.Series:
        if column not in clin.columns:
            return pd.Series(None, index=meta.index, dtype=object)
        first = clin.dropna(subset=[column]).groupby("acc_anon")[column].first()
        return meta["acc_anon"].map(first)

    relative = meta["anon_dicom_path"].map(_embed_relative, na_action="ignore")
    keys = list(zip(meta["acc_anon"], meta["laterality"], strict=True))
    rows = pd.DataFrame(
        {
            "image_id": relative,
            "path": _join(_root(images_root), relative),
            "label": [int(k in positive_keys) for k in keys],
            "patient_id": meta["empi_anon"],
            "exam_id": meta["acc_anon"],
            "laterality": meta["laterality"],
            "view": _view(meta["ViewPosition"]),
            "dataset": "EMBED",
            "age": pd.to_numeric(per_exam("age_at_study"), errors="coerce"),
            "density": _density(per_exam("tissueden")),
            "manufacturer": _text_or_none(meta["Manufacturer"]) if "Manufacturer" in meta.columns else None,
            "birads": [birads.get(k) for k in keys],
        },
        index=meta.index,
    )
    rows[ROW_NAME] = meta[ROW_NAME]
    return _finalize(rows, paths)


# --------------------------------------------------------------------------------------------------------
# CSAW-CC

_CSAW_REQUIRED = (
    "anon_patientid",
    "exam_year",
    "x_cancer_laterality",
    "imagelaterality",
    "viewposition",
    "anon_filename",
)


_CSAW_BOTH = ("B", "BOTH", "BILATERAL")


def _check_csaw(frame: pd.DataFrame, path: Path, use_timing: bool) -> None:
    """Refuse codes the label cannot be read from: ``x_cancer_laterality`` other than Left/Right/both or blank (a
    control), ``imagelaterality`` other than Left/Right (blank only where the row's cancer side does not need it),
    ``rad_timing`` that is not a whole-number code. Before, each of them made a cancer breast "no cancer"."""
    cancer = frame["x_cancer_laterality"]
    _refuse_unknown(cancer, (*_SIDES, *_CSAW_BOTH), path, "x_cancer_laterality", "Left, Right, Both or blank (control)")
    image = frame["imagelaterality"]
    _refuse_unknown(image, _SIDES, path, "imagelaterality", "Left or Right")
    one_side = cancer.astype("string").str.strip().str.upper().isin(_SIDES)
    _refuse_rows(image, _blank(image) & one_side, path, "imagelaterality", "Left or Right (on a case's image)")
    if use_timing and "rad_timing" in frame.columns:
        timing = pd.to_numeric(frame["rad_timing"], errors="coerce")
        outside = ~_blank(frame["rad_timing"]) & ~(timing.notna() & (timing % 1 == 0))
        _refuse_rows(frame["rad_timing"], outside, path, "rad_timing", "a whole number (CSAW-CC codes 1-3) or blank")


def import_csaw(
    csv_paths: CsvPaths, images_root: str | Path, *, positive_timings: Sequence[int] | None = (1, 2)
) -> pd.DataFrame:
    """CSAW-CC (case-control subset of CSAW): one row per image already.

    Label rule: an image is positive when its breast is the cancer breast (``x_cancer_laterality`` equals
    ``imagelaterality``, "Left"/"Right") and the exam falls in the screening window, i.e. ``rad_timing`` is
    in ``positive_timings``: 1 = cancer found at this screen (screen-detected), 2 = cancer surfaced before
    the next screen (interval cancer). Earlier exams of cancer patients (``rad_timing`` 3, a round or more
    before diagnosis) and every image of a control are 0. Pass ``positive_timings=None`` (or use a table
    without ``rad_timing``) to label every exam of the cancer breast positive. A blank ``x_cancer_laterality``
    marks a control; any other value than Left/Right/both, an ``imagelaterality`` other than Left/Right (blank is
    allowed where the cancer side does not need it) and a ``rad_timing`` that is not a whole number are refused,
    naming the file and row.

    Mapping: ``anon_patientid`` → patient_id, ``anon_patientid`` + ``exam_year`` → exam_id,
    ``imagelaterality`` → laterality, ``viewposition`` → view, ``anon_filename`` → path and image_id.
    ``x_age`` becomes age only when it holds years; the public release codes it as an age band (1/2),
    which is not an age. CSAW-CC has no BI-RADS density (LIBRA percent density instead), BI-RADS or
    manufacturer column, so those stay empty.
    """
    paths = _as_list(csv_paths)
    frames = []
    for path in paths:
        frame = _read_csv(path)
        _require(frame, path, _CSAW_REQUIRED, "CSAW-CC")
        _check_csaw(frame, path, use_timing=positive_timings is not None)
        laterality = _laterality(frame["imagelaterality"])
        cancer_side = _laterality(frame["x_cancer_laterality"])
        both = frame["x_cancer_laterality"].astype("string").str.strip().str.upper().isin(_CSAW_BOTH)
        in_breast = ((cancer_side == laterality) & (laterality != "U")) | both
        if "rad_timing" in frame.columns and positive_timings is not None:
            timing = pd.to_numeric(frame["rad_timing"], errors="coerce")
            in_window = timing.isin(list(positive_timings))
        else:
            in_window = pd.Series(True, index=frame.index)
        patient = _norm_id(frame["anon_patientid"])
        year = _norm_id(frame["exam_year"])
        age = pd.Series(np.nan, index=frame.index)
        if "x_age" in frame.columns:
            numeric_age = pd.to_numeric(frame["x_age"], errors="coerce")
            if numeric_age.dropna().ge(18).all() and numeric_age.notna().any():
                age = numeric_age
        relative = frame["anon_filename"].astype("string").str.strip()
        frames.append(
            pd.DataFrame(
                {
                    "image_id": relative,
                    "path": _join(_root(images_root), relative),
                    "label": (in_breast & in_window).astype("int64"),
                    "patient_id": patient,
                    "exam_id": patient + "_" + year,
                    "laterality": laterality,
                    "view": _view(frame["viewposition"]),
                    "dataset": "CSAW",
                    "age": age,
                    ROW_NAME: _row_names(path, frame.index),
                }
            )
        )
    return _finalize(pd.concat(frames, ignore_index=True), paths)


# --------------------------------------------------------------------------------------------------------
# RSNA 2023

_RSNA_REQUIRED = ("patient_id", "image_id", "laterality", "view", "cancer")


def import_rsna(csv_paths: CsvPaths, images_root: str | Path, *, extension: str = ".dcm") -> pd.DataFrame:
    """RSNA Screening Mammography Breast Cancer Detection (2023) ``train.csv``.

    Label rule: the challenge's own ``cancer`` column (biopsy-proven cancer of that breast), checked to be
    0/1. RSNA releases one screening exam per patient, so exam_id = patient_id.

    Mapping: ``patient_id`` → patient_id and exam_id, ``image_id`` → image_id, path =
    ``{patient_id}/{image_id}{extension}`` under ``images_root`` (``extension=".png"`` for converted
    copies), ``laterality``/``view`` as given (AT, ML, LM... kept), ``age``, ``density`` A-D,
    ``BIRADS`` (0/1/2, blank for most) → birads, ``machine_id`` → manufacturer (RSNA publishes a scanner
    id, not a vendor name).
    """
    paths = _as_list(csv_paths)
    frames = []
    for path in paths:
        frame = _read_csv(path)
        _require(frame, path, _RSNA_REQUIRED, "RSNA train.csv")
        label = _check_binary(frame["cancer"], path, "cancer")
        patient = _norm_id(frame["patient_id"])
        image = _norm_id(frame["image_id"])
        birads = _norm_id(frame["BIRADS"]) if "BIRADS" in frame.columns else pd.Series(None, index=frame.index)
        frames.append(
            pd.DataFrame(
                {
                    "image_id": image,
                    "path": _join(_root(images_root), patient + "/" + image + extension),
                    "label": label,
                    "patient_id": patient,
                    "exam_id": patient,
                    "laterality": _laterality(frame["laterality"]),
                    "view": _view(frame["view"]),
                    "dataset": "RSNA",
                    "age": pd.to_numeric(frame["age"], errors="coerce") if "age" in frame.columns else np.nan,
                    "density": _density(frame["density"]) if "density" in frame.columns else None,
                    "manufacturer": _text_or_none(_norm_id(frame["machine_id"]))
                    if "machine_id" in frame.columns
                    else None,
                    "birads": _text_or_none(birads),
                    ROW_NAME: _row_names(path, frame.index),
                }
            )
        )
    return _finalize(pd.concat(frames, ignore_index=True), paths)


# --------------------------------------------------------------------------------------------------------
# VinDr-Mammo

_VINDR_REQUIRED = ("study_id", "image_id", "laterality", "view_position", "breast_birads")
VINDR_POSITIVE_BIRADS = (4, 5)


def import_vindr(csv_paths: CsvPaths, images_root: str | Path, *, extension: str = ".dicom") -> pd.DataFrame:
    """VinDr-Mammo ``breast-level_annotations.csv`` (optionally with the release's ``metadata.csv``).

    Label rule (a PROXY, not pathology): VinDr-Mammo has no biopsy outcome, so an image is positive when
    its breast-level assessment ``breast_birads`` is "BI-RADS 4" or "BI-RADS 5" (suspicious / highly
    suggestive of malignancy, i.e. the breast would go to biopsy); BI-RADS 1-3 are negative. Metrics on
    VinDr therefore measure agreement with radiologists' suspicion, not cancer detection.

    VinDr releases no patient id: each study is treated as its own patient (patient_id = exam_id =
    ``study_id``), so two studies of one woman could land in different splits.

    Mapping: ``image_id`` → image_id, path = ``{study_id}/{image_id}{extension}``, ``laterality``,
    ``view_position`` → view, ``breast_density`` "DENSITY A".."D" → density, ``breast_birads`` → birads
    ("1".."5"). The release's own ``split`` column is not carried (splitting is patient-level and
    separate). A ``metadata.csv`` passed alongside (column ``SOP Instance UID``) adds ``Patient's Age``
    ("053Y") and ``Manufacturer``. ``finding_annotations.csv`` (one row per finding) is skipped with a
    warning.
    """
    paths = _as_list(csv_paths)
    frames, metadata = [], []
    for path in paths:
        header = _read_csv_header(path)
        if "finding_categories" in header:
            warnings.warn(f"VinDr: skipping {path} (finding-level table; labels come from breast-level)", stacklevel=2)
            continue
        if "SOP Instance UID" in header and "breast_birads" not in header:
            metadata.append(_read_csv(path))
            continue
        frame = _read_csv(path)
        _require(frame, path, _VINDR_REQUIRED, "VinDr-Mammo breast-level annotation")
        text = frame["breast_birads"].astype("string").str.upper()
        category = pd.to_numeric(text.str.extract(r"(\d)", expand=False), errors="coerce")
        bad = frame.index[category.isna()]
        if len(bad):
            shown = [f"{_row_label(i)} ({frame.at[i, 'breast_birads']!r})" for i in bad]
            raise ImportErrorWithContext(
                f"{path}: {len(bad)} unreadable breast_birads value(s), e.g. {_examples(shown)} ({ROW_COUNTING})",
                file=path,
                rows=[_row_number(i) for i in bad[:5]],
            )
        study = _norm_id(frame["study_id"])
        image = _norm_id(frame["image_id"])
        frames.append(
            pd.DataFrame(
                {
                    "image_id": image,
                    "path": _join(_root(images_root), study + "/" + image + extension),
                    "label": category.isin(VINDR_POSITIVE_BIRADS).astype("int64"),
                    "patient_id": study,
                    "exam_id": study,
                    "laterality": _laterality(frame["laterality"]),
                    "view": _view(frame["view_position"]),
                    "dataset": "VINDR",
                    "age": np.nan,
                    "density": _density(frame["breast_density"]) if "breast_density" in frame.columns else None,
                    "manufacturer": None,
                    "birads": category.astype("int64").astype(str),
                    ROW_NAME: _row_names(path, frame.index),
                }
            )
        )
    if not frames:
        where = ", ".join(str(p) for p in paths)
        raise ImportErrorWithContext(
            f"{where}: no VinDr-Mammo breast-level annotation table (breast-level_annotations.csv) given",
            file=where,
            missing=list(_VINDR_REQUIRED),
        )
    rows = pd.concat(frames, ignore_index=True)
    if metadata:
        meta = pd.concat(metadata, ignore_index=True)
        meta["image_id"] = _norm_id(meta["SOP Instance UID"])
        meta = meta.drop_duplicates(subset="image_id").set_index("image_id")
        if "Patient's Age" in meta.columns:
            years = pd.to_numeric(
                meta["Patient's Age"].astype("string").str.extract(r"(\d+)", expand=False), errors="coerce"
            )
            rows["age"] = rows["image_id"].map(years)
        if "Manufacturer" in meta.columns:
            rows["manufacturer"] = _text_or_none(rows["image_id"].map(meta["Manufacturer"]))
    return _finalize(rows, paths)


# --------------------------------------------------------------------------------------------------------
# CBIS-DDSM

_CBIS_REQUIRED = (
    "patient_id",
    ("breast density", "breast_density"),
    "left or right breast",
    "image view",
    "pathology",
    "image file path",
)
_CBIS_CASE = re.compile(r"^(?:Mass|Calc)-(?:Training|Test)_(?P<case>.+?)_(?:LEFT|RIGHT)_(?:CC|MLO)$", re.IGNORECASE)


def import_cbis(csv_paths: CsvPaths, images_root: str | Path) -> pd.DataFrame:
    """CBIS-DDSM case descriptions: pass all of ``mass_case_description_{train,test}_set.csv`` and
    ``calc_case_description_{train,test}_set.csv``.

    The tables hold one row per ABNORMALITY, and the same mammogram is listed once under the mass tables
    and again under the calcification tables (different folders, same pixels). Rows are grouped per image
    (patient × breast × view) and an image is positive when ANY of its abnormalities has pathology
    "MALIGNANT"; "BENIGN" and "BENIGN_WITHOUT_CALLBACK" are negative. CBIS-DDSM has NO normal images:
    every image carries a finding, so its negatives are benign lesions and a model trained on it alone
    has never seen a normal screen.

    Mapping: ``patient_id`` (``P_00001``) → patient_id, case folder name (``Mass-Training_P_00001_LEFT_CC``
    → ``P_00001``; DDSM holds one exam per case) → exam_id, ``left or right breast`` → laterality,
    ``image view`` → view, ``breast density``/``breast_density`` 1-4 → density A-D, highest
    ``assessment`` → birads, ``image file path`` (first one in sort order) → path;
    image_id = ``{patient_id}_{LEFT|RIGHT}_{view}``. A blank ``patient_id``, side, view or image path, and a side
    other than LEFT/RIGHT, are refused naming the file and row: the image could not be found, or its findings
    grouped.
    """
    paths = _as_list(csv_paths)
    frames = []
    for path in paths:
        frame = _read_csv(path)
        _require(frame, path, _CBIS_REQUIRED, "CBIS-DDSM case description")
        pathology = frame["pathology"].astype("string").str.strip().str.upper()
        unknown = frame.index[~pathology.isin(["MALIGNANT", "BENIGN", "BENIGN_WITHOUT_CALLBACK"])]
        if len(unknown):
            shown = [f"{_row_label(i)} ({frame.at[i, 'pathology']!r})" for i in unknown]
            raise ImportErrorWithContext(
                f"{path}: {len(unknown)} pathology value(s) not MALIGNANT/BENIGN/BENIGN_WITHOUT_CALLBACK, "
                f"e.g. {_examples(shown)} ({ROW_COUNTING})",
                file=path,
                rows=[_row_number(i) for i in unknown[:5]],
            )
        # The image is found by patient, side and view, and read from its path: none may be blank (a blank key
        # dropped its rows from the grouping, and so a MALIGNANT finding from its image's label).
        for column in ("patient_id", "left or right breast", "image view", "image file path"):
            _refuse_rows(frame[column], _blank(frame[column]), path, column, None)
        side = frame["left or right breast"].astype("string").str.strip().str.upper()
        _refuse_unknown(frame["left or right breast"], _SIDES, path, "left or right breast", "LEFT or RIGHT")
        density_column = _pick(frame, "breast density", "breast_density")
        image_path = frame["image file path"].astype("string").str.strip().map(_clean_relative, na_action="ignore")
        frames.append(
            pd.DataFrame(
                {
                    "patient_id": _norm_id(frame["patient_id"]),
                    "side": side.replace({"L": "LEFT", "R": "RIGHT"}),
                    "view": _view(frame["image view"]),
                    "malignant": (pathology == "MALIGNANT").astype("int64"),
                    "density": pd.to_numeric(frame[density_column], errors="coerce"),
                    "assessment": pd.to_numeric(frame["assessment"], errors="coerce")
                    if "assessment" in frame.columns
                    else np.nan,
                    "image_path": image_path,
                    ROW_NAME: _row_names(path, frame.index),
                }
            )
        )
    findings = pd.concat(frames, ignore_index=True)
    images = (
        findings.sort_values("image_path")
        .groupby(["patient_id", "side", "view"], sort=True)
        .agg(
            label=("malignant", "max"),
            density=("density", "max"),
            assessment=("assessment", "max"),
            image_path=("image_path", "first"),
            row_name=(ROW_NAME, "first"),
        )
        .reset_index()
    )

    def case_of(image_path: str, patient: str) -> str:
        match = _CBIS_CASE.match(image_path.split("/", 1)[0])
        return match.group("case") if match else patient

    exam = [case_of(p, pid) for p, pid in zip(images["image_path"], images["patient_id"], strict=True)]
    density = images["density"].map(lambda v: _DENSITY_CODES.get(str(int(v))) if pd.notna(v) else None)
    rows = pd.DataFrame(
        {
            "image_id": images["patient_id"] + "_" + images["side"] + "_" + images["view"].astype(str),
            "path": _join(_root(images_root), images["image_path"]),
            "label": images["label"].astype("int64"),
            "patient_id": images["patient_id"],
            "exam_id": exam,
            "laterality": _laterality(images["side"]),
            "view": images["view"],
            "dataset": "CBIS",
            "density": density.astype(object),
            "birads": images["assessment"].map(lambda v: str(int(v)) if pd.notna(v) else None).astype(object),
            ROW_NAME: images["row_name"],
        }
    )
    return _finalize(rows, paths)


# --------------------------------------------------------------------------------------------------------
# The reference script's CSV ("seed") and the generic manifest-shaped CSV


def _derive_ids(relative: list[str]) -> tuple[list[str], list[str]]:
    """Patient and exam ids from folder layout, for tables that name neither.

    The patient is the first folder below what all files share (skipping ``cohort_N`` folders, as in
    EMBED's ``cohort_1/<patient>/<study>/...``); the exam is the folder below that when there is one. In a
    flat folder, the patient is the file name's first ``_``-separated token (``<patient>_..._L_CC.png``).
    """
    split_paths = [[p for p in PurePosixPath(path).parts if p not in ("/", "")] for path in relative]
    folders = [parts[:-1] for parts in split_paths]
    common = 0
    if folders and all(folders):
        shortest = min(len(f) for f in folders)
        while common < shortest and len({f[common] for f in folders}) == 1:
            common += 1
    patients, exams = [], []
    for parts, dirs in zip(split_paths, folders, strict=True):
        below = [d for d in dirs[common:] if not re.fullmatch(r"cohort_?\d+", d, flags=re.IGNORECASE)]
        if below:
            patients.append(below[0])
            exams.append(below[0] + "/" + below[1] if len(below) > 1 else below[0])
        else:
            token = PurePosixPath(parts[-1]).stem.split("_")[0] if parts else ""
            patients.append(token)
            exams.append(token)
    return patients, exams


def _exam_from_patient(relative: list[str], patients: list[str]) -> list[str]:
    """The folder right below the patient's own folder, when the path has one; else the patient."""
    exams = []
    for path, patient in zip(relative, patients, strict=True):
        parts = list(PurePosixPath(path).parts[:-1])
        if patient in parts and parts.index(patient) + 1 < len(parts):
            exams.append(patient + "/" + parts[parts.index(patient) + 1])
        else:
            exams.append(patient)
    return exams


def _relative_to_root(paths: pd.Series, root: str) -> pd.Series:
    prefix = root.rstrip("/") + "/"
    relative = [None if p is None else (p[len(prefix) :] if p.startswith(prefix) else p) for p in paths]
    return pd.Series(relative, index=paths.index, dtype=object)


def import_seed(csv_paths: CsvPaths, images_root: str | Path) -> pd.DataFrame:
    """The reference script's CSV: ``path_eq``, ``cancer``, ``datasettype``, optional ``patient_id``,
    ``tissueden``, ``ETHNICITY_DESC``.

    Label rule: ``cancer`` as given (checked to be 0/1). ``datasettype`` becomes dataset ("SEED" when
    absent). Without ``patient_id`` the patient is derived from the folders (see below) and a warning
    says so, because a wrong patient id silently leaks images across splits. Laterality and view come
    from ``laterality``/``view`` columns when present, else from the file name (``_L_CC``, ``RMLO``...),
    else "U". ``tissueden`` (1-4 or A-D) → density, ``ETHNICITY_DESC`` → ethnicity (kept for subgroup
    metrics), ``age``/``age_at_study`` → age, ``exam_id`` when present.

    Derived ids: the patient is the first folder below the folder all files share (``cohort_N`` folders
    skipped), the exam the folder below it; in a flat folder, the file name's first ``_`` token.
    """
    paths = _as_list(csv_paths)
    root = _root(images_root)
    frames = []
    for path in paths:
        frame = _read_csv(path)
        _require(frame, path, ("path_eq", "cancer"), "reference (seed)")
        frame["label"] = _check_binary(frame["cancer"], path, "cancer")
        frame[ROW_NAME] = _row_names(path, frame.index)
        frames.append(frame)
    # One table for all files: the reference ships one CSV per split, and derived ids must agree across them.
    frame = pd.concat(frames, ignore_index=True)
    full = _join(root, frame["path_eq"])
    relative = _relative_to_root(full, root)
    rel_list = ["" if p is None else p for p in relative]
    given = _norm_id(frame["patient_id"]) if "patient_id" in frame.columns else pd.Series(pd.NA, index=frame.index)
    if given.isna().any():
        derived_patient, derived_exam = _derive_ids(rel_list)
        patient = given.fillna(pd.Series(derived_patient, index=frame.index)).astype(str)
        exam = pd.Series(derived_exam, index=frame.index).where(given.isna(), None)
        what = "no patient_id column" if "patient_id" not in frame.columns else "blank patient_id on some rows"
        warnings.warn(
            f"{', '.join(map(str, paths))}: {what}; derived {len(set(patient[given.isna()]))} patient id(s) for "
            f"{int(given.isna().sum())} row(s) from the image "
            f"folders (e.g. {_examples(sorted(set(patient[given.isna()])), 3)}). Check them: a wrong patient id "
            "lets one woman's images leak across splits.",
            UserWarning,
            stacklevel=2,
        )
    else:
        patient = given.astype(str)
        exam = pd.Series(None, index=frame.index, dtype=object)
    # Exams: the table's exam_id, else the derived folder, else the folder below the patient's own.
    below_patient = pd.Series(_exam_from_patient(rel_list, list(patient)), index=frame.index)
    exam = exam.where(exam.notna(), below_patient)
    if "exam_id" in frame.columns:
        exam = _norm_id(frame["exam_id"]).astype(object).where(frame["exam_id"].notna(), exam)
    parsed_lat, parsed_view = _parse_names(relative)
    laterality = (
        _laterality_or_name(frame["laterality"], parsed_lat, frame[ROW_NAME])
        if "laterality" in frame.columns
        else parsed_lat
    )
    view = _view(frame["view"]) if "view" in frame.columns else parsed_view
    dataset = (
        frame["datasettype"].astype("string").str.strip().fillna("SEED").replace("", "SEED")
        if "datasettype" in frame.columns
        else "SEED"
    )
    age_column = _pick(frame, "age", "age_at_study")
    rows = pd.DataFrame(
        {
            "image_id": relative,
            "path": full,
            "label": frame["label"],
            "patient_id": patient,
            "exam_id": exam,
            "laterality": laterality,
            "view": view,
            "dataset": dataset,
            "age": pd.to_numeric(frame[age_column], errors="coerce") if age_column else np.nan,
            "density": _density(frame["tissueden"]) if "tissueden" in frame.columns else None,
        },
        index=frame.index,
    )
    if "ETHNICITY_DESC" in frame.columns:
        rows["ethnicity"] = frame["ETHNICITY_DESC"]
    rows[ROW_NAME] = frame[ROW_NAME]
    return _finalize(rows, paths, extra=("ethnicity",))


def import_generic(csv_paths: CsvPaths, images_root: str | Path) -> pd.DataFrame:
    """A CSV that already uses the manifest names (DESIGN.md "Manifests").

    Required: ``path``, ``label`` (0/1), ``patient_id``. Defaults: ``image_id`` = the path relative to
    ``images_root``; ``exam_id`` = patient_id (one exam per patient, the conservative choice for
    splitting); ``laterality``/``view`` parsed from the file name, else "U"; ``dataset`` = "GENERIC".
    Optional ``age``, ``density``, ``manufacturer``, ``birads`` are carried when present; a ``split``
    column is dropped (splitting is separate).
    """
    paths = _as_list(csv_paths)
    root = _root(images_root)
    frames = []
    for path in paths:
        frame = _read_csv(path)
        _require(frame, path, ("path", "label", "patient_id"), "generic manifest")
        label = _check_binary(frame["label"], path, "label")
        full = _join(root, frame["path"])
        relative = _relative_to_root(full, root)
        parsed_lat, parsed_view = _parse_names(relative)
        patient = _norm_id(frame["patient_id"])
        rows = pd.DataFrame(
            {
                "image_id": _norm_id(frame["image_id"]).astype(object).fillna(relative)
                if "image_id" in frame.columns
                else relative,
                "path": full,
                "label": label,
                "patient_id": patient,
                "exam_id": _norm_id(frame["exam_id"]).fillna(patient) if "exam_id" in frame.columns else patient,
                "laterality": _laterality_or_name(frame["laterality"], parsed_lat, _row_names(path, frame.index))
                if "laterality" in frame.columns
                else parsed_lat,
                "view": _view(frame["view"]) if "view" in frame.columns else parsed_view,
                "dataset": frame["dataset"].astype("string").str.strip().fillna("GENERIC")
                if "dataset" in frame.columns
                else "GENERIC",
                "age": pd.to_numeric(frame["age"], errors="coerce") if "age" in frame.columns else np.nan,
                "density": _density(frame["density"]) if "density" in frame.columns else None,
                "manufacturer": _text_or_none(frame["manufacturer"]) if "manufacturer" in frame.columns else None,
                "birads": _text_or_none(_norm_id(frame["birads"])) if "birads" in frame.columns else None,
            },
            index=frame.index,
        )
        rows[ROW_NAME] = _row_names(path, frame.index)
        if "split" in frame.columns:
            warnings.warn(
                f"{path}: its split column is ignored; prepare draws its own patient-level split (--split, --seed)",
                UserWarning,
                stacklevel=2,
            )
        frames.append(rows)
    return _finalize(pd.concat(frames, ignore_index=True), paths)


# --------------------------------------------------------------------------------------------------------
# Patient-level splitting, subsetting and leak detection


def _groups(df: pd.DataFrame) -> pd.Series:
    """A split unit per row: patients joined with every patient they share an exam id with.

    The manifest validator refuses a patient_id or an exam_id seen in two splits, so both must stay
    together; a union-find over (patient_id, exam_id) pairs guarantees it even when ids collide across
    data sets. The unit is named by its smallest patient id, which keeps the result independent of row
    order.
    """
    parent: dict[str, str] = {}

    def find(node: str) -> str:
        while parent[node] != node:
            parent[node] = parent[parent[node]]
            node = parent[node]
        return node

    patients = "p:" + df["patient_id"].astype(str)
    exams = "e:" + df["exam_id"].astype(str) if "exam_id" in df.columns else patients
    for a, b in set(zip(patients, exams, strict=True)):
        parent.setdefault(a, a)
        parent.setdefault(b, b)
        ra, rb = find(a), find(b)
        if ra != rb:
            # Keep the smaller name as root so that naming does not depend on visiting order.
            parent[max(ra, rb)] = min(ra, rb)
    root_of = {node: find(node) for node in parent}
    members: dict[str, list[str]] = {}
    for node, root in root_of.items():
        if node.startswith("p:"):
            members.setdefault(root, []).append(node[2:])
    name = {root: min(ids) for root, ids in members.items()}
    return pd.Series([name[root_of[p]] for p in patients], index=df.index, dtype=object)


def _unit_strata(df: pd.DataFrame, units: pd.Series, stratify_by: Sequence[str]) -> pd.Series:
    """One stratum key per unit: "label" means "has any positive image"; other columns take the unit's
    smallest value (a patient belongs to one data set)."""
    parts = []
    for column in stratify_by:
        if column not in df.columns:
            raise ValueError(f"cannot stratify by {column!r}: no such column (have {', '.join(map(str, df.columns))})")
        values = df[column]
        if column == "label":
            parts.append(pd.to_numeric(values, errors="coerce").eq(1).groupby(units).any().map(lambda v: str(int(v))))
        else:
            parts.append(values.astype(str).groupby(units).min())
    if not parts:
        unique_units = pd.Index(sorted(units.unique()))
        return pd.Series("all", index=unique_units, dtype=object)
    keys = parts[0].astype(str)
    for part in parts[1:]:
        keys = keys + "|" + part.astype(str)
    return keys.sort_index()


def _allocate(n: int, fractions: np.ndarray, carry: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Split n units by fractions with largest remainders, carrying rounding debt to the next stratum so
    that the totals match the fractions; every split with a non-zero fraction gets at least one unit
    when there are enough units (so each split sees positives when there are enough positive patients)."""
    open_splits = fractions > 0
    target = n * fractions + carry
    counts = np.where(open_splits, np.floor(np.clip(target, 0, None)), 0).astype(int)
    while counts.sum() < n:
        room = np.where(open_splits, target - counts, -np.inf)
        counts[int(np.argmax(room))] += 1
    while counts.sum() > n:
        room = np.where(counts > 0, target - counts, np.inf)
        counts[int(np.argmin(room))] -= 1
    if n >= open_splits.sum():
        for empty in np.flatnonzero(open_splits & (counts == 0)):
            surplus = np.where(counts > 1, counts - target, -np.inf)
            donor = int(np.argmax(surplus))
            counts[donor] -= 1
            counts[empty] += 1
    return counts, target - counts


def split_patients(
    df: pd.DataFrame,
    fractions: Sequence[float] = (0.7, 0.15, 0.15),
    seed: int = 0,
    stratify_by: Sequence[str] = ("label", "dataset"),
) -> pd.DataFrame:
    """Add a ``split`` column ("train"/"valid"/"test") at PATIENT level.

    All images of a patient (and of any patient sharing an exam id with it) land in one split. Patients
    are stratified by whether they have any positive image and by the other ``stratify_by`` columns
    (data set by default), and each non-empty split receives at least one patient of every stratum that
    has enough patients, so validation and test both see positives. The result depends only on the
    table's content and ``seed``, not on its row order.

    Args:
        df: manifest rows (``patient_id`` and, when present, ``exam_id`` define the split unit).
        fractions: train, valid, test fractions; non-negative, summing to 1. A 0 leaves that split empty.
        seed: seed of the shuffle within each stratum.
        stratify_by: columns to stratify on; "label" means "patient has any positive".

    Returns:
        A copy of ``df`` with ``split``.

    Raises:
        ValueError: bad fractions, or a stratification column that does not exist.
    """
    weights = np.asarray(list(fractions), dtype=float)
    if weights.shape != (3,) or np.any(~np.isfinite(weights)) or np.any(weights < 0):
        raise ValueError(f"fractions must be three non-negative numbers (train, valid, test), got {tuple(fractions)}")
    if not np.isclose(weights.sum(), 1.0, atol=1e-6):
        raise ValueError(f"fractions must sum to 1, got {tuple(fractions)} (sum {weights.sum():g})")
    if "patient_id" not in df.columns:
        raise ValueError("cannot split: no patient_id column")
    out = df.copy()
    if out.empty:
        out["split"] = pd.Series(dtype=object)
        return out
    units = _groups(out)
    strata = _unit_strata(out, units, stratify_by)
    rng = np.random.default_rng(seed)
    assignment: dict[str, str] = {}
    carry = np.zeros(3)
    for _, members in strata.groupby(strata, sort=True):
        ordered = np.array(sorted(members.index))
        shuffled = ordered[rng.permutation(len(ordered))]
        counts, carry = _allocate(len(shuffled), weights, carry)
        bounds = np.cumsum(counts)
        for position, unit in enumerate(shuffled):
            assignment[unit] = SPLIT_NAMES[int(np.searchsorted(bounds, position, side="right"))]
    out["split"] = units.map(assignment).astype(object)
    return out


def subset_patients(
    df: pd.DataFrame, fraction: float | None = None, n_rows: int | None = None, seed: int = 0
) -> pd.DataFrame:
    """A random, seeded, patient-level, label-stratified subset (the reference's ``--dataset_partition``,
    ``--rows_experiment`` and ``--finite_sample_rate``), never "the first N rows".

    Give exactly one of ``fraction`` (share of patients, per stratum) or ``n_rows`` (about that many
    images, taken as whole patients). Strata are "has any positive" × data set (when a ``dataset``
    column exists); each non-empty stratum keeps at least one patient, so a small subset still holds
    positives.

    Returns:
        The selected rows, in their original order and with their original index.

    Raises:
        ValueError: neither or both of fraction / n_rows, or a value out of range.
    """
    if (fraction is None) == (n_rows is None):
        raise ValueError("give exactly one of fraction or n_rows")
    if fraction is not None and not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    if n_rows is not None and (int(n_rows) != n_rows or n_rows < 1):
        raise ValueError(f"n_rows must be a positive integer, got {n_rows}")
    if df.empty or (fraction == 1) or (n_rows is not None and n_rows >= len(df)):
        return df.copy()
    units = _groups(df)
    strata = _unit_strata(df, units, [c for c in ("label", "dataset") if c in df.columns])
    rows_per_unit = units.value_counts()
    share = fraction if fraction is not None else n_rows / len(df)
    rng = np.random.default_rng(seed)
    chosen: set[str] = set()
    carry = 0.0
    for _, members in strata.groupby(strata, sort=True):
        ordered = np.array(sorted(members.index))
        shuffled = ordered[rng.permutation(len(ordered))]
        if fraction is not None:
            target = len(shuffled) * share + carry
            take = int(np.clip(np.floor(target + 0.5), 1, len(shuffled)))
            carry = target - take
        else:
            sizes = rows_per_unit.reindex(shuffled).to_numpy()
            target = sizes.sum() * share + carry
            cumulative = np.cumsum(sizes)
            # The prefix whose row count is closest to the target (at least one patient).
            take = int(np.argmin(np.abs(cumulative - target))) + 1
            carry = target - cumulative[take - 1]
        chosen.update(shuffled[:take])
    return df[units.isin(list(chosen)).to_numpy()].copy()


def find_leaks(df: pd.DataFrame) -> dict[str, list]:
    """Patients, exams and images that appear in more than one split.

    Keys: ``"patients"`` (patient ids), ``"exams"`` (exam ids), ``"images"`` (image ids whose
    ``image_id``, ``path`` or, when the column exists, ``pixel_hash`` is seen in more than one split).
    Ids are compared as strings, as the manifest validator does. Empty lists mean no leak.

    Raises:
        ValueError: the table has no ``split`` column.
    """
    if "split" not in df.columns:
        raise ValueError("find_leaks needs a 'split' column (run split_patients first)")
    split = df["split"].astype(str)

    def crossing(column: str) -> set:
        if column not in df.columns:
            return set()
        values = df[column]
        present = values.notna()
        counts = split[present].groupby(values[present].astype(str)).nunique()
        return set(counts.index[counts > 1])

    images: set[str] = set(crossing("image_id"))
    for column in ("path", "pixel_hash"):
        shared = crossing(column)
        if shared and "image_id" in df.columns:
            mask = df[column].astype(str).isin(shared) & df[column].notna()
            images.update(df.loc[mask, "image_id"].astype(str))
    return {
        "patients": sorted(crossing("patient_id")),
        "exams": sorted(crossing("exam_id")),
        "images": sorted(images),
    }
