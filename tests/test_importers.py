"""Importers on tiny tables in each source's real column layout, and patient-level splitting."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mammo_ray import importers
from mammo_ray.importers import (
    SOURCES,
    ImportErrorWithContext,
    find_leaks,
    import_cbis,
    import_csaw,
    import_embed,
    import_generic,
    import_rsna,
    import_seed,
    import_source,
    import_vindr,
    split_patients,
    subset_patients,
)


def write(path: Path, text: str) -> Path:
    path.write_text(text.lstrip("\n"))
    return path


def by_id(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.set_index("image_id")


# ------------------------------------------------------------------------------------------------
# EMBED

EMBED_META = """
empi_anon,acc_anon,study_date_anon,StudyDescription,SeriesDescription,FinalImageType,ImageLateralityFinal,ViewPosition,spot_mag,anon_dicom_path,Manufacturer,num_roi,ROI_coords
10000001,20000001,2019-01-01,MG Screening Bilateral,L CC,2D,L,CC,,/mnt/NAS2/mammo/anon_dicom/cohort_1/10000001/1.2.1/1.3.1/a1.dcm,"HOLOGIC, Inc.",0,()
10000001,20000001,2019-01-01,MG Screening Bilateral,L MLO,2D,L,MLO,,/mnt/NAS2/mammo/anon_dicom/cohort_1/10000001/1.2.1/1.3.1/a2.dcm,"HOLOGIC, Inc.",0,()
10000001,20000001,2019-01-01,MG Screening Bilateral,R CC,2D,R,CC,,/mnt/NAS2/mammo/anon_dicom/cohort_1/10000001/1.2.1/1.3.1/a3.dcm,"HOLOGIC, Inc.",0,()
10000001,20000001,2019-01-01,MG Screening Bilateral,R MLO,2D,R,MLO,,/mnt/NAS2/mammo/anon_dicom/cohort_1/10000001/1.2.1/1.3.1/a4.dcm,"HOLOGIC, Inc.",0,()
10000001,20000001,2019-01-01,MG Screening Bilateral,L CC C-View,C-view,L,CC,,/mnt/NAS2/mammo/anon_dicom/cohort_1/10000001/1.2.1/1.3.2/a5.dcm,"HOLOGIC, Inc.",0,()
10000001,20000002,2019-01-20,MG Diagnostic Left,L CC SPOT,2D,L,CC,1,/mnt/NAS2/mammo/anon_dicom/cohort_1/10000001/1.2.2/1.3.3/b1.dcm,"HOLOGIC, Inc.",1,()
10000002,20000003,2018-03-01,MG Screening Bilateral,L CC,2D,L,CC,0,/mnt/NAS2/mammo/anon_dicom/cohort_2/10000002/1.2.3/1.3.4/c1.dcm,GE MEDICAL SYSTEMS,0,()
10000002,20000003,2018-03-01,MG Screening Bilateral,R CC,2D,R,CC,0,/mnt/NAS2/mammo/anon_dicom/cohort_2/10000002/1.2.3/1.3.4/c2.dcm,GE MEDICAL SYSTEMS,0,()
10000002,20000003,2018-03-01,MG Screening Bilateral,R XCCL,2D,R,XCCL,0,/mnt/NAS2/mammo/anon_dicom/cohort_2/10000002/1.2.3/1.3.4/c3.dcm,GE MEDICAL SYSTEMS,0,()
10000003,20000005,2020-06-01,MG Screening Bilateral,L MLO,2D,L,MLO,0,images/cohort_1/10000003/1.2.5/1.3.5/d1.dcm,"HOLOGIC, Inc.",0,()
10000003,20000005,2020-06-01,MG Screening Bilateral,R MLO,2D,R,MLO,0,images/cohort_1/10000003/1.2.5/1.3.5/d2.dcm,"HOLOGIC, Inc.",0,()
10000004,20000006,2021-02-02,MG Screening Bilateral,L CC,2D,L,CC,0,/mnt/NAS2/mammo/anon_dicom/cohort_1/10000004/1.2.6/1.3.6/e1.dcm,"HOLOGIC, Inc.",0,()
10000004,20000006,2021-02-02,MG Screening Bilateral,R CC,2D,R,CC,0,/mnt/NAS2/mammo/anon_dicom/cohort_1/10000004/1.2.6/1.3.6/e2.dcm,"HOLOGIC, Inc.",0,()
10000005,20000009,2021-05-05,MG Screening Bilateral,L CC,2D,L,CC,0,/mnt/NAS2/mammo/anon_dicom/cohort_1/10000005/1.2.9/1.3.9/f1.dcm,"HOLOGIC, Inc.",0,()
"""

EMBED_CLINICAL = """
empi_anon,acc_anon,study_date_anon,desc,numfind,side,asses,tissueden,bside,path_severity,age_at_study,ETHNICITY_DESC
10000001,20000001,2019-01-01,MG Screening Bilateral,1,L,A,2,L,0,61.2,Not Hispanic or Latino
10000001,20000001,2019-01-01,MG Screening Bilateral,2,R,N,2,,,61.2,Not Hispanic or Latino
10000001,20000002,2019-01-20,MG Diagnostic Left,1,L,S,2,L,0,61.3,Not Hispanic or Latino
10000002,20000003,2018-03-01,MG Screening Bilateral,1,B,A,3,,,55.0,Unknown
10000002,20000004,2018-04-01,MG Diagnostic Right,1,R,S,3,R,1,55.1,Unknown
10000003,20000005,2020-06-01,MG Screening Bilateral,1,,N,4,,,47.5,Hispanic or Latino
10000004,20000006,2021-02-02,MG Screening Bilateral,1,B,A,5,B,0,70.0,
"""


@pytest.fixture
def embed_tables(tmp_path):
    meta = write(tmp_path / "EMBED_OpenData_metadata.csv", EMBED_META)
    clinical = write(tmp_path / "EMBED_OpenData_clinical.csv", EMBED_CLINICAL)
    return [meta, clinical]


def test_embed_labels_views_and_filters(embed_tables, tmp_path):
    with pytest.warns(UserWarning, match="no clinical row"):
        manifest = import_embed(embed_tables, tmp_path / "images")
    rows = by_id(manifest)
    root = (tmp_path / "images").resolve().as_posix()
    # The C-view and the spot-magnification view are dropped; exam 20000009 has no clinical row.
    assert len(manifest) == 11
    assert not rows.index.str.endswith(("a5.dcm", "b1.dcm", "f1.dcm")).any()
    # Path re-rooted at the cohort folder, from both the NAS form and the bucket form.
    assert rows.loc["cohort_1/10000001/1.2.1/1.3.1/a1.dcm", "path"] == f"{root}/cohort_1/10000001/1.2.1/1.3.1/a1.dcm"
    assert "cohort_1/10000003/1.2.5/1.3.5/d1.dcm" in rows.index
    labels = dict(zip(manifest["image_id"].str.rsplit("/", n=1).str[1], manifest["label"], strict=True))
    # Malignant pathology linked to the screening exam, left breast only.
    assert (labels["a1.dcm"], labels["a2.dcm"], labels["a3.dcm"], labels["a4.dcm"]) == (1, 1, 0, 0)
    # Bilateral screening recall; pathology (DCIS, right) only on the diagnostic exam 31 days later.
    assert (labels["c1.dcm"], labels["c2.dcm"], labels["c3.dcm"]) == (0, 1, 1)
    # Negative exam with a blank side; bilateral malignant finding → both breasts.
    assert (labels["d1.dcm"], labels["d2.dcm"], labels["e1.dcm"], labels["e2.dcm"]) == (0, 0, 1, 1)
    first = rows.loc["cohort_1/10000001/1.2.1/1.3.1/a1.dcm"]
    assert (first["patient_id"], first["exam_id"], first["laterality"], first["view"]) == (
        "10000001",
        "20000001",
        "L",
        "CC",
    )
    assert first["dataset"] == "EMBED" and first["age"] == pytest.approx(61.2)
    assert first["density"] == "B" and first["manufacturer"] == "HOLOGIC, Inc." and first["birads"] == "0"
    assert rows.loc["cohort_1/10000001/1.2.1/1.3.1/a3.dcm", "birads"] == "1"
    assert rows.loc["cohort_2/10000002/1.2.3/1.3.4/c3.dcm", "view"] == "XCCL"
    assert rows.loc["cohort_1/10000003/1.2.5/1.3.5/d1.dcm", "density"] == "D"
    assert rows.loc["cohort_1/10000004/1.2.6/1.3.6/e1.dcm", "density"] is None  # tissueden 5 = normal male
    assert set(manifest.columns) >= set(importers.MANIFEST_COLUMNS) and "split" not in manifest.columns


def test_embed_options(embed_tables, tmp_path):
    with pytest.warns(UserWarning):
        same_exam_only = by_id(import_embed(embed_tables, tmp_path, window_days=0))
    assert same_exam_only.loc["cohort_2/10000002/1.2.3/1.3.4/c2.dcm", "label"] == 0
    with pytest.warns(UserWarning):
        wide = by_id(import_embed(embed_tables, tmp_path, include_cview=True, include_spot_mag=True))
    assert wide.loc["cohort_1/10000001/1.2.1/1.3.2/a5.dcm", "label"] == 1
    assert wide.loc["cohort_1/10000001/1.2.2/1.3.3/b1.dcm", "label"] == 1
    # The exam without a clinical row has no description either, so screening_only drops it silently.
    screening = import_embed(embed_tables, tmp_path, screening_only=True, include_spot_mag=True)
    assert "20000002" not in set(screening["exam_id"])


def test_embed_needs_both_tables_and_required_columns(embed_tables, tmp_path):
    with pytest.raises(ImportErrorWithContext, match="clinical"):
        import_embed(embed_tables[:1], tmp_path)
    broken = write(tmp_path / "clinical_broken.csv", EMBED_CLINICAL.replace("path_severity", "pathsev"))
    with pytest.raises(ImportErrorWithContext) as info:
        import_embed([embed_tables[0], broken], tmp_path)
    assert "clinical_broken.csv" in str(info.value) and "path_severity" in str(info.value)
    assert info.value.missing == ["'path_severity'"]


# ------------------------------------------------------------------------------------------------
# CSAW-CC

CSAW = """
anon_patientid,exam_year,x_age,x_case,x_cancer_laterality,x_type,x_lymphnode_met,rad_timing,rad_r1,rad_r2,rad_recall,rad_recall_type_right,rad_recall_type_left,imagelaterality,viewposition,anon_filename,libra_breastarea,libra_densearea,libra_percentdensity
1001,2012,1,1,Left,1,0,3,0,0,0,0,0,Left,CC,1001_20990909_L_CC_1.dcm,120.1,20.2,16.8
1001,2012,1,1,Left,1,0,3,0,0,0,0,0,Right,CC,1001_20990909_R_CC_1.dcm,118.0,19.0,16.1
1001,2014,1,1,Left,1,0,1,1,1,1,0,1,Left,CC,1001_20990909_L_CC_2.dcm,121.0,20.0,16.5
1001,2014,1,1,Left,1,0,1,1,1,1,0,1,Left,MLO,1001_20990909_L_MLO_2.dcm,140.0,22.0,15.7
1001,2014,1,1,Left,1,0,1,1,1,1,0,1,Right,MLO,1001_20990909_R_MLO_2.dcm,139.0,21.0,15.1
1002,2013,2,1,Right,1,1,2,0,0,0,0,0,Right,MLO,1002_20990909_R_MLO_1.dcm,90.0,30.0,33.3
1002,2013,2,1,Right,1,1,2,0,0,0,0,0,Left,MLO,1002_20990909_L_MLO_1.dcm,91.0,29.0,31.9
1003,2015,2,0,,,,,0,0,0,0,0,Left,CC,1003_20990909_L_CC_1.dcm,80.0,10.0,12.5
1003,2015,2,0,,,,,0,0,0,0,0,Right,CC,1003_20990909_R_CC_1.dcm,81.0,10.0,12.3
"""


def test_csaw_label_is_cancer_breast_within_the_window(tmp_path):
    table = write(tmp_path / "CSAW-CC_breast_cancer_screening_data.csv", CSAW)
    rows = by_id(import_csaw([table], tmp_path / "csaw"))
    assert rows["label"].to_dict() == {
        "1001_20990909_L_CC_1.dcm": 0,  # rad_timing 3: a round before diagnosis
        "1001_20990909_R_CC_1.dcm": 0,
        "1001_20990909_L_CC_2.dcm": 1,  # screen-detected, cancer breast
        "1001_20990909_L_MLO_2.dcm": 1,
        "1001_20990909_R_MLO_2.dcm": 0,  # other breast
        "1002_20990909_R_MLO_1.dcm": 1,  # interval cancer
        "1002_20990909_L_MLO_1.dcm": 0,
        "1003_20990909_L_CC_1.dcm": 0,  # control
        "1003_20990909_R_CC_1.dcm": 0,
    }
    first = rows.loc["1001_20990909_L_CC_2.dcm"]
    assert (first["patient_id"], first["exam_id"], first["laterality"], first["view"]) == (
        "1001",
        "1001_2014",
        "L",
        "CC",
    )
    assert first["dataset"] == "CSAW" and np.isnan(first["age"])  # x_age is an age band, not years
    everything = by_id(import_csaw([table], tmp_path, positive_timings=None))
    assert everything.loc["1001_20990909_L_CC_1.dcm", "label"] == 1


# ------------------------------------------------------------------------------------------------
# RSNA

RSNA = """
site_id,patient_id,image_id,laterality,view,age,cancer,biopsy,invasive,BIRADS,implant,density,machine_id,difficult_negative_case
2,10006,462822612,L,CC,61.0,0,0,0,,0,,29,False
2,10006,1459541791,L,MLO,61.0,0,0,0,,0,,29,False
2,10006,1864590858,R,MLO,61.0,0,0,0,,0,,29,False
2,10006,1874946579,R,CC,61.0,0,0,0,,0,,29,False
2,10011,220375232,L,CC,55.0,1,1,1,0,0,C,21,False
2,10011,270344397,L,AT,55.0,1,1,1,0,0,C,21,False
1,10025,562340703,R,MLO,,0,0,0,1,0,B,49,False
"""


def test_rsna(tmp_path):
    table = write(tmp_path / "train.csv", RSNA)
    rows = by_id(import_rsna([table], tmp_path / "train_images"))
    root = (tmp_path / "train_images").resolve().as_posix()
    assert rows.loc["462822612", "path"] == f"{root}/10006/462822612.dcm"
    assert rows.loc["220375232", "label"] == 1 and rows.loc["462822612", "label"] == 0
    assert rows.loc["270344397", "view"] == "AT"
    assert rows.loc["220375232", "exam_id"] == rows.loc["220375232", "patient_id"] == "10011"
    assert rows.loc["220375232", "density"] == "C" and rows.loc["462822612", "density"] is None
    assert rows.loc["562340703", "birads"] == "1" and rows.loc["462822612", "birads"] is None
    assert rows.loc["220375232", "manufacturer"] == "21" and np.isnan(rows.loc["562340703", "age"])
    png = import_rsna(table, tmp_path, extension=".png")
    assert png["path"].str.endswith(".png").all()


@pytest.mark.parametrize(
    ("edit", "message", "detail"),
    [
        (lambda t: t.replace(",cancer,", ",cancr,"), "missing column", "'cancer'"),
        (lambda t: t.replace("61.0,0,0,0,,0,,29", "61.0,2,0,0,,0,,29", 1), "outside", "row 1 ('2')"),
        (lambda t: t.replace("10025,562340703", "10025,462822612"), "duplicate image_id", "462822612"),
    ],
)
def test_rsna_bad_input_names_file_and_rows(tmp_path, edit, message, detail):
    table = write(tmp_path / "train.csv", edit(RSNA))
    with pytest.raises(ImportErrorWithContext, match=message) as info:
        import_rsna([table], tmp_path)
    assert "train.csv" in str(info.value) and detail in str(info.value)


# ------------------------------------------------------------------------------------------------
# VinDr-Mammo

VINDR = """
study_id,series_id,image_id,laterality,view_position,height,width,breast_birads,breast_density,split
b8d273e8601f348d3664778dae0e7e0b,b36517b9cc8e3b4a5cc4d2d83a7b0e4e,d8125545210c08e1b1793a5af6458ee2,L,CC,3518,2800,BI-RADS 2,DENSITY C,training
b8d273e8601f348d3664778dae0e7e0b,b36517b9cc8e3b4a5cc4d2d83a7b0e4e,8a4d6e0d5a2b0f8a4e4c0d5a2b7f1c3e,L,MLO,3518,2800,BI-RADS 2,DENSITY C,training
b8d273e8601f348d3664778dae0e7e0b,b36517b9cc8e3b4a5cc4d2d83a7b0e4e,e2c5c1b9d4f7a8b3c6d9e0f1a2b3c4d5,R,CC,3518,2800,BI-RADS 4,DENSITY C,training
b8d273e8601f348d3664778dae0e7e0b,b36517b9cc8e3b4a5cc4d2d83a7b0e4e,f1e2d3c4b5a6978877665544332211aa,R,MLO,3518,2800,BI-RADS 4,DENSITY C,training
c1d2e3f4a5b6c7d8e9f0a1b2c3d4e5f6,a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1,0a0b0c0d0e0f0a0b0c0d0e0f0a0b0c0d,L,CC,3518,2800,BI-RADS 5,DENSITY B,test
c1d2e3f4a5b6c7d8e9f0a1b2c3d4e5f6,a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1,1a1b1c1d1e1f1a1b1c1d1e1f1a1b1c1d,R,CC,3518,2800,BI-RADS 3,DENSITY B,test
"""


def test_vindr_birads_4_and_5_are_the_proxy_positives(tmp_path):
    table = write(tmp_path / "breast-level_annotations.csv", VINDR)
    manifest = import_vindr([table], tmp_path / "images")
    rows = by_id(manifest)
    assert rows["label"].tolist() == [0, 0, 1, 1, 1, 0]
    study = "b8d273e8601f348d3664778dae0e7e0b"
    first = rows.loc["d8125545210c08e1b1793a5af6458ee2"]
    assert first["patient_id"] == first["exam_id"] == study
    assert first["path"].endswith(f"/images/{study}/d8125545210c08e1b1793a5af6458ee2.dicom")
    assert (first["density"], first["birads"], first["dataset"]) == ("C", "2", "VINDR")
    assert rows.loc["e2c5c1b9d4f7a8b3c6d9e0f1a2b3c4d5", "birads"] == "4"
    assert "split" not in manifest.columns


def test_vindr_metadata_and_finding_tables(tmp_path):
    table = write(tmp_path / "breast-level_annotations.csv", VINDR)
    meta = write(
        tmp_path / "metadata.csv",
        "Series Instance UID,SOP Instance UID,Patient's Age,Manufacturer\n"
        "b36517b9cc8e3b4a5cc4d2d83a7b0e4e,d8125545210c08e1b1793a5af6458ee2,053Y,SIEMENS\n",
    )
    findings = write(
        tmp_path / "finding_annotations.csv",
        "study_id,series_id,image_id,laterality,view_position,height,width,breast_birads,breast_density,"
        "finding_categories,finding_birads,xmin,ymin,xmax,ymax,split\n",
    )
    with pytest.warns(UserWarning, match="finding-level"):
        rows = by_id(import_vindr([table, meta, findings], tmp_path))
    assert rows.loc["d8125545210c08e1b1793a5af6458ee2", "age"] == 53.0
    assert rows.loc["d8125545210c08e1b1793a5af6458ee2", "manufacturer"] == "SIEMENS"
    assert rows.loc["1a1b1c1d1e1f1a1b1c1d1e1f1a1b1c1d", "manufacturer"] is None


# ------------------------------------------------------------------------------------------------
# CBIS-DDSM

CBIS_MASS = """
patient_id,breast_density,left or right breast,image view,abnormality id,abnormality type,mass shape,mass margins,assessment,pathology,subtlety,image file path,cropped image file path,ROI mask file path
P_00001,3,LEFT,CC,1,mass,IRREGULAR-ARCHITECTURAL_DISTORTION,SPICULATED,4,BENIGN,4,"Mass-Training_P_00001_LEFT_CC/1.3.6.1.4.1.9590.100.1.2.422112722213189649807611434612228974994/1.3.6.1.4.1.9590.100.1.2.342386194811267636608694132590482924515/000000.dcm
",Mass-Training_P_00001_LEFT_CC_1/1.3.6/1.3.7/000000.dcm,Mass-Training_P_00001_LEFT_CC_1/1.3.6/1.3.7/000001.dcm
P_00001,3,LEFT,CC,2,mass,OVAL,CIRCUMSCRIBED,5,MALIGNANT,5,"Mass-Training_P_00001_LEFT_CC/1.3.6.1.4.1.9590.100.1.2.422112722213189649807611434612228974994/1.3.6.1.4.1.9590.100.1.2.342386194811267636608694132590482924515/000000.dcm
",Mass-Training_P_00001_LEFT_CC_2/1.3.6/1.3.8/000000.dcm,Mass-Training_P_00001_LEFT_CC_2/1.3.6/1.3.8/000001.dcm
P_00001,3,LEFT,MLO,1,mass,OVAL,CIRCUMSCRIBED,3,BENIGN,4,Mass-Training_P_00001_LEFT_MLO/1.3.6.1.4.1.9590.100.1.2.1/1.3.6.1.4.1.9590.100.1.2.2/000000.dcm,Mass-Training_P_00001_LEFT_MLO_1/x/y/000000.dcm,Mass-Training_P_00001_LEFT_MLO_1/x/y/000001.dcm
"""

CBIS_CALC = """
patient_id,breast density,left or right breast,image view,abnormality id,abnormality type,calc type,calc distribution,assessment,pathology,subtlety,image file path,cropped image file path,ROI mask file path
P_00001,3,LEFT,CC,1,calcification,AMORPHOUS,CLUSTERED,3,BENIGN_WITHOUT_CALLBACK,3,Calc-Training_P_00001_LEFT_CC/1.3.6.1.4.1.9590.100.1.2.9/1.3.6.1.4.1.9590.100.1.2.10/000000.dcm,Calc-Training_P_00001_LEFT_CC_1/a/b/000000.dcm,Calc-Training_P_00001_LEFT_CC_1/a/b/000001.dcm
P_00004,2,RIGHT,MLO,1,calcification,PLEOMORPHIC,SEGMENTAL,5,MALIGNANT,5,Calc-Test_P_00004_RIGHT_MLO/1.3.6.1.4.1.9590.100.1.2.11/1.3.6.1.4.1.9590.100.1.2.12/000000.dcm,Calc-Test_P_00004_RIGHT_MLO_1/a/b/000000.dcm,Calc-Test_P_00004_RIGHT_MLO_1/a/b/000001.dcm
"""


def test_cbis_one_row_per_image_malignant_if_any_abnormality_is(tmp_path):
    mass = write(tmp_path / "mass_case_description_train_set.csv", CBIS_MASS)
    calc = write(tmp_path / "calc_case_description_test_set.csv", CBIS_CALC)
    manifest = import_cbis([mass, calc], tmp_path / "CBIS-DDSM")
    rows = by_id(manifest)
    # Two mass abnormalities and one calcification of the same left CC image collapse into one row.
    assert sorted(rows.index) == ["P_00001_LEFT_CC", "P_00001_LEFT_MLO", "P_00004_RIGHT_MLO"]
    assert rows["label"].to_dict() == {"P_00001_LEFT_CC": 1, "P_00001_LEFT_MLO": 0, "P_00004_RIGHT_MLO": 1}
    left_cc = rows.loc["P_00001_LEFT_CC"]
    assert (left_cc["patient_id"], left_cc["exam_id"], left_cc["laterality"], left_cc["view"]) == (
        "P_00001",
        "P_00001",
        "L",
        "CC",
    )
    assert (left_cc["density"], left_cc["birads"], left_cc["dataset"]) == ("C", "5", "CBIS")
    # The trailing newline inside the quoted path is stripped; the first path in sort order is used.
    assert left_cc["path"].endswith(
        "/CBIS-DDSM/Calc-Training_P_00001_LEFT_CC/1.3.6.1.4.1.9590.100.1.2.9/1.3.6.1.4.1.9590.100.1.2.10/000000.dcm"
    )
    assert rows.loc["P_00004_RIGHT_MLO", "density"] == "B"


def test_cbis_rejects_unknown_pathology(tmp_path):
    mass = write(tmp_path / "mass_case_description_test_set.csv", CBIS_MASS.replace(",BENIGN,4,Mass", ",UNSURE,4,Mass"))
    with pytest.raises(ImportErrorWithContext, match="UNSURE") as info:
        import_cbis([mass], tmp_path)
    assert "mass_case_description_test_set.csv" in str(info.value) and info.value.rows == [3]


# ------------------------------------------------------------------------------------------------
# Coded columns: a value outside a source's documented set is refused, naming file, row, column and value

CODED_TABLES = {
    "csaw": {"CSAW-CC.csv": CSAW},
    "embed": {"metadata.csv": EMBED_META, "clinical.csv": EMBED_CLINICAL},
    "cbis": {"mass_case_description_train_set.csv": CBIS_MASS, "calc_case_description_test_set.csv": CBIS_CALC},
}


@pytest.mark.parametrize(
    ("source", "name", "old", "new", "column", "shown"),
    [
        # Each of these was read as "no cancer" (or as both breasts, or dropped the row) without a word.
        ("csaw", "CSAW-CC.csv", "1001,2012,1,1,Left,", "1001,2012,1,1,Lft,", "x_cancer_laterality", "row 1 ('Lft')"),
        ("csaw", "CSAW-CC.csv", "1,1,Left,1,0,1,", "1,1,Left,1,0,screen-detected,", "rad_timing", "row 3 ('screen-"),
        (
            "csaw",
            "CSAW-CC.csv",
            ",Left,CC,1001_20990909_L_CC_1",
            ",Up,CC,1001_20990909_L_CC_1",
            "imagelaterality",
            "row 1",
        ),
        (
            "csaw",
            "CSAW-CC.csv",
            ",Left,CC,1001_20990909_L_CC_2",
            ",,CC,1001_20990909_L_CC_2",
            "imagelaterality",
            "row 3",
        ),
        ("embed", "clinical.csv", ",2,L,0,61.2", ",2,L,malignant,61.2", "path_severity", "row 1 ('malignant')"),
        ("embed", "clinical.csv", ",2,L,0,61.2", ",2,L,7,61.2", "path_severity", "row 1 ('7')"),
        ("embed", "clinical.csv", "Bilateral,1,B,A,3", "Bilateral,1,both,A,3", "side", "row 4 ('both')"),
        ("embed", "clinical.csv", ",S,2,L,0,61.3", ",S,2,X,0,61.3", "bside", "row 3 ('X')"),
        ("embed", "metadata.csv", "L CC,2D,L,CC", "L CC,2D,Lt,CC", "ImageLateralityFinal", "row 1 ('Lt')"),
        # FinalImageType decides what is a full-field image: an undocumented type dropped the image unsaid.
        ("embed", "metadata.csv", "R CC,2D,R,CC", "R CC,FFDM,R,CC", "FinalImageType", "row 3 ('FFDM')"),
        # asses and tissueden outside the release's legend left birads and density empty without a word.
        ("embed", "clinical.csv", ",1,L,A,2,L,0,", ",1,L,4,2,L,0,", "asses", "row 1 ('4')"),
        ("embed", "clinical.csv", ",1,B,A,3,,,55.0", ",1,B,A,C,,,55.0", "tissueden", "row 4 ('C')"),
        ("embed", "clinical.csv", ",1,,N,4,,,47.5", ",1,,N,7,,,47.5", "tissueden", "row 6 ('7')"),
        (
            "cbis",
            "mass_case_description_train_set.csv",
            "P_00001,3,LEFT,CC,2,",
            "P_00001,3,,CC,2,",
            "left or right breast",
            "row 2",
        ),  # the MALIGNANT finding: its image became label 0
        (
            "cbis",
            "mass_case_description_train_set.csv",
            "P_00001,3,LEFT,CC,2,",
            "P_00001,3,BOTH,CC,2,",
            "left or right breast",
            "row 2 ('BOTH')",
        ),
        ("cbis", "mass_case_description_train_set.csv", "P_00001,3,LEFT,MLO,", ",3,LEFT,MLO,", "patient_id", "row 3"),
        (
            "cbis",
            "mass_case_description_train_set.csv",
            "4,Mass-Training_P_00001_LEFT_MLO/1.3.6.1.4.1.9590.100.1.2.1/1.3.6.1.4.1.9590.100.1.2.2/000000.dcm,",
            "4,,",
            "image file path",
            "row 3",
        ),  # was an AttributeError
    ],
)
def test_codes_outside_the_documented_set_are_refused(tmp_path, source, name, old, new, column, shown):
    paths = []
    for file, text in CODED_TABLES[source].items():
        if file == name:
            assert old in text
            text = text.replace(old, new, 1)
        paths.append(write(tmp_path / file, text))
    with pytest.raises(ImportErrorWithContext) as info:
        import_source(source, paths, tmp_path / "images")
    message = str(info.value)
    assert name in message and repr(column) in message and shown in message, message
    assert info.value.rows[0] == int(shown.split()[1])


def test_embed_documented_codes_are_read_as_documented(tmp_path):
    """The EMBED legend's codes pass: asses X (no assessment) and a blank give no BI-RADS, tissueden 5 (normal male)
    and a blank no density, 3.0 is 3; FinalImageType 3D and the screen saves ROI_SSC/ROI_SS are left out unsaid, and
    C-view, however spelt, only with include_cview."""
    meta = EMBED_META + (
        "10000003,20000005,2020-06-01,MG Screening Bilateral,L MLO,3D,L,MLO,0,images/cohort_1/10000003/1.2.5/3/t.dcm,"
        '"HOLOGIC, Inc.",0,()\n'
        "10000003,20000005,2020-06-01,MG Screening Bilateral,L MLO,ROI_SSC,L,MLO,0,images/cohort_1/10000003/1.2.5/3/s.dcm,"
        '"HOLOGIC, Inc.",0,()\n'
        "10000003,20000005,2020-06-01,MG Screening Bilateral,L MLO,ROI_SS,,MLO,0,images/cohort_1/10000003/1.2.5/3/u.dcm,"
        '"HOLOGIC, Inc.",0,()\n'
        "10000003,20000005,2020-06-01,MG Screening Bilateral,R MLO,cview,R,MLO,0,images/cohort_1/10000003/1.2.5/3/c.dcm,"
        '"HOLOGIC, Inc.",0,()\n'
    )
    clinical = EMBED_CLINICAL.replace(",1,,N,4,,,47.5", ",1,,X,3.0,,,47.5").replace(",2,R,N,2,,,61.2", ",2,R,,,,,61.2")
    tables = [write(tmp_path / "metadata.csv", meta), write(tmp_path / "clinical.csv", clinical)]
    with pytest.warns(UserWarning, match="no clinical row"):
        rows = by_id(import_embed(tables, tmp_path))
    d1 = rows.loc["cohort_1/10000003/1.2.5/1.3.5/d1.dcm"]
    assert d1["birads"] is None and d1["density"] == "C"  # X: no assessment; 3.0 is density 3
    # a blank asses on the right breast's row: the left's finding (A) does not reach it, so no BI-RADS
    a3 = rows.loc["cohort_1/10000001/1.2.1/1.3.1/a3.dcm"]
    assert a3["birads"] is None and a3["density"] == "B"  # the exam's first density, from the other row
    assert not rows.index.str.startswith("cohort_1/10000003/1.2.5/3/").any()
    with pytest.warns(UserWarning):
        wide = by_id(import_embed(tables, tmp_path, include_cview=True))
    assert set(wide.index[wide.index.str.startswith("cohort_1/10000003/1.2.5/3/")]) == {
        "cohort_1/10000003/1.2.5/3/c.dcm"
    }


def test_a_blank_embed_image_type_is_left_out_with_a_warning_not_refused(tmp_path):
    """A blank FinalImageType stopped the whole import; the importer cannot tell the image's type, so it leaves the
    row out, and says how many and which."""
    meta = EMBED_META.replace("R MLO,2D,R,MLO", "R MLO,,R,MLO", 1)
    tables = [write(tmp_path / "metadata.csv", meta), write(tmp_path / "clinical.csv", EMBED_CLINICAL)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rows = import_embed(tables, tmp_path)
        full = import_embed([write(tmp_path / "full.csv", EMBED_META), tables[1]], tmp_path)
    said = [str(w.message) for w in caught]
    assert sum("1 row(s) with a blank 'FinalImageType' left out, e.g. row 4" in text for text in said) == 1
    assert all("FinalImageType" in text or "no clinical row" in text for text in said)  # the fixture's exam 20000009
    assert len(rows) == len(full) - 1


def test_documented_blanks_are_not_refused(tmp_path):
    """A blank CSAW cancer side is a control, whose images may also lack a side; a blank EMBED side is both breasts
    and a blank path_severity no pathology (the fixtures above hold those too)."""
    text = CSAW.replace(",Left,CC,1003_20990909_L_CC_1", ",,CC,1003_20990909_L_CC_1")
    rows = by_id(import_csaw([write(tmp_path / "CSAW-CC.csv", text)], tmp_path))
    assert tuple(rows.loc["1003_20990909_L_CC_1.dcm", ["label", "laterality"]]) == (0, "U")
    assert rows["label"].sum() == 3


# ------------------------------------------------------------------------------------------------
# Reference CSV (seed) and generic


def test_seed_without_patient_id_derives_it_and_warns(tmp_path):
    table = write(
        tmp_path / "train.csv",
        "path_eq,cancer,datasettype,tissueden,ETHNICITY_DESC\n"
        "data/p001/exam1/p001_L_CC.png,1,EMBED,3,African American\n"
        "data/p001/exam1/p001_R_MLO.png,0,EMBED,3,African American\n"
        "data/p002/exam7/RCC.png,0,CSAW,B,White\n"
        "data/p003/exam2/1.2.840.1234.dcm,0,EMBED,,\n",
    )
    with pytest.warns(UserWarning, match=r"derived 3 patient id\(s\) for 4 row\(s\)"):
        manifest = import_seed([table], tmp_path)
    rows = by_id(manifest)
    assert rows["patient_id"].tolist() == ["p001", "p001", "p002", "p003"]
    assert rows["exam_id"].tolist() == ["p001/exam1", "p001/exam1", "p002/exam7", "p003/exam2"]
    assert rows["laterality"].tolist() == ["L", "R", "R", "U"]
    assert rows["view"].tolist() == ["CC", "MLO", "CC", "U"]
    assert rows["dataset"].tolist() == ["EMBED", "EMBED", "CSAW", "EMBED"]
    assert rows["density"].tolist() == ["C", "C", "B", None]
    assert rows.loc["data/p001/exam1/p001_L_CC.png", "ethnicity"] == "African American"
    assert rows.loc["data/p001/exam1/p001_L_CC.png", "path"] == (tmp_path / "data/p001/exam1/p001_L_CC.png").as_posix()


def test_seed_derives_ids_across_all_files(tmp_path):
    train = write(tmp_path / "train.csv", "path_eq,cancer\ndata/p001/e1/a_L_CC.png,0\ndata/p002/e1/b_L_CC.png,1\n")
    # Every row of this file sits under p003: per-file derivation would lose the patient folder.
    valid = write(tmp_path / "valid.csv", "path_eq,cancer\ndata/p003/e1/c_L_CC.png,0\ndata/p003/e2/d_R_CC.png,0\n")
    with pytest.warns(UserWarning, match="no patient_id"):
        rows = import_seed([train, valid], tmp_path)
    assert rows["patient_id"].tolist() == ["p001", "p002", "p003", "p003"]
    assert rows["exam_id"].tolist() == ["p001/e1", "p002/e1", "p003/e1", "p003/e2"]


def test_seed_with_patient_id_and_absolute_paths(tmp_path):
    table = write(
        tmp_path / "valid.csv",
        "path_eq,cancer,datasettype,patient_id\n"
        "/data/embed/cohort_1/777/1.2.3/1.2.4/x.png,0,EMBED,777\n"
        "/data/flat/888_left_mlo.png,1,CSAW,888\n",
    )
    rows = by_id(import_seed([table], tmp_path / "unused"))
    assert rows.loc["/data/embed/cohort_1/777/1.2.3/1.2.4/x.png", "exam_id"] == "777/1.2.3"
    assert rows.loc["/data/flat/888_left_mlo.png", "path"] == "/data/flat/888_left_mlo.png"
    assert tuple(rows.loc["/data/flat/888_left_mlo.png", ["laterality", "view", "label"]]) == ("L", "MLO", 1)


def test_seed_fills_blank_patient_ids_and_rejects_blank_paths(tmp_path):
    table = write(
        tmp_path / "test.csv",
        "path_eq,cancer,datasettype,patient_id\nimgs/p1/e1/p1_L_CC.png,0,EMBED,P-1\nimgs/p2/e4/p2_R_CC.png,1,EMBED,\n",
    )
    with pytest.warns(UserWarning, match="blank patient_id"):
        rows = import_seed([table], tmp_path)
    assert rows["patient_id"].tolist() == ["P-1", "p2"] and rows["exam_id"].tolist() == ["P-1", "p2/e4"]
    blank = write(tmp_path / "blank.csv", "path_eq,cancer,patient_id\na/1_L_CC.png,0,1\n,1,2\n")
    with pytest.raises(ImportErrorWithContext, match="empty path"):
        import_seed([blank], tmp_path)


def test_generic(tmp_path):
    root = tmp_path / "pngs"
    table = write(
        tmp_path / "manifest.csv",
        f"path,label,patient_id,view,density,split\n"
        f"a/1_R_CC.png,0,1,,2,train\n"
        f"{root.as_posix()}/a/1_L_CC.png,1,1,MLO,D,test\n",
    )
    with pytest.warns(UserWarning, match="its split column is ignored"):
        manifest = import_generic([table], root)
    assert manifest["image_id"].tolist() == ["a/1_R_CC.png", "a/1_L_CC.png"]
    assert manifest["path"].tolist() == [f"{root.as_posix()}/a/1_R_CC.png", f"{root.as_posix()}/a/1_L_CC.png"]
    assert manifest["exam_id"].tolist() == ["1", "1"] and manifest["dataset"].tolist() == ["GENERIC"] * 2
    assert manifest["laterality"].tolist() == ["R", "L"] and manifest["view"].tolist() == ["U", "MLO"]
    assert manifest["density"].tolist() == ["B", "D"] and "split" not in manifest.columns
    bad = write(tmp_path / "bad.csv", "path,label\nx.png,1\n")
    with pytest.raises(ImportErrorWithContext, match="patient_id") as info:
        import_generic([bad], root)
    assert "bad.csv" in str(info.value)
    empty_patient = write(tmp_path / "empty.csv", "path,label,patient_id\nx.png,1,\n")
    with pytest.raises(ImportErrorWithContext, match="empty patient_id"):
        import_generic([empty_patient], root)


def test_import_source_dispatch(tmp_path):
    table = write(tmp_path / "train.csv", RSNA)
    assert len(import_source("RSNA", table, tmp_path)) == 7
    with pytest.raises(ValueError, match="embed, csaw, rsna, vindr, cbis, seed, generic"):
        import_source("inbreast", [table], tmp_path)
    with pytest.raises(ImportErrorWithContext, match="not found"):
        import_source("rsna", [tmp_path / "nope.csv"], tmp_path)
    assert SOURCES == ("embed", "csaw", "rsna", "vindr", "cbis", "seed", "generic")


# ------------------------------------------------------------------------------------------------
# Splitting, subsetting, leaks


def synthetic_manifest(n_patients: int = 120, positive_every: int = 6, seed: int = 0) -> pd.DataFrame:
    """Patients with 1-3 exams of 4 images; every sixth patient has one positive breast."""
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(n_patients):
        dataset = "EMBED" if (p // 2) % 2 else "CSAW"
        for e in range(int(rng.integers(1, 4))):
            for lat in "LR":
                for view in ("CC", "MLO"):
                    positive = p % positive_every == 0 and e == 0 and lat == "L"
                    rows.append(
                        {
                            "image_id": f"{p}-{e}-{lat}{view}",
                            "path": f"/x/{p}/{e}/{lat}{view}.dcm",
                            "label": int(positive),
                            "patient_id": f"pat{p:03d}",
                            "exam_id": f"pat{p:03d}-{e}",
                            "laterality": lat,
                            "view": view,
                            "dataset": dataset,
                        }
                    )
    return pd.DataFrame(rows)


def test_split_is_patient_level_stratified_and_seeded():
    manifest = synthetic_manifest()
    split = split_patients(manifest, seed=3)
    assert set(split["split"]) == {"train", "valid", "test"}
    assert split.groupby("patient_id")["split"].nunique().max() == 1
    assert find_leaks(split) == {"patients": [], "exams": [], "images": []}
    patients = split.groupby("patient_id").agg(
        split=("split", "first"), positive=("label", "max"), ds=("dataset", "first")
    )
    for name in ("train", "valid", "test"):
        for dataset in ("EMBED", "CSAW"):
            assert patients[(patients.split == name) & (patients.ds == dataset)]["positive"].sum() >= 1
    shares = patients["split"].value_counts(normalize=True)
    assert shares["train"] == pytest.approx(0.7, abs=0.05) and shares["test"] == pytest.approx(0.15, abs=0.05)
    # Same seed → same split, whatever the row order; another seed → another split.
    shuffled = manifest.sample(frac=1.0, random_state=1)
    again = split_patients(shuffled, seed=3).sort_index()
    assert again["split"].equals(split["split"])
    assert not split_patients(manifest, seed=4)["split"].equals(split["split"])
    assert "split" not in manifest.columns  # the input is not modified


def test_split_keeps_positives_in_every_split_with_few_positive_patients():
    manifest = synthetic_manifest(n_patients=60, positive_every=20)  # 3 positive patients, one dataset each
    manifest["dataset"] = "RSNA"
    split = split_patients(manifest, seed=0)
    assert split.groupby("split")["label"].max().to_dict() == {"test": 1, "train": 1, "valid": 1}


def test_split_fractions_and_zero_split():
    manifest = synthetic_manifest(n_patients=30)
    no_test = split_patients(manifest, fractions=(0.8, 0.2, 0.0))
    assert set(no_test["split"]) == {"train", "valid"}
    for bad in [(0.7, 0.2, 0.2), (0.5, 0.5), (1.2, -0.1, -0.1)]:
        with pytest.raises(ValueError, match="fractions"):
            split_patients(manifest, fractions=bad)
    with pytest.raises(ValueError, match="site"):
        split_patients(manifest, stratify_by=("label", "site"))


def test_split_keeps_patients_that_share_an_exam_id_together():
    manifest = synthetic_manifest(n_patients=40)
    # Two ids for one woman, tied by a shared exam id (as when a source re-issued patient ids).
    manifest.loc[manifest["patient_id"] == "pat001", "exam_id"] = "pat002-0"
    for seed in range(5):
        split = split_patients(manifest, seed=seed)
        assert split.loc[split["patient_id"].isin(["pat001", "pat002"]), "split"].nunique() == 1


def test_find_leaks_reports_injected_overlap():
    split = split_patients(synthetic_manifest(n_patients=40), seed=0)
    split["pixel_hash"] = split["image_id"]
    victim = split.index[split["split"] == "train"][0]
    other = split.index[split["split"] == "test"][0]
    split.loc[victim, "split"] = "test"  # one image of a train patient moved to test
    split.loc[other, "pixel_hash"] = split.loc[split.index[split["split"] == "valid"][0], "pixel_hash"]
    leaks = find_leaks(split)
    assert leaks["patients"] == [split.loc[victim, "patient_id"]]
    assert leaks["exams"] == [split.loc[victim, "exam_id"]]
    assert split.loc[other, "image_id"] in leaks["images"]
    with pytest.raises(ValueError, match="split"):
        find_leaks(split.drop(columns="split"))


def test_subset_is_patient_level_stratified_seeded_and_not_the_head():
    manifest = synthetic_manifest(n_patients=120)
    subset = subset_patients(manifest, fraction=0.25, seed=7)
    chosen = set(subset["patient_id"])
    # Whole patients only.
    assert (manifest["patient_id"].isin(chosen) == manifest.index.isin(subset.index)).all()
    assert len(chosen) == pytest.approx(30, abs=2)
    positives = subset.groupby("patient_id")["label"].max().sum()
    assert positives == pytest.approx(20 * 0.25, abs=1)
    assert subset_patients(manifest, fraction=0.25, seed=7).equals(subset)
    assert set(subset_patients(manifest, fraction=0.25, seed=8)["patient_id"]) != chosen
    head = set(manifest["patient_id"].drop_duplicates().head(len(chosen)))
    assert chosen != head


def test_subset_by_rows():
    manifest = synthetic_manifest(n_patients=120)
    subset = subset_patients(manifest, n_rows=100, seed=0)
    assert abs(len(subset) - 100) <= 12  # whole patients of up to 12 images
    assert subset["label"].max() == 1
    assert subset_patients(manifest, n_rows=10**6).equals(manifest)
    tiny = subset_patients(manifest, n_rows=5, seed=0)
    assert tiny["label"].max() == 1  # each stratum keeps one patient, so positives survive
    for kwargs in ({}, {"fraction": 0.5, "n_rows": 10}, {"fraction": 0.0}, {"n_rows": 0}):
        with pytest.raises(ValueError):
            subset_patients(manifest, **kwargs)


def test_a_laterality_that_is_not_a_side_falls_back_to_the_file_name_with_a_warning(tmp_path):
    """``X`` became U without a word, even where the file name said R; breast-level metrics then pooled the
    exam's U images as one breast."""
    table = write(
        tmp_path / "m.csv",
        "path,label,patient_id,laterality\n1_R_CC.png,0,1,X\n1_L_CC.png,0,1,\n1_CC.png,0,1,B\n1_RMLO.png,0,1,L\n",
    )
    with pytest.warns(UserWarning, match=r"2 laterality value\(s\) other than L, R.*m\.csv row 1 \('X'\)"):
        manifest = import_generic([table], tmp_path)
    # the table's L wins over the file name; blank, X and B take the name's side, else U
    assert manifest["laterality"].tolist() == ["R", "L", "U", "L"]


RSNA_B = """
site_id,patient_id,image_id,laterality,view,age,cancer,biopsy,invasive,BIRADS,implant,density,machine_id,difficult_negative_case
2,30001,900000001,L,CC,50.0,0,0,0,,0,,29,False
2,30001,,L,MLO,50.0,0,0,0,,0,,29,False
2,30001,900000003,R,CC,50.0,0,0,0,,0,,29,False
"""
CSAW_B = """
anon_patientid,exam_year,x_age,x_case,x_cancer_laterality,x_type,x_lymphnode_met,rad_timing,imagelaterality,viewposition,anon_filename
2001,2016,2,0,,,,,Left,CC,2001_L_CC.dcm
2001,2016,2,0,,,,,Right,CC,
"""
VINDR_B = """
study_id,series_id,image_id,laterality,view_position,breast_birads,breast_density
d1d1,s1,i1,L,CC,BI-RADS 1,DENSITY A
d1d1,s1,i2,L,MLO,BI-RADS 1,DENSITY A
d1d1,s1,,R,CC,BI-RADS 1,DENSITY A
"""
# EMBED metadata passed as two tables, the second (patient 10000004's two images) with a blank path in its row 2.
_EMBED_HEADER, *_EMBED_LINES = EMBED_META.strip().splitlines()
EMBED_META_A = "\n".join([_EMBED_HEADER, *(line for line in _EMBED_LINES if not line.startswith("10000004,"))])
EMBED_META_B = "\n".join([_EMBED_HEADER, *(line for line in _EMBED_LINES if line.startswith("10000004,"))]).replace(
    "/mnt/NAS2/mammo/anon_dicom/cohort_1/10000004/1.2.6/1.3.6/e2.dcm", ""
)


@pytest.mark.parametrize(
    ("source", "tables", "bad", "marker"),
    [
        # Rows were numbered in the concatenation of the files (row 9: the second file's row 2), or from 0.
        ("rsna", {"a.csv": RSNA, "b.csv": RSNA_B}, "b.csv", "30001,,L,MLO"),
        ("csaw", {"a.csv": CSAW, "b.csv": CSAW_B}, "b.csv", "Right,CC,"),
        ("vindr", {"a.csv": VINDR, "b.csv": VINDR_B}, "b.csv", "d1d1,s1,,R"),
        (
            "embed",
            {"meta_a.csv": EMBED_META_A, "clinical.csv": EMBED_CLINICAL, "meta_b.csv": EMBED_META_B},
            "meta_b.csv",
            "R CC,2D,R,CC,0,,",
        ),
        (
            "generic",
            {
                "a.csv": "path,label,patient_id\n1_L_CC.png,0,1\n",
                "b.csv": "path,label,patient_id\n2_L_CC.png,0,2\n2_R_CC.png,1,2\n2_R_MLO.png,yes,2\n",
            },
            "b.csv",
            "2_R_MLO.png,yes",
        ),
    ],
)
def test_the_named_row_is_the_bad_row_of_its_file(tmp_path, source, tables, bad, marker):
    paths = [write(tmp_path / name, text) for name, text in tables.items()]
    with pytest.raises(ImportErrorWithContext) as info, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # EMBED's exam without a clinical row
        import_source(source, paths, tmp_path / "images")
    message = str(info.value)
    # each "row N" with the file named last before it: "b.csv: ... row 3" or "a.csv, b.csv: ..., e.g. b.csv row 2"
    found = [
        (re.findall(r"([\w.]+\.csv)", message[: match.start()])[-1], int(match.group(1)))
        for match in re.finditer(r"\brow (\d+)", message)
    ]
    assert found and all(name == bad for name, _ in found), message
    number = found[0][1]
    assert marker in (tmp_path / bad).read_text().splitlines()[number], message  # "row N" is line N + 1
    assert info.value.rows[0] == number and f"({importers.ROW_COUNTING})" in message


def test_duplicate_image_ids_name_their_rows(tmp_path):
    second = RSNA_B.replace(",,L,MLO", ",900000002,L,MLO").replace("900000003", "462822612")
    paths = [write(tmp_path / "a.csv", RSNA), write(tmp_path / "b.csv", second)]
    with pytest.raises(ImportErrorWithContext, match=r"462822612 \(.*a\.csv row 1, .*b\.csv row 3\)"):
        import_rsna(paths, tmp_path)


def test_errors_across_several_files_name_the_file_and_its_own_row(tmp_path):
    first = write(tmp_path / "a.csv", "path,label,patient_id\n1_L_CC.png,0,1\n1_R_CC.png,0,1\n")
    second = write(tmp_path / "b.csv", "path,label,patient_id\n2_L_CC.png,0,2\n2_R_CC.png,0,\n")
    with pytest.raises(ImportErrorWithContext, match=r"empty patient_id, e\.g\. .*b\.csv row 2"):
        import_generic([first, second], tmp_path)
    seed = write(tmp_path / "s.csv", "path_eq,cancer,patient_id\np/1_L_CC.png,0,1\np/1_R_CC.png,0,1\n")
    seed_bad = write(tmp_path / "t.csv", "path_eq,cancer,patient_id\np/2_L_CC.png,0,2\n,0,2\n")
    with pytest.raises(ImportErrorWithContext, match=r"empty path, e\.g\. .*t\.csv row 2"):
        import_seed([seed, seed_bad], tmp_path)
