"""Tests for mammo_ray.metrics: each metric against scikit-learn or a hand-computed case, degenerate splits,
patient-level bootstrap, and gathering predictions across a gloo process group."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import average_precision_score, brier_score_loss, roc_auc_score, roc_curve

from mammo_ray import metrics

SPLIT_KEYS = [
    "auc",
    "pr_auc",
    "sensitivity@0.3",
    "specificity@0.3",
    "sensitivity_exam@0.3",
    "specificity_exam@0.3",
    "recall_rate_screening@0.3",
    "cancer_detection_per_1000_screening@0.3",
    "ppv1_screening@0.3",
    "sensitivity@youden",
    "specificity@youden",
    "sensitivity_exam@youden",
    "specificity_exam@youden",
    "recall_rate_screening@youden",
    "cancer_detection_per_1000_screening@youden",
    "ppv1_screening@youden",
    "threshold@youden",
    "sensitivity@spec0.90",
    "specificity@spec0.90",
    "sensitivity_exam@spec0.90",
    "specificity_exam@spec0.90",
    "recall_rate_screening@spec0.90",
    "cancer_detection_per_1000_screening@spec0.90",
    "ppv1_screening@spec0.90",
    "threshold@spec0.90",
    "sensitivity@spec0.987",
    "specificity@spec0.987",
    "sensitivity_exam@spec0.987",
    "specificity_exam@spec0.987",
    "recall_rate_screening@spec0.987",
    "cancer_detection_per_1000_screening@spec0.987",
    "ppv1_screening@spec0.987",
    "threshold@spec0.987",
    "sensitivity@exam_spec0.90",
    "specificity@exam_spec0.90",
    "sensitivity_exam@exam_spec0.90",
    "specificity_exam@exam_spec0.90",
    "recall_rate_screening@exam_spec0.90",
    "cancer_detection_per_1000_screening@exam_spec0.90",
    "ppv1_screening@exam_spec0.90",
    "threshold@exam_spec0.90",
    "sensitivity@exam_spec0.987",
    "specificity@exam_spec0.987",
    "sensitivity_exam@exam_spec0.987",
    "specificity_exam@exam_spec0.987",
    "recall_rate_screening@exam_spec0.987",
    "cancer_detection_per_1000_screening@exam_spec0.987",
    "ppv1_screening@exam_spec0.987",
    "threshold@exam_spec0.987",
    "operating_points",
    "auc_breast",
    "pf1_breast",
    "auc_breast_max",
    "ece",
    "brier",
    "n_images",
    "n_positive",
    "n_exams",
    "n_positive_exams",
    "images_per_exam",
    "screening_prevalence",
]


def make_predictions(
    n_patients: int = 60,
    *,
    seed: int = 0,
    prevalence: float = 0.2,
    datasets: tuple[str, ...] = ("EMBED", "CSAW"),
    decimals: int | None = None,
) -> pd.DataFrame:
    """A predictions frame: 1-2 exams per patient, L/R x CC/MLO per exam, breast-level labels."""
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(n_patients):
        dataset = datasets[p % len(datasets)]
        for e in range(int(rng.integers(1, 3))):
            for side in ("L", "R"):
                label = int(rng.random() < prevalence)
                for view in ("CC", "MLO"):
                    prob = float(np.clip(rng.normal(0.25 + 0.35 * label, 0.18), 0.0, 1.0))
                    rows.append(
                        {
                            "image_id": f"P{p:03d}_E{e}_{side}_{view}",
                            "patient_id": f"P{p:03d}",
                            "exam_id": f"P{p:03d}_E{e}",
                            "laterality": side,
                            "view": view,
                            "dataset": dataset,
                            "label": label,
                            "prob": prob if decimals is None else round(prob, decimals),
                            "aleatoric": float(rng.random()),
                            "epistemic": np.nan,
                        }
                    )
    return pd.DataFrame(rows, columns=list(metrics.PREDICTION_COLUMNS))


@pytest.fixture(scope="module")
def frame() -> pd.DataFrame:
    return make_predictions()


# ------------------------------------------------------------------------------------ against sklearn


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("decimals", [None, 1])  # decimals=1 forces many tied scores
def test_roc_pr_brier_match_sklearn(seed: int, decimals: int | None) -> None:
    rng = np.random.default_rng(seed)
    labels = (rng.random(300) < 0.15).astype(int)
    scores = np.clip(rng.normal(0.3 + 0.3 * labels, 0.2), 0, 1)
    if decimals is not None:
        scores = scores.round(decimals)
    assert metrics.roc_auc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert metrics.pr_auc(labels, scores) == pytest.approx(average_precision_score(labels, scores), abs=1e-12)
    assert metrics.brier(labels, scores) == pytest.approx(brier_score_loss(labels, scores), abs=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_youden_matches_sklearn_roc_curve(seed: int) -> None:
    rng = np.random.default_rng(seed)
    labels = (rng.random(200) < 0.3).astype(int)
    scores = np.clip(rng.normal(0.3 + 0.2 * labels, 0.2), 0, 1).round(2)
    fpr, tpr, thresholds = roc_curve(labels, scores, drop_intermediate=False)
    expected = thresholds[np.argmax(tpr - fpr)]
    assert metrics.youden_threshold(labels, scores) == pytest.approx(expected)


def test_youden_exact_tie_goes_to_the_highest_threshold() -> None:
    """2 positives, 10 negatives: J is exactly 3/10 at 0.8 (sensitivity 1/2, specificity 8/10) and at 0.2 (2/2,
    3/10), but in floating point 1/2 - 2/10 < 1 - 7/10, and the lower, less specific threshold won the tie."""
    labels = [1, 1] + [0] * 10
    scores = [0.8, 0.2] + [0.8] * 2 + [0.2] * 5 + [0.05] * 3
    assert metrics.youden_threshold(labels, scores) == 0.8


@pytest.mark.parametrize("seed", range(4))
def test_youden_is_the_highest_threshold_of_the_exact_maximum(seed: int) -> None:
    from fractions import Fraction

    rng = np.random.default_rng(seed)
    for _ in range(100):
        n = int(rng.integers(4, 30))
        labels = (rng.random(n) < 0.4).astype(int)
        labels[:2] = [1, 0]
        scores = rng.integers(0, 6, n) / 5.0  # few distinct scores: many ties in J
        candidates = np.unique(scores)
        exact = {
            t: Fraction(int(((scores >= t) & (labels == 1)).sum()), int(labels.sum()))
            - Fraction(int(((scores >= t) & (labels == 0)).sum()), int((labels == 0).sum()))
            for t in candidates
        }
        best = max(exact.values())
        assert metrics.youden_threshold(labels, scores) == max(t for t, j in exact.items() if j == best)


def test_sens_spec_at_hand_case() -> None:
    labels = [1, 1, 1, 0, 0, 0, 0]
    scores = [0.9, 0.3, 0.1, 0.3, 0.2, 0.05, 0.6]
    # Positive call is score >= 0.3: positives 0.9, 0.3 called -> 2/3; negatives below 0.3: 0.2, 0.05 -> 2/4.
    assert metrics.sens_spec_at(labels, scores, 0.3) == pytest.approx((2 / 3, 0.5))


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        (0.0, 0.05),  # the smallest score already satisfies specificity >= 0
        (0.5, 0.3),  # negatives 0.05 and 0.2 below 0.3 -> specificity 2/4
        (0.75, 0.6),  # 0.3 must also be below -> the next score is 0.6
        (1.0, 0.9),  # all four negatives below 0.9
    ],
)
def test_threshold_at_specificity_hand_cases(target: float, expected: float) -> None:
    labels = [1, 1, 1, 0, 0, 0, 0]
    scores = [0.9, 0.3, 0.1, 0.3, 0.2, 0.05, 0.6]
    cut = metrics.threshold_at_specificity(labels, scores, target)
    assert cut == pytest.approx(expected)
    assert metrics.sens_spec_at(labels, scores, cut)[1] >= target


def test_threshold_at_specificity_above_max_when_a_negative_tops() -> None:
    cut = metrics.threshold_at_specificity([1, 0], [0.2, 0.8], 1.0)
    assert cut > 0.8
    assert metrics.sens_spec_at([1, 0], [0.2, 0.8], cut) == (0.0, 1.0)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("target", [0.9, 0.987])
def test_threshold_at_specificity_is_smallest(seed: int, target: float) -> None:
    rng = np.random.default_rng(seed)
    labels = (rng.random(1000) < 0.1).astype(int)
    scores = rng.random(1000).round(3)
    cut = metrics.threshold_at_specificity(labels, scores, target)
    assert metrics.sens_spec_at(labels, scores, cut)[1] >= target
    lower = np.unique(scores)[np.unique(scores) < cut]
    if lower.size:
        assert metrics.sens_spec_at(labels, scores, lower[-1])[1] < target


def test_breast_level_mean_and_max() -> None:
    frame = pd.DataFrame(
        {
            "patient_id": ["A", "A", "A", "B"],
            "exam_id": ["e1", "e1", "e1", "e2"],
            "laterality": ["L", "L", "R", "L"],
            "dataset": ["EMBED"] * 4,
            "label": [0, 1, 0, 0],
            "prob": [0.2, 0.6, 0.1, 0.3],
        }
    )
    mean = metrics.breast_level(frame, "mean").set_index(["patient_id", "laterality"])
    biggest = metrics.breast_level(frame, "max").set_index(["patient_id", "laterality"])
    assert len(mean) == 3
    assert mean.loc[("A", "L"), "label"] == 1
    assert mean.loc[("A", "L"), "prob"] == pytest.approx(0.4)
    assert mean.loc[("A", "L"), "n_images"] == 2
    assert biggest.loc[("A", "L"), "prob"] == pytest.approx(0.6)
    assert mean.loc[("B", "L"), "dataset"] == "EMBED"
    with pytest.raises(ValueError, match="agg"):
        metrics.breast_level(frame, "median")


# ------------------------------------------------------------------------------------- hand cases


@pytest.mark.parametrize(
    ("labels", "probs", "beta", "expected"),
    [
        # soft TP = 0.9 + 0.5 = 1.4, soft FP = 0.2; P = 1.4/1.6 = 0.875, R = 1.4/2 = 0.7; F1 = 7/9
        ([1, 1, 0, 0], [0.9, 0.5, 0.2, 0.0], 1.0, 7 / 9),
        # F2 = 5 P R / (4 P + R) = 5 * 0.6125 / 4.2
        ([1, 1, 0, 0], [0.9, 0.5, 0.2, 0.0], 2.0, 5 * 0.6125 / 4.2),
        # probabilities are clipped to [0, 1] as in the RSNA reference: 1.3 -> 1, -0.2 -> 0 -> P = 1, R = 0.5
        ([1, 1, 0], [1.3, 0.0, -0.2], 1.0, 2 * 0.5 / 1.5),
        ([1, 0], [0.0, 0.7], 1.0, 0.0),  # no soft true positives: recall 0 -> 0
        ([0, 0], [0.1, 0.7], 1.0, math.nan),  # no positives: undefined
    ],
)
def test_pf1_hand_cases(labels: list[int], probs: list[float], beta: float, expected: float) -> None:
    result = metrics.pf1(labels, probs, beta=beta)
    if math.isnan(expected):
        assert math.isnan(result)
    else:
        assert result == pytest.approx(expected)


def test_ece_hand_case() -> None:
    # Two bins. [0, 0.5): p 0.1, 0.2, labels 0, 1 -> |0.5 - 0.15| = 0.35, weight 1/2.
    # [0.5, 1]: p 0.7, 0.9, labels 1, 1 -> |1.0 - 0.8| = 0.2, weight 1/2. ECE = 0.175 + 0.1.
    assert metrics.ece([0, 1, 1, 1], [0.1, 0.2, 0.7, 0.9], n_bins=2) == pytest.approx(0.275)


def test_ece_perfect_calibration_and_bins() -> None:
    labels = [0, 0, 0, 1, 1, 0, 1, 1]
    probs = [0.25, 0.25, 0.25, 0.25, 0.75, 0.75, 0.75, 0.75]
    assert metrics.ece(labels, probs, n_bins=10) == pytest.approx(0.0)
    bins = metrics.calibration_bins(labels, probs, n_bins=4)
    assert bins["count"].tolist() == [0, 4, 0, 4]
    assert bins["fraction_positive"].iloc[1] == pytest.approx(0.25)
    assert math.isnan(bins["mean_prob"].iloc[0])
    assert metrics.calibration_bins([1], [1.0], n_bins=10)["count"].iloc[-1] == 1  # p = 1 lands in the last bin


# ------------------------------------------------------------------------------------- degenerate


@pytest.mark.parametrize(
    ("labels", "scores"),
    [([0, 0, 0], [0.1, 0.5, 0.9]), ([1, 1], [0.2, 0.3]), ([], [])],
    ids=["negatives-only", "positives-only", "empty"],
)
def test_one_class_or_empty_is_nan_not_half(labels: list[int], scores: list[float]) -> None:
    assert math.isnan(metrics.roc_auc(labels, scores))
    assert math.isnan(metrics.youden_threshold(labels, scores))


def test_all_equal_scores() -> None:
    labels = [0, 1, 0, 1, 0]
    scores = [0.4] * 5
    assert metrics.roc_auc(labels, scores) == pytest.approx(roc_auc_score(labels, scores))  # 0.5, truly
    assert metrics.pr_auc(labels, scores) == pytest.approx(average_precision_score(labels, scores))
    assert metrics.youden_threshold(labels, scores) == pytest.approx(0.4)
    result = metrics.compute_split_metrics(pd.DataFrame({**_breast_cols(5), "label": labels, "prob": scores}))
    assert result["auc"] == pytest.approx(0.5)
    assert result["sensitivity@0.3"] == 1.0 and result["specificity@0.3"] == 0.0


def _breast_cols(n: int) -> dict[str, list[str]]:
    return {"patient_id": [f"P{i}" for i in range(n)], "exam_id": ["e"] * n, "laterality": ["L"] * n}


def test_split_without_positives_is_none_with_reason(frame: pd.DataFrame) -> None:
    negatives = frame[frame["label"] == 0]
    result = metrics.compute_split_metrics(negatives)
    n = len(negatives)
    assert result["auc"] is None
    assert result["auc_reason"] == f"undefined: no positive cases in this split (n_images={n})"
    assert result["sensitivity@0.3"] is None and "no positive cases" in result["sensitivity@0.3_reason"]
    assert result["specificity@0.3"] is not None  # defined with negatives only
    assert result["auc_breast"] is None and "no positive breasts" in result["auc_breast_reason"]
    assert result["pf1_breast"] is None
    assert result["ece"] is not None and result["brier"] is not None
    assert result["n_positive"] == 0 and result["n_images"] == n
    json.dumps(result, allow_nan=False)  # JSON-ready: no NaN anywhere


def test_split_without_negatives_reason(frame: pd.DataFrame) -> None:
    result = metrics.compute_split_metrics(frame[frame["label"] == 1])
    assert result["auc"] is None and "no negative cases" in result["auc_reason"]
    assert result["pr_auc"] == pytest.approx(1.0)  # defined: every call is right
    assert result["specificity@0.3"] is None and "no negative cases" in result["specificity@0.3_reason"]


def test_empty_frame(frame: pd.DataFrame) -> None:
    result = metrics.compute_metrics(frame.iloc[:0], bootstrap=10)
    assert result["n_images"] == 0 and result["n_positive"] == 0 and result["n_exams"] == 0
    for key in SPLIT_KEYS:
        if key in ("operating_points", "screening_prevalence") or key.startswith("n_"):
            continue
        if key == "images_per_exam":  # a count, not a metric: none without exams
            assert result[key] is None
            continue
        assert result[key] is None
        assert result[f"{key}_reason"].startswith("undefined: no ")
    assert result["auc_ci95"] is None
    assert result["by_dataset"] == {}
    json.dumps(result, allow_nan=False)


def test_labels_and_scores_are_checked() -> None:
    with pytest.raises(ValueError, match="0 or 1"):
        metrics.roc_auc([0, 2], [0.1, 0.2])
    with pytest.raises(ValueError, match="NaN"):
        metrics.roc_auc([0, 1], [0.1, float("nan")])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        metrics.ece([0, 1], [0.1, 1.5])


# ------------------------------------------------------------------------------------ split metrics


def test_split_keys_are_exact(frame: pd.DataFrame) -> None:
    result = metrics.compute_split_metrics(frame)
    assert list(result) == SPLIT_KEYS  # no reasons when everything is defined
    assert result["auc"] == pytest.approx(roc_auc_score(frame["label"], frame["prob"]))
    assert result["pr_auc"] == pytest.approx(average_precision_score(frame["label"], frame["prob"]))
    breasts = metrics.breast_level(frame)
    assert result["auc_breast"] == pytest.approx(roc_auc_score(breasts["label"], breasts["prob"]))
    assert result["pf1_breast"] == pytest.approx(metrics.pf1(breasts["label"], breasts["prob"]))
    sens, spec = metrics.sens_spec_at(frame["label"], frame["prob"], result["threshold@youden"])
    assert (result["sensitivity@youden"], result["specificity@youden"]) == pytest.approx((sens, spec))
    assert isinstance(result["n_images"], int) and result["n_positive"] == int(frame["label"].sum())


def test_compute_metrics_by_dataset(frame: pd.DataFrame) -> None:
    mixed = frame.copy()
    mixed.loc[mixed["dataset"] == "CSAW", "label"] = 0  # CSAW now has no cancers
    result = metrics.compute_metrics(mixed)
    assert set(result["by_dataset"]) == {"CSAW", "EMBED"}
    embed = mixed[mixed["dataset"] == "EMBED"]
    # Each data set is scored at the whole split's operating points, not at points re-fitted on its own labels.
    cuts = metrics.all_operating_points(mixed)
    expected = metrics._split_metrics(embed, threshold=0.3, breast_agg="mean", specificities=(0.90, 0.987),
                                      scope="dataset EMBED", cuts=cuts)  # fmt: skip
    assert result["by_dataset"]["EMBED"] == {**expected, "operating_points": "the whole split's (fitted on this split)"}
    assert result["by_dataset"]["EMBED"]["threshold@youden"] == result["threshold@youden"]
    assert result["by_dataset"]["EMBED"]["threshold@exam_spec0.90"] == result["threshold@exam_spec0.90"]
    csaw = result["by_dataset"]["CSAW"]
    n_csaw = int((mixed["dataset"] == "CSAW").sum())
    assert csaw["auc"] is None
    assert csaw["auc_reason"] == f"undefined: no positive cases in dataset CSAW (n_images={n_csaw})"
    # A site without cancers still has a specificity at the deployed operating point: its false-positive rate.
    csaw_rows = mixed[mixed["dataset"] == "CSAW"]
    assert csaw["specificity@youden"] == pytest.approx(float((csaw_rows["prob"] < result["threshold@youden"]).mean()))
    assert "auc_ci95" not in result  # only with bootstrap
    json.dumps(result, allow_nan=False)


def test_custom_threshold_and_specificities_name_their_keys(frame: pd.DataFrame) -> None:
    result = metrics.compute_split_metrics(frame, threshold=0.5, specificities=(0.95,))
    assert "sensitivity@0.5" in result and "specificity@0.5" in result and "sensitivity@spec0.95" in result


def test_a_decision_threshold_is_scored_beside_the_reference_one(frame: pd.DataFrame) -> None:
    """export scored a bundle with train.threshold 0.35 at 0.3 only; readers of metrics.json still need 0.3."""
    result = metrics.compute_metrics(frame, threshold=0.35, bootstrap=50, seed=1)
    for cut in (0.3, 0.35):
        sens, spec = metrics.sens_spec_at(frame["label"], frame["prob"], cut)
        assert (result[f"sensitivity@{cut}"], result[f"specificity@{cut}"]) == pytest.approx((sens, spec))
        low, high = result[f"sensitivity@{cut}_ci95"]
        assert low <= sens <= high
    assert result["sensitivity@0.35"] != result["sensitivity@0.3"]
    assert set(result["bootstrap"]["skipped"]) >= {"sensitivity@0.35", "specificity@0.3"}
    assert metrics.fixed_thresholds(0.3) == (0.3,)


def test_thresholds_table(frame: pd.DataFrame) -> None:
    table = metrics.thresholds_table(frame)
    assert list(table) == ["0.3", "youden", "spec0.90", "spec0.987", "exam_spec0.90", "exam_spec0.987"]
    split = metrics.compute_split_metrics(frame)
    exam = table["exam_spec0.90"]
    assert exam["threshold"] == split["threshold@exam_spec0.90"] and exam["specificity_exam"] >= 0.90
    assert exam["sensitivity"] == split["sensitivity@exam_spec0.90"]  # the image figures at the exam threshold
    assert table["youden"]["threshold"] == split["threshold@youden"]
    assert table["0.3"]["sensitivity"] == split["sensitivity@0.3"]
    assert table["spec0.90"]["sensitivity"] == split["sensitivity@spec0.90"]
    assert table["spec0.90"]["specificity"] >= 0.90
    assert table["spec0.987"]["specificity"] >= 0.987
    positives_only = metrics.thresholds_table(frame[frame["label"] == 1])
    assert positives_only["spec0.90"]["threshold"] is None
    assert "no negative cases" in positives_only["spec0.90"]["reason"]
    assert positives_only["exam_spec0.90"]["threshold"] is None
    assert "no negative exams" in positives_only["exam_spec0.90"]["reason"]
    json.dumps(positives_only, allow_nan=False)


# ---------------------------------------------------------------------------------------- bootstrap


def test_bootstrap_is_deterministic_and_seeded(frame: pd.DataFrame) -> None:
    first = metrics.compute_metrics(frame, bootstrap=200, seed=7)
    again = metrics.compute_metrics(frame.sample(frac=1.0, random_state=1), bootstrap=200, seed=7)  # row order too
    other = metrics.compute_metrics(frame, bootstrap=200, seed=8)
    for key in ("auc_ci95", "pr_auc_ci95", "auc_breast_ci95"):
        assert first[key] == pytest.approx(again[key])
        low, high = first[key]
        assert low <= first[key.removesuffix("_ci95")] <= high
    assert first["auc_ci95"] != other["auc_ci95"]
    assert first["bootstrap"]["resampling_unit"] == "patient (dataset + patient_id)"
    assert set(first["by_dataset"]["CSAW"]) >= {"auc_ci95", "pr_auc_ci95", "auc_breast_ci95", "bootstrap"}
    json.dumps(first, allow_nan=False)


def test_bootstrap_ci_matches_compute_metrics(frame: pd.DataFrame) -> None:
    """The generic frame-based bootstrap and the fast array path draw the same patients."""
    fast = metrics.compute_metrics(frame, bootstrap=100, seed=3)
    auc = metrics.bootstrap_ci(frame, lambda f: metrics.roc_auc(f["label"], f["prob"]), n=100, seed=3)

    def breast_auc(f: pd.DataFrame) -> float:
        breasts = metrics.breast_level(f)
        return metrics.roc_auc(breasts["label"], breasts["prob"])

    assert auc == pytest.approx(fast["auc_ci95"], abs=1e-12)
    assert metrics.bootstrap_ci(frame, breast_auc, n=100, seed=3) == pytest.approx(fast["auc_breast_ci95"], abs=1e-12)


def test_exam_figures_and_their_screening_projection_get_intervals_from_the_same_draws(frame: pd.DataFrame) -> None:
    """The projection was a bare point estimate; its interval comes from the patient resamples that give every other
    interval, each pushed through Bayes' rule, so it matches the frame-based bootstrap drawn with the same seed."""
    cuts = metrics.operating_points(frame["label"], frame["prob"])
    fast = metrics.compute_metrics(frame, bootstrap=100, seed=3, cuts=cuts, screening_prevalence=0.02)

    def at(point: float, key: str):
        def metric(sample: pd.DataFrame) -> float:
            exams = metrics.exam_level(sample)
            se, sp = metrics.sens_spec_at(exams["label"], exams["prob"], point)
            values = {"sensitivity_exam": se, "specificity_exam": sp}
            values.update({f"{k}_screening": v for k, v in metrics.screening_projection(se, sp, 0.02).items()})
            return values[key]

        return metric

    for name, point in (("0.3", 0.3), ("spec0.90", cuts["spec0.90"])):
        for key in (*metrics.EXAM_POINT_METRICS, *metrics.SCREENING_POINT_METRICS):
            expected = metrics.bootstrap_ci(frame, at(point, key), n=100, seed=3)
            assert fast[f"{key}@{name}_ci95"] == pytest.approx(expected, abs=1e-12), (name, key)
            low, high = fast[f"{key}@{name}_ci95"]
            assert low <= fast[f"{key}@{name}"] <= high
    # Detection is se·π, so its interval is exactly π times the exam sensitivity's.
    se_low, se_high = fast["sensitivity_exam@0.3_ci95"]
    assert fast["cancer_detection_per_1000_screening@0.3_ci95"] == pytest.approx([20 * se_low, 20 * se_high])
    # Points fitted on the split itself get none, as their image figures do.
    fitted = metrics.compute_metrics(frame, bootstrap=100, seed=3)
    assert "ppv1_screening@youden_ci95" not in fitted and "ppv1_screening@0.3_ci95" in fitted


def test_exam_intervals_count_women_by_their_exams(frame: pd.DataFrame) -> None:
    """Too few women with a cancer exam: the exam sensitivity gets Clopper-Pearson on them, the projection none."""
    few = frame.copy()
    positives = few.loc[few["label"] == 1, "patient_id"].unique()
    few.loc[few["patient_id"].isin(positives[4:]), "label"] = 0  # 4 women with cancer left
    result = metrics.compute_metrics(few, bootstrap=50, seed=0)
    assert result["sensitivity_exam@0.3_ci95_method"] == metrics.CLOPPER_PEARSON
    assert result["ppv1_screening@0.3_ci95"] is None
    assert "4 with a positive exam" in result["ppv1_screening@0.3_ci95_reason"]


def test_bootstrap_resamples_patients_as_units() -> None:
    # Patient "BIG" has 20 images; the 10 others have 1 image each.
    frame = pd.DataFrame(
        {
            "image_id": [f"BIG_{i}" for i in range(20)] + [f"S{i}_0" for i in range(10)],
            "patient_id": ["BIG"] * 20 + [f"S{i}" for i in range(10)],
            "label": [1] * 20 + [0] * 10,
            "prob": np.linspace(0, 1, 30),
        }
    )
    seen_sizes = set()

    def inspect(resample: pd.DataFrame) -> float:
        big = resample[resample["image_id"].str.startswith("BIG")]
        assert len(big) % 20 == 0  # all of the patient's images, or none, per draw
        for _, rows in big.groupby("patient_id"):  # each copy gets its own cluster id...
            assert len(rows) == 20 and rows["image_id"].nunique() == 20  # ...holding all 20 images once
        assert resample["patient_id"].nunique() == 11  # as many draws as patients
        seen_sizes.add(len(resample))
        return float(len(big))

    low, high = metrics.bootstrap_ci(frame, inspect, n=200, seed=0)
    assert len(seen_sizes) > 1  # image count varies: patients, not images, are drawn
    assert 0 <= low <= high <= 11 * 20


def test_bootstrap_skips_and_counts_one_class_resamples() -> None:
    # One positive patient out of 12: about (11/12)^12 = 35% of resamples have no positive.
    frame = pd.DataFrame(
        {
            **_breast_cols(12),
            "label": [1] + [0] * 11,
            "prob": [0.9, 0.2, 0.4, 0.6, 0.1, 0.3, 0.5, 0.25, 0.35, 0.45, 0.15, 0.05],
        }
    )
    result = metrics.compute_metrics(frame, bootstrap=300, seed=0)
    skipped = result["bootstrap"]["skipped"]["auc"]
    assert 60 < skipped < 150
    # Percentiles over the resamples that happened to hold the positive gave [1.0, 1.0]: certainty from one case.
    # One patient with cancer is also below the minimum of patients with a positive image, which now says so first.
    assert result["auc_ci95"] is None
    assert result["auc_ci95_reason"].startswith("not reported: patients in this split: 1 with a positive image,")
    single = metrics.compute_metrics(frame.iloc[1:], bootstrap=20)
    assert single["auc_ci95"] is None and single["auc_ci95_reason"].startswith("undefined: no positive cases")


# ------------------------------------------------------------------------------------------- referral


def test_referral_curve() -> None:
    labels = np.array([1, 1, 0, 0, 0, 0, 1, 0])
    probs = np.array([0.9, 0.8, 0.1, 0.2, 0.3, 0.85, 0.15, 0.05])  # two errors: 0.85 (neg), 0.15 (pos)
    uncertainty = np.array([0.1, 0.1, 0.1, 0.1, 0.1, 0.9, 0.8, 0.1])  # and they are the uncertain ones
    curve = metrics.referral_curve(labels, probs, uncertainty, fractions=[0.0, 0.25, 1.0])
    assert curve["auc"].iloc[0] == pytest.approx(roc_auc_score(labels, probs))
    assert curve["auc"].iloc[1] == pytest.approx(1.0)
    assert curve["n_deferred"].tolist() == [0, 2, 8]
    assert math.isnan(curve["auc"].iloc[2])
    with pytest.raises(ValueError, match="NaN"):
        metrics.referral_curve(labels, probs, np.full(8, np.nan), fractions=[0.1])


# -------------------------------------------------------------------------------------------- gather


def test_gather_predictions_without_process_group_sorts_and_dedups(frame: pd.DataFrame) -> None:
    shuffled = pd.concat([frame.iloc[::-1], frame.iloc[:3]], ignore_index=True)  # 3 padded repeats
    gathered = metrics.gather_predictions(shuffled)
    assert len(gathered) == len(frame)
    assert gathered["image_id"].is_monotonic_increasing and gathered["image_id"].is_unique


def _gather_worker(rank: int, world_size: int, init_file: str, shards: list[pd.DataFrame], out_dir: str) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        gathered = metrics.gather_predictions(shards[rank])
        result = metrics.compute_metrics(gathered, bootstrap=50, seed=0)
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def test_gather_predictions_across_gloo_ranks(frame: pd.DataFrame, tmp_path: Path) -> None:
    torch_mp = pytest.importorskip("torch.multiprocessing")
    # Rank 0 gets the even rows plus one padded repeat of an odd row, as a DistributedSampler would pad.
    shards = [pd.concat([frame.iloc[0::2], frame.iloc[[1]]]), frame.iloc[1::2]]
    context = torch_mp.start_processes(
        _gather_worker,
        args=(2, str(tmp_path / "pg_init"), shards, str(tmp_path)),
        nprocs=2,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + 90
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.terminate()
            pytest.fail("gloo workers did not finish within 90 s")
    expected = metrics.compute_metrics(frame, bootstrap=50, seed=0)
    for rank in range(2):
        _assert_close(json.loads((tmp_path / f"rank{rank}.json").read_text()), expected)


def _assert_close(actual: object, expected: object, where: str = "") -> None:
    """Nested equality with a float tolerance: summation order may differ after gathering."""
    if isinstance(expected, dict):
        assert isinstance(actual, dict) and list(actual) == list(expected), where
        for key in expected:
            _assert_close(actual[key], expected[key], f"{where}.{key}")
    elif isinstance(expected, list):
        assert isinstance(actual, list) and len(actual) == len(expected), where
        for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
            _assert_close(a, e, f"{where}[{i}]")
    elif isinstance(expected, float):
        assert actual == pytest.approx(expected, rel=1e-12, abs=1e-12), where
    else:
        assert actual == expected, where


def test_test_metrics_apply_the_validation_operating_points() -> None:
    """A test split's Youden and fixed-specificity figures were re-fitted on its own labels."""
    val = make_predictions(60, seed=1)
    test = make_predictions(60, seed=2)
    cuts = metrics.operating_points(val["label"], val["prob"])
    result = metrics.compute_metrics(test, cuts=cuts)
    assert result["operating_points"] == "from the validation split"
    assert result["threshold@youden"] == pytest.approx(cuts["youden"])
    assert result["threshold@spec0.90"] == pytest.approx(cuts["spec0.90"])
    y, p = test["label"].to_numpy(), test["prob"].to_numpy()
    sens, spec = metrics.sens_spec_at(y, p, cuts["spec0.90"])
    assert (result["sensitivity@spec0.90"], result["specificity@spec0.90"]) == pytest.approx((sens, spec))
    refit = metrics.compute_metrics(test)
    assert refit["threshold@youden"] == pytest.approx(metrics.youden_threshold(y, p))
    assert refit["specificity@spec0.90"] >= 0.9  # fitted: the target is reached on the split itself


def test_test_figures_at_the_validation_points_get_the_intervals_of_a_fixed_threshold() -> None:
    """On test the validation's thresholds are fixed numbers, so their sensitivity and specificity get patient-bootstrap
    intervals like 0.3's (there were none); points fitted on the split itself get none (no re-fitting per resample)."""
    val = make_predictions(60, seed=1)
    test = make_predictions(60, seed=2)
    cuts = metrics.operating_points(val["label"], val["prob"])
    result = metrics.compute_metrics(test, cuts=cuts, bootstrap=200)
    for name in ("youden", "spec0.90"):
        # The same draws scored at that threshold as the decision threshold: the same interval.
        fixed = metrics.compute_metrics(test, threshold=cuts[name], bootstrap=200)
        key = metrics.threshold_key(cuts[name])
        for what in ("sensitivity", "specificity"):
            assert result[f"{what}@{name}_ci95"] == fixed[f"{what}@{key}_ci95"], (name, what)
            assert result[f"{what}@{name}_ci95"][0] <= result[f"{what}@{name}"] <= result[f"{what}@{name}_ci95"][1]
        assert f"sensitivity@{name}" in result["bootstrap"]["skipped"]
        assert all(f"sensitivity@{name}_ci95" in part for part in result["by_dataset"].values())
    fitted = metrics.compute_metrics(val, bootstrap=200)
    assert "sensitivity@youden_ci95" not in fitted and "sensitivity@youden" not in fitted["bootstrap"]["skipped"]
    assert all("sensitivity@youden_ci95" not in part for part in fitted["by_dataset"].values())


def test_breasts_are_keyed_within_their_data_set_and_unknown_sides_stand_alone() -> None:
    frame = pd.DataFrame(
        {
            "image_id": ["a", "b", "c", "d", "e", "f"],
            "patient_id": ["1", "1", "1", "1", "2", "2"],
            "exam_id": ["1", "1", "1", "1", "x", "x"],
            "laterality": ["L", "L", "L", "L", "U", "U"],
            "dataset": ["RSNA", "RSNA", "INHOUSE", "INHOUSE", "A", "A"],
            "label": [1, 1, 0, 0, 1, 0],
            "prob": [0.9, 0.8, 0.1, 0.2, 0.7, 0.3],
        }
    )
    breasts = metrics.breast_level(frame)
    assert len(breasts) == 4  # two women called "1", and two images of unknown side
    rsna = breasts[breasts["dataset"] == "RSNA"].iloc[0]
    assert (rsna["label"], rsna["prob"], rsna["n_images"]) == (1, pytest.approx(0.85), 2)
    unknown = breasts[breasts["laterality"] == "U"]
    assert sorted(unknown["label"]) == [0, 1] and (unknown["n_images"] == 1).all()
    assert metrics.patient_key(frame).nunique() == 3


def test_a_blank_dataset_read_back_from_csv_does_not_break_the_bootstrap(tmp_path) -> None:
    """export reads val_predictions.csv with ids as text: a blank dataset cell comes back NaN, which the patient key
    turned into factorize's code -1 and np.bincount's ValueError, after the whole sweep had run."""
    frame = make_predictions(40, seed=3).assign(dataset="")
    frame.to_csv(tmp_path / "val.csv", index=False)
    back = pd.read_csv(tmp_path / "val.csv", dtype={column: str for column in metrics.PREDICTION_COLUMNS[:6]})
    assert back["dataset"].isna().all()
    result = metrics.compute_metrics(back, bootstrap=20)
    assert result["auc_ci95"] is not None


def test_sensitivity_and_specificity_get_patient_bootstrap_intervals() -> None:
    """The card printed sens@0.3 and spec@0.3 without intervals: a reviewer reads 0.87 from 46 positives as exact."""
    frame = make_predictions(80, seed=5)
    result = metrics.compute_metrics(frame, bootstrap=200, seed=3)
    for name, pick in (("sensitivity@0.3", 0), ("specificity@0.3", 1)):
        expected = metrics.bootstrap_ci(
            frame, lambda f, i=pick: metrics.sens_spec_at(f["label"], f["prob"], 0.3)[i], n=200, seed=3
        )
        assert result[f"{name}_ci95"] == pytest.approx(expected)
        assert result[f"{name}_ci95"][0] <= result[name] <= result[f"{name}_ci95"][1]
        assert name in result["bootstrap"]["skipped"]
        assert f"{name}_ci95_method" not in result  # the ordinary case keeps the patient bootstrap
    no_positive = metrics.compute_metrics(frame.assign(label=0), bootstrap=20)
    assert no_positive["sensitivity@0.3_ci95"] is None and no_positive["specificity@0.3_ci95"] is not None


def test_no_bootstrap_interval_from_a_handful_of_patients() -> None:
    """3 patients have 10 distinct resamples: the smoke sweep's card printed sensitivity 0.500 (0.500–0.500)."""
    frame = make_predictions(9, seed=2)
    result = metrics.compute_metrics(frame, bootstrap=100)
    assert result["auc"] is not None and result["auc_ci95"] is None
    assert result["auc_ci95_reason"] == (
        "not reported: patients in this split: 4 with a positive image and 9 with a negative image, too few for a "
        "bootstrap interval (at least 10 with a positive image and 10 with a negative image)"
    )
    assert metrics.compute_metrics(make_predictions(24, seed=2), bootstrap=100)["auc_ci95"] is not None


def test_exam_level_sensitivity_and_specificity_call_an_exam_when_any_image_reaches_the_threshold() -> None:
    """The per-image specificity at 0.3 (0.296 on the demo's validation) read as a recall rate; per exam it was 0.014."""
    frame = pd.DataFrame(
        {
            "image_id": list("abcdefghijkl"),
            "patient_id": ["1"] * 4 + ["2"] * 4 + ["3"] * 4,
            "exam_id": ["x"] * 4 + ["y"] * 4 + ["z"] * 4,
            "laterality": ["L", "L", "R", "R"] * 3,
            "dataset": "A",
            # Exam x: one positive image, missed, but a negative image of the other breast reaches 0.3: recalled.
            # Exam y: negative, one image at 0.35: recalled. Exam z: negative, nothing reaches 0.3.
            "label": [1, 0, 0, 0] + [0] * 8,
            "prob": [0.1, 0.2, 0.5, 0.1] + [0.1, 0.35, 0.2, 0.1] + [0.2, 0.1, 0.29, 0.0],
        }
    )
    result = metrics.compute_split_metrics(frame)
    assert (result["sensitivity@0.3"], result["specificity@0.3"]) == (0.0, pytest.approx(9 / 11))  # per image
    assert (result["sensitivity_exam@0.3"], result["specificity_exam@0.3"]) == (1.0, 0.5)  # x recalled; y of y, z
    assert (result["n_exams"], result["n_positive_exams"]) == (3, 1)
    exams = metrics.exam_level(frame)
    assert list(exams["prob"]) == [0.5, 0.35, 0.29] and list(exams["label"]) == [1, 0, 0]
    no_cancer = metrics.compute_split_metrics(frame.assign(label=0))
    assert no_cancer["sensitivity_exam@0.3"] is None
    assert no_cancer["sensitivity_exam@0.3_reason"] == "undefined: no positive exams in this split (n_exams=3)"


def test_exam_figures_at_the_validation_operating_points(frame: pd.DataFrame) -> None:
    cuts = metrics.operating_points(frame["label"], frame["prob"])
    result = metrics.compute_metrics(frame, cuts=cuts)
    exams = metrics.exam_level(frame)
    sens, spec = metrics.sens_spec_at(exams["label"], exams["prob"], cuts["spec0.90"])
    assert (result["sensitivity_exam@spec0.90"], result["specificity_exam@spec0.90"]) == pytest.approx((sens, spec))
    assert result["specificity_exam@spec0.90"] < result["specificity@spec0.90"]  # more images, more chances to recall


@pytest.mark.parametrize(
    ("sensitivity", "specificity", "prevalence", "recall_rate", "per_1000", "ppv1"),
    [
        # 5 per 1,000 screens: a reader at se 0.85, sp 0.90 recalls 10.4% and PPV1 is 4.1%, as audits describe.
        (0.85, 0.90, 0.005, 0.85 * 0.005 + 0.10 * 0.995, 4.25, 0.85 * 0.005 / (0.85 * 0.005 + 0.10 * 0.995)),
        (1.0, 1.0, 0.005, 0.005, 5.0, 1.0),  # a perfect reader recalls exactly the cancers
        (0.0, 1.0, 0.01, 0.0, 0.0, math.nan),  # nothing recalled: no PPV
        (0.5, 0.5, 0.5, 0.5, 250.0, 0.5),  # chance, balanced: PPV equals the prevalence
        (math.nan, 0.9, 0.005, math.nan, math.nan, math.nan),
    ],
)
def test_screening_projection_applies_bayes_rule(sensitivity, specificity, prevalence, recall_rate, per_1000, ppv1):
    projected = metrics.screening_projection(sensitivity, specificity, prevalence)
    expected = {"recall_rate": recall_rate, "cancer_detection_per_1000": per_1000, "ppv1": ppv1}
    assert projected == pytest.approx(expected, nan_ok=True)


@pytest.mark.parametrize("prevalence", [0.0, 1.0, -0.1, 5.0])
def test_screening_projection_refuses_a_prevalence_outside_zero_one(prevalence):
    with pytest.raises(ValueError, match="prevalence must lie strictly between 0 and 1"):
        metrics.screening_projection(0.8, 0.9, prevalence)
    with pytest.raises(ValueError, match="prevalence"):
        metrics.compute_metrics(_screening_split(20, 4), screening_prevalence=prevalence)


def test_every_point_is_projected_from_its_exam_figures_not_from_the_enriched_split():
    """The split's own share of recalled exams and PPV depend on its enrichment (here 1 exam in 4 holds a cancer);
    the projection uses only the per-exam sensitivity and specificity."""
    frame = _screening_split(80, 20)  # 25% of exams with cancer, against 0.5% in screening
    cuts = metrics.operating_points(frame["label"], frame["prob"])
    for prevalence in (metrics.SCREENING_PREVALENCE, 0.02):
        result = metrics.compute_metrics(frame, cuts=cuts, screening_prevalence=prevalence)
        assert result["screening_prevalence"] == prevalence
        for point in ("0.3", "youden", "spec0.90", "spec0.987"):
            se, sp = result[f"sensitivity_exam@{point}"], result[f"specificity_exam@{point}"]
            expected = metrics.screening_projection(se, sp, prevalence)
            for key, value in expected.items():
                assert result[f"{key}_screening@{point}"] == pytest.approx(value), (point, key)
            for dataset in result["by_dataset"].values():
                assert f"ppv1_screening@{point}" in dataset and dataset["screening_prevalence"] == prevalence
        enriched_ppv = (frame.groupby("exam_id")["label"].max() == 1).mean()  # PPV a recall-all reader shows here
        assert result["ppv1_screening@0.3"] < enriched_ppv
    assert result["images_per_exam"] == {"min": 4, "median": 4.0, "max": 4}  # L/R x CC/MLO, one exam a woman
    # With no cancers at all the projection has no sensitivity to start from, and says why.
    no_cancer = metrics.compute_split_metrics(frame.assign(label=0))
    assert no_cancer["ppv1_screening@0.3"] is None
    assert "no positive exams" in no_cancer["ppv1_screening@0.3_reason"]


def test_exam_specificity_points_are_fitted_on_exams_and_applied_to_test_as_they_stand(frame: pd.DataFrame) -> None:
    """An image-level spec0.90 recalls far more than 10% of exams; a screening point is set on exams."""
    result = metrics.compute_metrics(frame)
    exams = metrics.exam_level(frame)
    cut = result["threshold@exam_spec0.90"]
    assert cut == metrics.threshold_at_specificity(exams["label"], exams["prob"], 0.90)
    assert result["specificity_exam@exam_spec0.90"] >= 0.90
    assert result["specificity_exam@spec0.90"] < result["specificity_exam@exam_spec0.90"]
    # On another split the validation's exam threshold is applied as it stands, with intervals as at a fixed one.
    cuts = metrics.all_operating_points(frame)
    other = make_predictions(seed=5)
    test = metrics.compute_metrics(other, cuts=cuts, bootstrap=50)
    assert test["threshold@exam_spec0.90"] == cut
    other_exams = metrics.exam_level(other)
    se, sp = metrics.sens_spec_at(other_exams["label"], other_exams["prob"], cut)
    assert (test["sensitivity_exam@exam_spec0.90"], test["specificity_exam@exam_spec0.90"]) == pytest.approx((se, sp))
    assert test["specificity_exam@exam_spec0.90_ci95"] is not None
    assert "exam_spec0.90" in metrics.thresholds_table(frame)


def test_the_other_breast_aggregation_is_reported_too(frame: pd.DataFrame) -> None:
    # DESIGN asks for breast-level aggregation by mean or max; only the configured one (mean) reached metrics.json.
    result = metrics.compute_metrics(frame)
    breasts = metrics.breast_level(frame, "max")
    assert result["auc_breast_max"] == pytest.approx(metrics.roc_auc(breasts["label"], breasts["prob"]))
    assert result["auc_breast_max"] != pytest.approx(result["auc_breast"])
    assert "auc_breast_mean" in metrics.compute_metrics(frame, breast_agg="max")


def _screening_split(n_patients: int, with_cancer: int, seed: int = 0) -> pd.DataFrame:
    """4 images per woman (L/R x CC/MLO); the left breast of the first ``with_cancer`` women is positive, and every
    positive image scores at least 0.35, so that sensitivity at 0.3 is 1.0."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n_patients):
        for j, (side, view) in enumerate((("L", "CC"), ("L", "MLO"), ("R", "CC"), ("R", "MLO"))):
            label = int(i < with_cancer and side == "L")
            prob = rng.uniform(0.35, 0.9) if label else rng.uniform(0.0, 0.6)
            rows.append(
                {"image_id": f"{i}_{j}", "patient_id": str(i), "exam_id": f"e{i}", "laterality": side, "view": view,
                 "dataset": "CSAW", "label": label, "prob": prob}
            )  # fmt: skip
    return pd.DataFrame(rows)


@pytest.mark.parametrize(
    ("n_patients", "with_cancer", "expected_low"),
    [
        (200, 4, 0.025 ** (1 / 4)),  # below the minimum of patients with cancer: the bootstrap gave 1.000 (1.000–1.000)
        (120, 12, 0.025 ** (1 / 12)),  # enough patients, but every resample gives 1.0: a zero-width percentile interval
    ],
)
def test_a_sensitivity_of_one_gets_an_exact_interval_on_patients_not_a_point(n_patients, with_cancer, expected_low):
    """A sensitivity of 1.0 from 4 women with cancer was shown as 1.000 (1.000–1.000), certainty."""
    frame = _screening_split(n_patients, with_cancer)
    result = metrics.compute_metrics(frame, bootstrap=200, seed=0)
    assert result["sensitivity@0.3"] == 1.0
    low, high = result["sensitivity@0.3_ci95"]
    # Clopper-Pearson with the women with cancer as the trials: 0.398 from 4, 0.735 from 12 (not 8 or 24 images).
    assert (low, high) == (pytest.approx(expected_low, abs=1e-9), 1.0)
    assert result["sensitivity@0.3_ci95_method"] == metrics.CLOPPER_PEARSON
    assert result["bootstrap"]["patients"] == {
        "with a positive image": with_cancer,
        "with a negative image": n_patients,
    }
    # Specificity is an ordinary proportion here: the patient bootstrap, with its width.
    assert "specificity@0.3_ci95_method" not in result
    spec_low, spec_high = result["specificity@0.3_ci95"]
    assert spec_low < result["specificity@0.3"] < spec_high
    json.dumps(result, allow_nan=False)


def test_a_specificity_of_zero_gets_an_exact_interval_too() -> None:
    frame = _screening_split(60, 15).assign(prob=lambda f: 0.31 + 0.6 * f["label"])  # every image is called
    result = metrics.compute_metrics(frame, bootstrap=100, seed=0)
    assert result["specificity@0.3"] == 0.0
    assert result["specificity@0.3_ci95"] == [0.0, pytest.approx(1 - 0.025 ** (1 / 60), abs=1e-9)]
    assert result["specificity@0.3_ci95_method"] == metrics.CLOPPER_PEARSON


def test_a_zero_width_auc_interval_is_withheld() -> None:
    """Perfectly separated classes gave auc 1.0 with auc_ci95 [1.0, 1.0]."""
    frame = _screening_split(120, 12).assign(prob=lambda f: np.where(f["label"] == 1, 0.95, f["prob"] * 0.9))
    result = metrics.compute_metrics(frame, bootstrap=200, seed=0)
    assert result["auc"] == 1.0
    assert result["auc_ci95"] is None
    assert "zero width" in result["auc_ci95_reason"]


@pytest.mark.parametrize(
    ("successes", "trials", "expected"),
    [(4, 4, [0.025**0.25, 1.0]), (0, 10, [0.0, 1 - 0.025**0.1]), (5, 10, [0.187086, 0.812914]), (0, 0, [None, None])],
)
def test_clopper_pearson(successes, trials, expected) -> None:
    assert metrics.clopper_pearson(successes, trials) == pytest.approx(expected, abs=1e-6)


# ------------------------------------------------------------------------------------ calibration intervals


def _ci_width(values: dict, name: str) -> float:
    low, high = values[f"{name}_ci95"]
    return high - low


def _patients_repeated(frame: pd.DataFrame, *, as_new_patients: bool) -> pd.DataFrame:
    """Every image twice: the copy in the same patient (as a second reading of her images would be), or in a new
    patient of its own (as independent images would be)."""
    copy = frame.assign(image_id=frame["image_id"] + "_copy")
    if as_new_patients:
        copy["patient_id"] = copy["patient_id"] + "_copy"
    return pd.concat([frame, copy], ignore_index=True)


@pytest.mark.parametrize("name", ["ece", "brier"])
def test_ece_and_brier_get_patient_bootstrap_intervals_from_the_same_draws(frame: pd.DataFrame, name: str) -> None:
    """ECE and Brier were point estimates only; their intervals come from the very patient draws of the AUC's
    (Brier's the percentile interval; ECE's the basic one, the percentiles reflected about the estimate)."""
    result = metrics.compute_metrics(frame, bootstrap=200, seed=3)
    again = metrics.compute_metrics(frame.sample(frac=1.0, random_state=2), bootstrap=200, seed=3)
    low, high = metrics.bootstrap_ci(frame, lambda f: getattr(metrics, name)(f["label"], f["prob"]), n=200, seed=3)
    expected = [max(0.0, 2 * result[name] - high), max(0.0, 2 * result[name] - low)] if name == "ece" else [low, high]
    assert result[f"{name}_ci95"] == pytest.approx(expected, abs=1e-12)
    assert again[f"{name}_ci95"] == pytest.approx(result[f"{name}_ci95"], abs=1e-12)
    assert result["bootstrap"]["skipped"][name] == 0  # defined on every resample
    if name == "ece":
        assert result["ece_ci95_method"] == "basic bootstrap (bias-corrected)"
        assert "ECE: basic bootstrap" in result["bootstrap"]["method"]
    else:
        low, high = result[f"{name}_ci95"]
        assert low < result[name] < high
        assert f"{name}_ci95_method" not in result
        for subset in result["by_dataset"].values():
            assert subset[f"{name}_ci95"][0] <= subset[name] <= subset[f"{name}_ci95"][1]
    other = metrics.compute_metrics(frame, bootstrap=200, seed=4)
    assert other[f"{name}_ci95"] != result[f"{name}_ci95"]
    assert f"{name}_ci95" not in metrics.compute_metrics(frame)  # only with bootstrap
    json.dumps(result, allow_nan=False)


@pytest.mark.parametrize("name", ["ece", "brier"])
def test_ece_and_brier_intervals_narrow_with_more_patients(name: str) -> None:
    few = metrics.compute_metrics(make_predictions(60, seed=5, datasets=("CSAW",)), bootstrap=300, seed=0)
    many = metrics.compute_metrics(make_predictions(600, seed=5, datasets=("CSAW",)), bootstrap=300, seed=0)
    assert _ci_width(many, name) < 0.6 * _ci_width(few, name)  # about 1/sqrt(10) = 0.32 expected


@pytest.mark.parametrize("name", ["ece", "brier"])
def test_ece_and_brier_intervals_count_patients_not_images(frame: pd.DataFrame, name: str) -> None:
    """Each woman's images twice over say no more about calibration than once; as many new women would."""
    once = metrics.compute_metrics(frame, bootstrap=300, seed=1)
    twice = metrics.compute_metrics(_patients_repeated(frame, as_new_patients=False), bootstrap=300, seed=1)
    independent = metrics.compute_metrics(_patients_repeated(frame, as_new_patients=True), bootstrap=300, seed=1)
    assert twice[name] == pytest.approx(once[name], abs=1e-12)
    assert twice[f"{name}_ci95"] == pytest.approx(once[f"{name}_ci95"], abs=1e-9)
    assert _ci_width(independent, name) < 0.85 * _ci_width(once, name)  # about 1/sqrt(2) = 0.71 expected


@pytest.mark.parametrize("name", ["ece", "brier"])
def test_ece_and_brier_intervals_need_patients_of_both_classes(name: str) -> None:
    frame = _screening_split(200, 4)
    result = metrics.compute_metrics(frame, bootstrap=100, seed=0)
    assert result[name] is not None and result[f"{name}_ci95"] is None
    assert result[f"{name}_ci95_reason"] == (
        "not reported: patients in this split: 4 with a positive image, too few for a bootstrap interval "
        "(at least 10 with a positive image and 10 with a negative image)"
    )
    no_cancer = metrics.compute_metrics(_screening_split(60, 0), bootstrap=100, seed=0)
    assert no_cancer[name] is not None and no_cancer[f"{name}_ci95"] is None
    assert "0 with a positive image" in no_cancer[f"{name}_ci95_reason"]
    assert metrics.compute_metrics(_screening_split(60, 15), bootstrap=100, seed=0)[f"{name}_ci95"] is not None
    empty = metrics.compute_metrics(frame.iloc[:0], bootstrap=10)
    assert empty[name] is None and empty[f"{name}_ci95"] is None and empty[f"{name}_ci95_reason"]


def test_an_ece_interval_that_collapses_to_zero_is_withheld() -> None:
    """With the probabilities equal to each bin's observed share, the estimate is 0 and every resample's ECE lies
    above it: the basic interval, 2 x 0 minus the percentiles clipped at 0, is 0-0, which would read as certainty."""
    rows = []
    for i in range(400):
        prob = (0.25, 0.75)[i % 2]
        label = int(i % 4 == 1 or (i % 4 == 3 and i % 8 != 7) or i % 8 == 0)  # 1/4 and 3/4 of the patients per bin
        for j in range(2):
            rows.append(
                {"image_id": f"{i}_{j}", "patient_id": str(i), "exam_id": f"e{i}", "laterality": "LR"[j],
                 "view": "CC", "dataset": "CSAW", "label": label, "prob": prob}
            )  # fmt: skip
    frame = pd.DataFrame(rows)
    result = metrics.compute_metrics(frame, bootstrap=200, seed=0)
    assert result["ece"] == pytest.approx(0.0, abs=1e-12)
    assert result["ece_ci95"] is None and "ece_ci95_method" not in result
    assert "collapses to 0–0" in result["ece_ci95_reason"]
    assert result["brier_ci95"][0] < result["brier"] < result["brier_ci95"][1]  # a mean: no such bias


def _calibration_split(n_patients: int, seed: int, exponent: float = 1.0) -> pd.DataFrame:
    """Each breast has a cancer risk r (Beta(0.6, 2.4), mean 0.2) and a label drawn from it, shared by its CC and
    MLO images; the model scores r ** exponent, perfectly calibrated at exponent 1 and overconfident below it. No
    ``dataset`` column, so that ``compute_metrics`` resamples the split once, not again per data set."""
    rng = np.random.default_rng(seed)
    risk = rng.beta(0.6, 2.4, size=2 * n_patients)
    label = (rng.random(risk.size) < risk).astype(int)
    breast = np.repeat(np.arange(risk.size), 2)
    patient = breast // 2
    return pd.DataFrame(
        {
            "image_id": [f"{b}_{v}" for b in range(risk.size) for v in ("CC", "MLO")],
            "patient_id": [f"p{i}" for i in patient],
            "exam_id": [f"e{i}" for i in patient],
            "laterality": np.where(breast % 2 == 0, "L", "R"),
            "view": np.tile(["CC", "MLO"], risk.size),
            "label": label[breast],
            "prob": risk[breast] ** exponent,
        }
    )


def test_ece_interval_is_bias_corrected_so_it_can_cover_a_calibrated_models_zero() -> None:
    """The percentile interval of binned ECE sat above the estimate (resamples are biased upwards as the estimate
    is), so for a calibrated model it never held the true calibration error, 0 (a reported one: ECE 0.0081
    (0.0069-0.0287)). The basic bootstrap interval subtracts that bias; for an overconfident model it still excludes
    0 and holds the population ECE."""
    runs, resamples = 10, 150
    percentile_covers = basic_covers = 0
    for seed in range(runs):
        result = metrics.compute_metrics(_calibration_split(200, seed), bootstrap=resamples, seed=seed)
        low, high = result["ece_ci95"]
        assert result["ece_ci95_method"] == "basic bootstrap (bias-corrected)"
        assert high > 0 and high < 2 * result["ece"]  # unclipped: the resamples' 2.5th percentile is 2 ECE - high
        percentile_covers += 2 * result["ece"] - high <= 0.0
        basic_covers += low == 0.0
    assert percentile_covers == 0
    assert basic_covers >= runs // 3  # 5 of 10 here, 58 of 100 with 1000 resamples: the correction is partial

    # Overconfident (r ** 0.6): the population ECE from 2 million breasts, each bin's gap its mean risk - score.
    risk = np.random.default_rng(99).beta(0.6, 2.4, size=2_000_000)
    population = metrics.ece(np.random.default_rng(98).random(risk.size) < risk, risk**0.6)
    assert population == pytest.approx(0.132, abs=0.002)
    covered = 0
    for seed in range(runs):
        result = metrics.compute_metrics(_calibration_split(200, seed, 0.6), bootstrap=resamples, seed=seed)
        low, high = result["ece_ci95"]
        assert low > 0.05  # excludes 0: this model is miscalibrated and the interval says so every time
        covered += low <= population <= high
    assert covered >= runs - 2  # 95% nominal


def test_calibration_bins_effective_count_by_patient() -> None:
    """A bin's effective count divides its images by the design effect of their patients (Kish): images of one
    woman that share her label count once, independent images count each."""
    probs = [0.05] * 8 + [0.55] * 8
    labels = [1, 1, 1, 1, 0, 0, 0, 0] + [1, 0, 1, 0, 1, 0, 1, 0]
    patients = ["a", "a", "a", "a", "b", "b", "b", "b"] + ["c", "c", "d", "d", "e", "e", "f", "f"]
    bins = metrics.calibration_bins(labels, probs, n_bins=10, patients=patients)
    low_bin, high_bin = bins.iloc[0], bins.iloc[5]
    assert (low_bin["count"], low_bin["patients"]) == (8, 2)
    # Two women, all images alike: the cluster variance with the finite-cluster factor 2/(2 - 1) is that of the mean
    # of two draws with the n - 1 denominator, s^2 / 2 = 0.25 = 0.5 * 0.5 / 1: one effective case.
    assert low_bin["effective_count"] == pytest.approx(1.0)
    assert (high_bin["count"], high_bin["patients"]) == (8, 4)
    assert high_bin["effective_count"] == pytest.approx(8.0)  # one positive in each woman's pair: no clustering
    # One image per woman: the sample variance's n - 1 denominator, so 8 independent images count as 7 (Korn &
    # Graubard's effective size for simple random sampling), never more than the images.
    independent = metrics.calibration_bins(labels, probs, n_bins=10, patients=range(16))
    filled = independent["count"].to_numpy() > 0
    assert independent["effective_count"].to_numpy()[filled] == pytest.approx(independent["count"][filled] - 1.0)
    # All alike (no variance to estimate a design effect from): each woman counts once, conservatively.
    same = metrics.calibration_bins([0] * 6, [0.1] * 6, n_bins=10, patients=["a"] * 3 + ["b"] * 3)
    assert same.iloc[1]["effective_count"] == pytest.approx(2.0)
    assert "effective_count" not in metrics.calibration_bins(labels, probs)
