"""Evaluation metrics for screening-mammography classifiers: pure functions plus a thin gatherer.

Every function takes plain arrays or a predictions frame with the columns of ``val_predictions.csv``
(``image_id, patient_id, exam_id, laterality, view, dataset, label, prob, aleatoric, epistemic``) and
does no I/O. ``compute_metrics`` assembles the ``metrics.json`` block of one split (DESIGN.md, "Outputs");
``gather_predictions`` is the only part that knows about distributed training: each rank scores its
own shard, the shards are gathered, and the metrics are computed once on the whole split.

Conventions:
    * ``prob >= threshold`` is a positive call, at every threshold.
    * A metric that is undefined on the data (AUC with one class present, sensitivity without
      positives) is ``NaN`` from the pure functions and never a made-up 0.5 or 0; in the JSON-ready
      dicts it becomes ``None`` with a ``<name>_reason`` sentence beside it.

References:
    * ROC-AUC is the Mann-Whitney U statistic with ties counted one half, which equals the
      trapezoidal area under the empirical ROC curve (scikit-learn's ``roc_auc_score``).
    * PR-AUC is average precision, ``sum_n (R_n - R_{n-1}) P_n`` over distinct thresholds, as in
      scikit-learn's ``average_precision_score`` (no trapezoidal interpolation, which is optimistic).
    * Youden's J (Youden, 1950, "Index for rating diagnostic tests", Cancer 3:32-35) picks the
      threshold maximising sensitivity + specificity - 1.
    * pF1 is the probabilistic F-beta of the RSNA Screening Mammography Breast Cancer Detection
      competition (Kaggle, 2023; the organisers' ``pfbeta`` reference code): probabilities clipped
      to [0, 1] count as fractional true and false positives, ``P = sum(p | y=1) / sum(p)``,
      ``R = sum(p | y=1) / #positives``, ``pF_beta = (1 + b^2) P R / (b^2 P + R)``.
    * ECE is the expected calibration error of Naeini, Cooper & Hauskrecht (2015, "Obtaining well
      calibrated probabilities using Bayesian binning", AAAI) with equal-width bins on the
      positive-class probability: ``sum_b |B_b|/n * |mean(y in B_b) - mean(p in B_b)|``. Binned ECE is biased
      upwards in finite samples (it is never below 0, and a calibrated model's is above 0), so its patient resamples
      sit mostly above the estimate and their percentile interval rarely holds a calibrated model's 0. Its interval
      is the basic (reverse-percentile) bootstrap one instead, ``[2 ECE - q_high, 2 ECE - q_low]`` clipped at 0
      (Davison & Hinkley, 1997, "Bootstrap Methods and their Application", sec. 5.2), which subtracts the bias the
      resamples show: an interval for the calibration error that may lie below the plug-in estimate, which stays
      the reported figure. The correction is partial (near 0 the resamples' bias understates the estimate's own):
      in simulated data sets of 200 women with 4 images each it held a calibrated model's 0 in 58 of 100, where
      the percentile interval never did, and an overconfident model's population ECE in 91 of 100 (percentile: 97).
    * A reliability bin's observed share gets a Wilson interval on an effective sample size: the bin's images
      divided by the design effect of their patients (Kish, 1965, "Survey Sampling"; the ratio estimator's
      cluster variance, with the finite-cluster factor n_c/(n_c - 1) for n_c patients, over the binomial one, at
      least 1), with the t quantile on n_c - 1 degrees of freedom in place of z, as Korn & Graubard (1998, below)
      adjust their effective sample size for the few clusters a bin may rest on.
    * Confidence intervals are percentile bootstrap intervals (Efron & Tibshirani, 1993) that
      resample patients, not images, because the images of one patient are correlated. Where that
      bootstrap cannot give an interval for a sensitivity or specificity (an observed 0 or 1, at which
      every resample gives the same value, or fewer than ``BOOTSTRAP_MIN_PATIENTS`` patients of the
      class), the interval is Clopper-Pearson's exact one (1934, Biometrika 26:404-413) with the
      patients of the class as the sample size and ``estimate x patients`` as the count (the
      effective-sample-size form of Korn & Graubard, 1998, Survey Methodology 24:193-201, with each
      patient counted once: conservative, as if a patient's images were fully correlated).
"""

from __future__ import annotations

import logging
import math
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
from scipy.stats import rankdata

logger = logging.getLogger(__name__)

PREDICTION_COLUMNS = (
    "image_id",
    "patient_id",
    "exam_id",
    "laterality",
    "view",
    "dataset",
    "label",
    "prob",
    "aleatoric",
    "epistemic",
)
BREAST_KEYS = ("patient_id", "laterality", "exam_id")
DEFAULT_THRESHOLD = 0.3  # the reference script's operating point
DEFAULT_SPECIFICITIES = (0.90, 0.987)  # 0.987: roughly the specificity of double reading in European screening
# Cancers per screening exam at which the per-exam operating points are projected (``screening_projection``). The
# prevalence counts every cancer present at a screen, the ones a reader finds and the interval cancers found within
# the follow-up window that defines a positive label (EMBED's: 180 days after a recall, 365 for interval cancers):
# BCSC's (US) cancer detection rate of 5.1 per 1,000 screens at a sensitivity of 0.87 gives about 5.9 per 1,000
# (Lehman et al., 2017, Radiology 283:49-58). European programmes are of the same order. A test split is enriched
# (the demo's exams are several times that), so its own share of positive exams would overstate the PPV.
SCREENING_PREVALENCE = 0.006
DEFAULT_REFERRAL_FRACTIONS = tuple(round(0.05 * k, 2) for k in range(11))  # defer 0%, 5%, ..., 50%
BOOTSTRAP_METRICS = ("auc", "pr_auc", "auc_breast", "ece", "brier")
CALIBRATION_BINS = 10  # equal-width bins of ECE and the reliability diagram
BOTH_CLASSES = ("positive", "negative")
# A percentile interval is reported only when at most this share of the patient resamples had one class: dropping
# more conditions the interval on resamples that happened to hold a positive, and with one or two positive patients
# it collapses to a point ([1.0, 1.0]) that reads as certainty.
BOOTSTRAP_MAX_SKIPPED = 0.05
# Nor from fewer patients than this in each class the metric needs (patients with a positive image for sensitivity,
# with a negative image for specificity, both for the AUCs), counted separately: a sensitivity depends only on which
# positive patients are drawn, and resampling 3 of them has 10 distinct outcomes, whose percentiles can come out as a
# point ([0.5, 0.5]; [1.0, 1.0] from 4 women with cancer among 200) however uncertain the figure is.
BOOTSTRAP_MIN_PATIENTS = 10
CLOPPER_PEARSON = "clopper-pearson (patients)"
# ECE's interval (``ece_ci95_method``): the basic bootstrap's, which subtracts the bias its resamples show.
BASIC_BOOTSTRAP = "basic bootstrap (bias-corrected)"


# --------------------------------------------------------------------------------------------- helpers


def labels_and_scores(labels: Any, scores: Any) -> tuple[np.ndarray, np.ndarray]:
    """Check labels and scores the way every metric here does, and return them as arrays.

    Returns:
        Labels as a bool array and scores as float64.

    Raises:
        ValueError: Lengths differ, a label is not 0/1, or a score is NaN or infinite (a broken
            model, not an undefined metric).
    """
    y = np.asarray(labels, dtype=float).ravel()
    s = np.asarray(scores, dtype=float).ravel()
    if y.shape != s.shape:
        raise ValueError(f"labels and scores differ in length: {y.size} != {s.size}")
    bad = ~np.isin(y, (0.0, 1.0))
    if bad.any():
        raise ValueError(f"labels must be 0 or 1; found {int(bad.sum())} other values, e.g. {y[bad][:3].tolist()}")
    nonfinite = ~np.isfinite(s)
    if nonfinite.any():
        raise ValueError(f"{int(nonfinite.sum())} of {s.size} scores are NaN or infinite")
    return y == 1.0, s


def _probabilities(labels: Any, probs: Any) -> tuple[np.ndarray, np.ndarray]:
    y, p = labels_and_scores(labels, probs)
    if p.size and (p.min() < 0.0 or p.max() > 1.0):
        raise ValueError(f"probabilities must lie in [0, 1]; got range [{p.min():.4g}, {p.max():.4g}]")
    return y, p


def _distinct_threshold_counts(y: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Thresholds (distinct scores, descending) with true and false positive counts at ``s >= t``."""
    order = np.argsort(-s, kind="mergesort")
    s_sorted, y_sorted = s[order], y[order]
    last_of_run = np.r_[np.flatnonzero(np.diff(s_sorted)), s.size - 1]
    tps = np.cumsum(y_sorted)[last_of_run]
    fps = last_of_run + 1 - tps
    return s_sorted[last_of_run], tps, fps


def _auc_unchecked(y: np.ndarray, s: np.ndarray) -> float:
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    ranks = rankdata(s)  # average ranks: a tied positive/negative pair counts one half
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def _average_precision_unchecked(y: np.ndarray, s: np.ndarray) -> float:
    n_pos = int(y.sum())
    if n_pos == 0:
        return math.nan
    _, tps, fps = _distinct_threshold_counts(y, s)
    precision = tps / (tps + fps)
    recall = tps / n_pos
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def _spec_key(specificity: float) -> str:
    """``0.9`` -> ``"0.90"``, ``0.987`` -> ``"0.987"``: at least two decimals, no trailing noise."""
    whole, _, frac = f"{specificity:.4f}".rstrip("0").partition(".")
    return f"{whole}.{frac.ljust(2, '0')}"


def threshold_key(threshold: float) -> str:
    """A fixed threshold's name in the metric keys: ``0.3`` -> ``"0.3"`` (``sensitivity@0.3``)."""
    return f"{threshold:g}"


def _clean(value: Any) -> float | None:
    """A JSON-ready number: Python float, or None for NaN/inf."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _put(out: dict[str, Any], key: str, value: float, reason: str | None) -> None:
    """Store ``value`` under ``key``; an undefined value becomes None with ``<key>_reason`` beside it."""
    cleaned = _clean(value)
    out[key] = cleaned
    if cleaned is None:
        out[f"{key}_reason"] = reason or "undefined on this data"


def _reason(n: int, n_pos: int, *, need_pos: bool, need_neg: bool, unit: str, what: str, scope: str) -> str | None:
    """The sentence explaining why a metric needing positives and/or negatives is undefined."""
    if n == 0:
        return f"undefined: no {unit} in {scope}"
    if need_pos and n_pos == 0:
        return f"undefined: no positive {what} in {scope} (n_{unit}={n})"
    if need_neg and n_pos == n:
        return f"undefined: no negative {what} in {scope} (n_{unit}={n})"
    return None


def _require_columns(frame: pd.DataFrame, columns: Sequence[str]) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ValueError(f"predictions frame lacks columns {missing}; it has {list(frame.columns)}")


# ---------------------------------------------------------------------------------------- pure metrics


def roc_auc(labels: Any, scores: Any) -> float:
    """Area under the ROC curve.

    Args:
        labels: 0/1 ground truth.
        scores: Real-valued scores; higher means more likely positive.

    Returns:
        The AUC, or NaN when only one class (or nothing) is present. Never 0.5 by default and never
        an exception for a one-class split.
    """
    y, s = labels_and_scores(labels, scores)
    return _auc_unchecked(y, s)


def pr_auc(labels: Any, scores: Any) -> float:
    """Average precision (area under the precision-recall curve, step-wise).

    Returns:
        Average precision, NaN when there are no positives. With positives only it is 1.0.
    """
    y, s = labels_and_scores(labels, scores)
    return _average_precision_unchecked(y, s)


def sens_spec_at(labels: Any, scores: Any, threshold: float) -> tuple[float, float]:
    """Sensitivity and specificity when ``score >= threshold`` is called positive.

    Returns:
        ``(sensitivity, specificity)``; sensitivity is NaN without positives, specificity NaN
        without negatives.
    """
    y, s = labels_and_scores(labels, scores)
    called = s >= threshold
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    sensitivity = float(called[y].sum() / n_pos) if n_pos else math.nan
    specificity = float((~called[~y]).sum() / n_neg) if n_neg else math.nan
    return sensitivity, specificity


def youden_threshold(labels: Any, scores: Any) -> float:
    """Threshold maximising Youden's J = sensitivity + specificity - 1 (Youden, 1950).

    The candidates are the distinct observed scores. Among tied maxima the highest threshold wins,
    the more specific choice, which matters in screening where recalls are costly.

    Returns:
        The threshold, or NaN when one class is absent.
    """
    y, s = labels_and_scores(labels, scores)
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    thresholds, tps, fps = _distinct_threshold_counts(y, s)
    # J * n_pos * n_neg in integers: as fractions, two exactly tied J can round apart (1/2 - 2/10 < 1 - 7/10 in
    # floating point), and the lower, less specific threshold then won the tie.
    scaled_j = tps.astype(np.int64) * n_neg - fps.astype(np.int64) * n_pos
    return float(thresholds[int(np.argmax(scaled_j))])  # argmax returns the first, i.e. highest, threshold


def threshold_at_specificity(labels: Any, scores: Any, specificity: float) -> float:
    """Smallest threshold whose specificity is at least ``specificity``.

    The smallest such threshold gives the highest sensitivity at that specificity. Candidates are the
    distinct observed scores; when no observed score reaches the target (e.g. a target of 1.0 with a
    negative holding the top score), the next float above the maximum score is returned.

    Returns:
        The threshold, or NaN when there are no negatives.
    """
    if not 0.0 <= specificity <= 1.0:
        raise ValueError(f"specificity must lie in [0, 1], got {specificity}")
    y, s = labels_and_scores(labels, scores)
    negatives = np.sort(s[~y])
    if negatives.size == 0:
        return math.nan
    candidates = np.unique(s)
    # Specificity at t is the share of negatives strictly below t; it never decreases with t.
    spec = np.searchsorted(negatives, candidates, side="left") / negatives.size
    reached = spec >= specificity - 1e-12  # tolerance: 987/1000 must count as 0.987
    if reached.any():
        return float(candidates[int(np.argmax(reached))])
    return float(np.nextafter(candidates[-1], np.inf))


def breast_level(frame: pd.DataFrame, agg: str = "mean") -> pd.DataFrame:
    """Aggregate image predictions to one row per breast (patient x laterality x exam, within a data set).

    ``dataset`` is part of the key when the frame has it: importers allow the same patient id in two data sets
    (RSNA and ``generic`` ids are small integers), and those are two women. An image whose laterality is not L or R
    is a unit of its own: its side is unknown, so pooling it with the exam's other unknown-side images could mix
    both breasts.

    Args:
        frame: Predictions frame.
        agg: ``"mean"`` or ``"max"`` over the breast's images for ``prob``. The label is always the
            maximum: a breast is positive if any of its images is.

    Returns:
        Columns ``patient_id, laterality, exam_id, label, prob, n_images`` and ``dataset`` when present.
    """
    if agg not in ("mean", "max"):
        raise ValueError(f"agg must be 'mean' or 'max', got {agg!r}")
    _require_columns(frame, (*BREAST_KEYS, "label", "prob"))
    side = frame["laterality"].astype(str)
    known = side.isin(["L", "R"])
    row = frame["image_id"].astype(str) if "image_id" in frame.columns else pd.Series(frame.index, index=frame.index)
    unit = side.where(known, "U\x1f" + row.astype(str))
    keys = ["patient_id", "_unit", "exam_id", *(["dataset"] if "dataset" in frame.columns else [])]
    # dropna=False: a missing exam_id still forms a group rather than silently vanishing.
    grouped = frame.assign(_unit=unit).groupby(keys, sort=True, dropna=False)
    out = grouped.agg(label=("label", "max"), prob=("prob", agg), n_images=("prob", "size")).reset_index()
    out["laterality"] = out.pop("_unit").str.slice(0, 1)
    columns = ["patient_id", "laterality", "exam_id", "label", "prob", "n_images"]
    return out[columns + (["dataset"] if "dataset" in out.columns else [])]


def exam_level(frame: pd.DataFrame) -> pd.DataFrame:
    """Aggregate image predictions to one row per exam (patient x exam, within a data set), as a recall is decided.

    An exam is positive if any of its images is, and it is scored by its highest image probability, so that
    ``prob >= threshold`` calls it (a recall) exactly when any of its images reaches the threshold.

    Returns:
        Columns ``patient_id, exam_id, label, prob, n_images`` and ``dataset`` when present.
    """
    _require_columns(frame, ("patient_id", "exam_id", "label", "prob"))
    keys = ["patient_id", "exam_id", *(["dataset"] if "dataset" in frame.columns else [])]
    # dropna=False: a missing exam_id still forms a group (the patient's images without an exam) rather than vanishing.
    grouped = frame.groupby(keys, sort=True, dropna=False)
    out = grouped.agg(label=("label", "max"), prob=("prob", "max"), n_images=("prob", "size")).reset_index()
    return out[["patient_id", "exam_id", "label", "prob", "n_images", *keys[2:]]]


def patient_key(frame: pd.DataFrame) -> pd.Series:
    """The patient a row belongs to: ``patient_id``, within its ``dataset`` when the frame has one (see
    :func:`breast_level`). The bootstrap resamples these."""
    patient = frame["patient_id"].astype(object).fillna("").astype(str)
    if "dataset" not in frame.columns:
        return patient
    # A blank dataset cell reads back from a CSV as NaN, which pandas keeps through astype(str) and factorize
    # codes as -1: the same patient key as "", not a crash of the bootstrap.
    return frame["dataset"].astype(object).fillna("").astype(str) + "\x1f" + patient


def pf1(labels: Any, probs: Any, beta: float = 1.0) -> float:
    """Probabilistic F-beta of the RSNA screening mammography competition.

    Probabilities are clipped to [0, 1] as in the competition's reference code.

    Returns:
        pF-beta; NaN without positives (recall is undefined); 0.0 when the positives all score 0.
    """
    y, p = labels_and_scores(labels, probs)
    p = np.clip(p, 0.0, 1.0)
    n_pos = int(y.sum())
    if n_pos == 0:
        return math.nan
    soft_tp = float(p[y].sum())
    soft_fp = float(p[~y].sum())
    if soft_tp == 0.0:
        return 0.0  # recall is 0, as the reference code returns
    precision = soft_tp / (soft_tp + soft_fp)
    recall = soft_tp / n_pos
    beta_sq = beta * beta
    return float((1.0 + beta_sq) * precision * recall / (beta_sq * precision + recall))


def _bin_index(p: np.ndarray, n_bins: int) -> np.ndarray:
    """Bin k holds ``k/n_bins <= p < (k+1)/n_bins``; the last bin also holds p = 1."""
    return np.minimum(np.floor(p * n_bins).astype(int), n_bins - 1)


def calibration_bins(labels: Any, probs: Any, n_bins: int = CALIBRATION_BINS, patients: Any = None) -> pd.DataFrame:
    """Equal-width reliability bins on [0, 1], as used by ``ece`` and the reliability plot.

    Bin k holds ``k/n_bins <= p < (k+1)/n_bins``; the last bin also holds p = 1.

    Args:
        labels: 0/1 ground truth.
        probs: Probabilities in [0, 1].
        n_bins: Number of bins.
        patients: The patient of each image (:func:`patient_key`); with it, each bin also gets ``patients`` and
            ``effective_count``: its images divided by their design effect, the variance of the bin's share with
            each patient's images as a cluster (times n_c/(n_c - 1) for its n_c patients, the finite-cluster
            correction) over the binomial variance (at least 1, so never more than the images). Images that share
            their patient's label count about once per patient, independent ones once each. A bin whose images are
            all positive or all negative, or that rests on one patient, has no variance to estimate it from, and
            counts each patient once (conservative, as if her images were fully correlated); an interval on it
            should use n_c - 1 degrees of freedom (Korn & Graubard, 1998), so none from one patient.

    Returns:
        One row per bin: ``bin_lower, bin_upper, count, mean_prob, fraction_positive`` (NaN when empty), and with
        ``patients`` the columns ``patients, effective_count``.
    """
    if n_bins < 1:
        raise ValueError(f"n_bins must be positive, got {n_bins}")
    y, p = _probabilities(labels, probs)
    index = _bin_index(p, n_bins)
    count = np.bincount(index, minlength=n_bins)
    prob_sum = np.bincount(index, weights=p, minlength=n_bins)
    pos_sum = np.bincount(index, weights=y.astype(float), minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_prob = np.where(count > 0, prob_sum / count, np.nan)
        fraction_positive = np.where(count > 0, pos_sum / count, np.nan)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    bins = pd.DataFrame(
        {
            "bin_lower": edges[:-1],
            "bin_upper": edges[1:],
            "count": count,
            "mean_prob": mean_prob,
            "fraction_positive": fraction_positive,
        }
    )
    if patients is not None:
        bins["patients"], bins["effective_count"] = _effective_bin_counts(index, y, patients, count, pos_sum, n_bins)
    return bins


def _effective_bin_counts(
    index: np.ndarray, y: np.ndarray, patients: Any, count: np.ndarray, pos_sum: np.ndarray, n_bins: int
) -> tuple[np.ndarray, np.ndarray]:
    """Patients per bin, and the bin's images over their design effect (see :func:`calibration_bins`)."""
    codes, _ = pd.factorize(pd.Series(np.asarray(list(patients), dtype=object)).astype(str), sort=True)
    if codes.size != index.size:
        raise ValueError(f"patients has {codes.size} values for {index.size} images")
    if codes.size == 0:
        return np.zeros(n_bins, dtype=int), np.zeros(n_bins)
    # One row per (bin, patient) pair: her images in the bin (m) and her positives among them (k).
    pairs, pair_of_image = np.unique(index.astype(np.int64) * (codes.max() + 1) + codes, return_inverse=True)
    pair_bin = pairs // (codes.max() + 1)
    m = np.bincount(pair_of_image, minlength=pairs.size)
    k = np.bincount(pair_of_image, weights=y.astype(float), minlength=pairs.size)
    patients_per_bin = np.bincount(pair_bin, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        share = np.where(count > 0, pos_sum / count, 0.0)
        # Ratio estimator's cluster variance n^2 Var = n_c/(n_c - 1) sum_i (k_i - r m_i)^2 over n_c patients, over
        # the binomial n^2 Var = n r (1-r). Without the factor, a bin of 3 patients had its variance understated by
        # a third; with one patient the residuals are 0 by construction, which read as no clustering at all.
        finite_clusters = np.where(patients_per_bin > 1, patients_per_bin / np.maximum(patients_per_bin - 1, 1), 0.0)
        residuals = np.bincount(pair_bin, weights=(k - share[pair_bin] * m) ** 2, minlength=n_bins)
        cluster = finite_clusters * residuals
        binomial = count * share * (1.0 - share)
        estimable = (binomial > 0) & (patients_per_bin > 1)
        design_effect = np.maximum(np.where(estimable, cluster / np.where(estimable, binomial, 1.0), 1.0), 1.0)
        effective = np.where(estimable, count / design_effect, patients_per_bin)
    return patients_per_bin, effective.astype(float)


def ece(labels: Any, probs: Any, n_bins: int = CALIBRATION_BINS) -> float:
    """Expected calibration error with equal-width bins (Naeini et al., 2015).

    Returns:
        ECE in [0, 1], NaN for empty input. Defined with one class present.
    """
    bins = calibration_bins(labels, probs, n_bins)
    total = int(bins["count"].sum())
    if total == 0:
        return math.nan
    filled = bins[bins["count"] > 0]
    gaps = (filled["fraction_positive"] - filled["mean_prob"]).abs()
    return float((filled["count"] / total * gaps).sum())


def brier(labels: Any, probs: Any) -> float:
    """Brier score, the mean squared difference between probability and label; NaN for empty input."""
    y, p = _probabilities(labels, probs)
    if y.size == 0:
        return math.nan
    return float(np.mean((p - y) ** 2))


def referral_curve(
    labels: Any, probs: Any, uncertainty: Any, fractions: Sequence[float] = DEFAULT_REFERRAL_FRACTIONS
) -> pd.DataFrame:
    """AUC of the cases that remain after deferring the most uncertain fraction to a human reader.

    Deferred counts are ``round(fraction * n)``; ties in uncertainty keep the input order.

    Args:
        labels: 0/1 ground truth.
        probs: Predicted probabilities.
        uncertainty: One finite uncertainty per case; larger means less certain.
        fractions: Fractions to defer, each in [0, 1].

    Returns:
        Columns ``fraction, n_deferred, n_retained, n_positive_retained, auc`` (NaN when the retained
        cases hold one class).
    """
    y, s = labels_and_scores(labels, probs)
    u = np.asarray(uncertainty, dtype=float).ravel()
    if u.shape != y.shape:
        raise ValueError(f"uncertainty has {u.size} values for {y.size} cases")
    if not np.isfinite(u).all():
        raise ValueError(f"{int((~np.isfinite(u)).sum())} uncertainty values are NaN or infinite")
    order = np.argsort(-u, kind="stable")  # most uncertain first
    rows = []
    for fraction in fractions:
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"referral fractions must lie in [0, 1], got {fraction}")
        n_deferred = min(y.size, math.floor(fraction * y.size + 0.5))
        kept = order[n_deferred:]
        rows.append(
            {
                "fraction": float(fraction),
                "n_deferred": n_deferred,
                "n_retained": int(kept.size),
                "n_positive_retained": int(y[kept].sum()),
                "auc": _auc_unchecked(y[kept], s[kept]),
            }
        )
    return pd.DataFrame(rows, columns=["fraction", "n_deferred", "n_retained", "n_positive_retained", "auc"])


# ----------------------------------------------------------------------------------------- bootstrap


class _PatientClusters:
    """Row indices of each patient, to draw patients with replacement and expand them to rows.

    Patients are ordered by their id as text, so a given seed draws the same patients whatever the
    row order of the frame.
    """

    def __init__(self, patient_ids: Any) -> None:
        codes, uniques = pd.factorize(pd.Series(np.asarray(patient_ids, dtype=object)).astype(str), sort=True)
        self.patients = np.asarray(uniques)
        self.rows_by_patient = np.argsort(codes, kind="stable")
        self.counts = np.bincount(codes, minlength=len(uniques))
        self.starts = np.r_[0, np.cumsum(self.counts)[:-1]]

    def expand(self, drawn: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Rows of the drawn patients, and for each row the draw it belongs to (its new cluster id)."""
        lengths = self.counts[drawn]
        draw_of_row = np.repeat(np.arange(drawn.size), lengths)
        offset_in_patient = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        rows = self.rows_by_patient[np.repeat(self.starts[drawn], lengths) + offset_in_patient]
        return rows, draw_of_row


def _patient_draws(n_patients: int, n: int, seed: int) -> Iterator[np.ndarray]:
    rng = np.random.default_rng(seed)
    for _ in range(n):
        yield rng.integers(0, n_patients, size=n_patients)


def _percentile_interval(values: Sequence[float], level: float) -> list[float | None]:
    if len(values) < 2:
        return [None, None]
    tail = 100.0 * (1.0 - level) / 2.0
    low, high = np.percentile(np.asarray(values, dtype=float), [tail, 100.0 - tail])
    return [float(low), float(high)]


def screening_projection(sensitivity: float, specificity: float, prevalence: float) -> dict[str, float]:
    """What an operating point would do in a screening population of ``prevalence`` cancers per exam (Bayes' rule).

    Sensitivity (on exams with cancer) and specificity (on exams without) do not depend on how a split was enriched;
    the share of exams recalled and the positive predictive value of a recall do, so they are projected rather
    than read off the split:

    * recall rate ``= se·π + (1 − sp)(1 − π)``, the abnormal interpretation rate of a screening audit;
    * cancer detection rate ``= se·π`` (reported per 1,000 exams);
    * PPV1 ``= se·π / recall rate``, the positive predictive value of a recall (ACR BI-RADS Atlas, follow-up and
      outcome monitoring: PPV1 of an abnormal screening interpretation).

    This assumes the split's exams resemble the screening population's in everything but prevalence (the same mix of
    cancer types and of hard negatives); an enriched set often holds more conspicuous cancers than screening finds.

    Returns:
        ``recall_rate``, ``cancer_detection_per_1000`` and ``ppv1``; NaN where an input is NaN, and PPV1 NaN when
        nothing would be recalled.
    """
    if not 0.0 < prevalence < 1.0:
        raise ValueError(f"prevalence must lie strictly between 0 and 1, got {prevalence}")
    detected = sensitivity * prevalence
    recalled = detected + (1.0 - specificity) * (1.0 - prevalence)
    with np.errstate(invalid="ignore", divide="ignore"):
        ppv = detected / recalled if recalled > 0 else math.nan
    return {"recall_rate": recalled, "cancer_detection_per_1000": 1000.0 * detected, "ppv1": float(ppv)}


def clopper_pearson(successes: float, trials: int, level: float = 0.95) -> list[float | None]:
    """Clopper-Pearson exact interval for a proportion; ``successes`` may be fractional (an effective count).

    Returns:
        ``[low, high]``; ``[None, None]`` without trials.
    """
    from scipy.stats import beta

    if trials <= 0:
        return [None, None]
    successes = min(max(float(successes), 0.0), float(trials))
    tail = (1.0 - level) / 2.0
    low = 0.0 if successes <= 0.0 else float(beta.ppf(tail, successes, trials - successes + 1.0))
    high = 1.0 if successes >= trials else float(beta.ppf(1.0 - tail, successes + 1.0, trials - successes))
    return [low, high]


def _check_bootstrap_args(n: int, level: float) -> None:
    if n < 1:
        raise ValueError(f"number of bootstrap resamples must be positive, got {n}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"confidence level must lie in (0, 1), got {level}")


def bootstrap_ci(
    frame: pd.DataFrame,
    metric_fn: Callable[[pd.DataFrame], float],
    n: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> list[float | None]:
    """Percentile bootstrap confidence interval that resamples patients (clusters), not images.

    Each resample draws as many patients as the frame holds, with replacement, and keeps all images
    of every drawn patient together. A patient drawn twice appears twice with two distinct
    ``patient_id`` values (the draw number), so breast-level aggregation inside ``metric_fn`` counts
    the copies as separate breasts. Resamples on which ``metric_fn`` is undefined (NaN or None, e.g.
    AUC with one class) are skipped; how many is logged.

    Args:
        frame: Predictions frame with a ``patient_id`` column.
        metric_fn: Maps a resampled frame to a number.
        n: Number of resamples.
        seed: Seed of the patient draws; the same seed gives the same interval.
        level: Coverage of the interval.

    Returns:
        ``[low, high]``, or ``[None, None]`` when fewer than two resamples gave a defined value.
    """
    _check_bootstrap_args(n, level)
    _require_columns(frame, ("patient_id",))
    if len(frame) == 0:
        return [None, None]
    clusters = _PatientClusters(patient_key(frame))
    values: list[float] = []
    for drawn in _patient_draws(clusters.patients.size, n, seed):
        rows, draw_of_row = clusters.expand(drawn)
        resample = frame.iloc[rows].reset_index(drop=True)
        resample["patient_id"] = draw_of_row
        value = metric_fn(resample)
        if value is not None and math.isfinite(float(value)):
            values.append(float(value))
    if len(values) < n:
        logger.info(
            "bootstrap: %d of %d patient resamples gave an undefined metric and were skipped", n - len(values), n
        )
    return _percentile_interval(values, level)


def fixed_thresholds(threshold: float = DEFAULT_THRESHOLD) -> tuple[float, ...]:
    """The fixed thresholds a split is scored at: the reference's 0.3, whose names (``sensitivity@0.3``) readers of
    metrics.json rely on, and the decision threshold (a bundle's ``train.threshold``) when that is another."""
    if threshold_key(threshold) == threshold_key(DEFAULT_THRESHOLD):
        return (DEFAULT_THRESHOLD,)
    return (DEFAULT_THRESHOLD, float(threshold))


# What each bootstrapped operating point gets an interval for beyond its image sensitivity and specificity: the
# per-exam figures and their screening projection (``screening_projection``'s keys).
EXAM_POINT_METRICS = ("sensitivity_exam", "specificity_exam")
SCREENING_POINT_METRICS = ("recall_rate_screening", "cancer_detection_per_1000_screening", "ppv1_screening")


def _bootstrap_names(points: Mapping[str, float]) -> tuple[str, ...]:
    """The metrics a split's bootstrap gives intervals for: the AUCs, and at each of ``points`` (name → threshold;
    the names are those of the metrics, ``sensitivity@0.3``, ``sensitivity@youden``) sensitivity and specificity per
    image and per exam and the exam figures' screening projection."""
    per_point = ("sensitivity", "specificity", *EXAM_POINT_METRICS, *SCREENING_POINT_METRICS)
    return (*BOOTSTRAP_METRICS, *(f"{what}@{key}" for key in points for what in per_point))


def _bootstrap_points(threshold: float, cuts: Mapping[str, float | None] | None) -> dict[str, float]:
    """The thresholds whose sensitivity and specificity get intervals: the fixed ones, and the operating points a
    split is given (the validation's, on test). Points fitted on the split itself get none: their interval would
    have to re-fit the threshold in every resample."""
    points = {threshold_key(t): float(t) for t in fixed_thresholds(threshold)}
    for name, cut in (cuts or {}).items():
        if cut is not None and math.isfinite(float(cut)):
            points[name] = float(cut)
    return points


def _bootstrap_split(
    frame: pd.DataFrame,
    breasts: pd.DataFrame,
    n: int,
    seed: int,
    level: float,
    points: Mapping[str, float] | None = None,
    exams: pd.DataFrame | None = None,
    screening_prevalence: float = SCREENING_PREVALENCE,
) -> tuple[dict[str, list[float | None]], dict[str, int]]:
    """Intervals for AUC, PR-AUC, breast AUC, ECE, Brier, and at each of ``points`` (name → threshold; default the
    reference's 0.3) sensitivity and specificity per image and, with ``exams`` (:func:`exam_level`), per exam and
    projected to ``screening_prevalence``, from one shared set of patient draws.

    Same draws and same skip rule as ``bootstrap_ci``, without building a frame per resample:
    breast and exam rows are resampled with their patient, which equals aggregating the resampled images.
    """
    y_img, s_img = _probabilities(frame["label"], frame["prob"])
    # ECE from per-bin sums: sum_b |B_b|/n |positives_b/|B_b| - probs_b/|B_b|| = sum_b |positives_b - probs_b| / n.
    bin_of_image = _bin_index(s_img, CALIBRATION_BINS)
    squared_error = (s_img - y_img) ** 2
    y_br, s_br = labels_and_scores(breasts["label"], breasts["prob"])
    points = {threshold_key(DEFAULT_THRESHOLD): DEFAULT_THRESHOLD} if points is None else points
    called = {name: s_img >= t for name, t in points.items()}
    image_clusters = _PatientClusters(patient_key(frame))
    breast_clusters = _PatientClusters(patient_key(breasts))
    assert image_clusters.patients.size == breast_clusters.patients.size  # every patient has a breast row
    if exams is not None:
        y_ex, s_ex = labels_and_scores(exams["label"], exams["prob"])
        exam_clusters = _PatientClusters(patient_key(exams))
        assert image_clusters.patients.size == exam_clusters.patients.size  # every patient has an exam row
    values: dict[str, list[float]] = {name: [] for name in _bootstrap_names(points)}
    for drawn in _patient_draws(image_clusters.patients.size, n, seed):
        rows, _ = image_clusters.expand(drawn)
        breast_rows, _ = breast_clusters.expand(drawn)
        exam_rows = exam_clusters.expand(drawn)[0] if exams is not None else None
        y = y_img[rows]
        n_pos = int(y.sum())
        sample = {
            "auc": _auc_unchecked(y, s_img[rows]),
            "pr_auc": _average_precision_unchecked(y, s_img[rows]),
            "auc_breast": _auc_unchecked(y_br[breast_rows], s_br[breast_rows]),
            "brier": float(squared_error[rows].mean()),
        }
        bins = bin_of_image[rows]
        positives = np.bincount(bins, weights=y.astype(float), minlength=CALIBRATION_BINS)
        probabilities = np.bincount(bins, weights=s_img[rows], minlength=CALIBRATION_BINS)
        sample["ece"] = float(np.abs(positives - probabilities).sum() / rows.size)
        for key, calls in called.items():
            hit = calls[rows]
            sample[f"sensitivity@{key}"] = float(hit[y].sum() / n_pos) if n_pos else math.nan
            sample[f"specificity@{key}"] = float((~hit[~y]).sum() / (y.size - n_pos)) if y.size > n_pos else math.nan
            if exam_rows is not None:
                se, sp = sens_spec_at(y_ex[exam_rows], s_ex[exam_rows], points[key])
                sample[f"sensitivity_exam@{key}"], sample[f"specificity_exam@{key}"] = se, sp
                for what, value in screening_projection(se, sp, screening_prevalence).items():
                    sample[f"{what}_screening@{key}"] = value
        for name, value in sample.items():
            if math.isfinite(value):
                values[name].append(value)
    intervals = {name: _percentile_interval(vals, level) for name, vals in values.items()}
    skipped = {name: n - len(vals) for name, vals in values.items()}
    return intervals, skipped


# ------------------------------------------------------------------------------------ split metrics


def _split_metrics(
    frame: pd.DataFrame,
    *,
    threshold: float,
    breast_agg: str,
    specificities: Sequence[float],
    scope: str,
    bootstrap: int = 0,
    seed: int = 0,
    level: float = 0.95,
    cuts: dict[str, float] | None = None,
    cuts_from_another_split: bool = True,
    screening_prevalence: float = SCREENING_PREVALENCE,
) -> dict[str, Any]:
    _require_columns(frame, (*BREAST_KEYS, "label", "prob"))
    y, s = labels_and_scores(frame["label"], frame["prob"])
    n, n_pos = int(y.size), int(y.sum())
    breasts = breast_level(frame, breast_agg)
    y_br, s_br = labels_and_scores(breasts["label"], breasts["prob"])
    n_br, n_pos_br = int(y_br.size), int(y_br.sum())
    exams = exam_level(frame)
    y_ex, s_ex = labels_and_scores(exams["label"], exams["prob"])
    n_ex, n_pos_ex = int(y_ex.size), int(y_ex.sum())

    def why(need_pos: bool, need_neg: bool, breast: bool = False, exam: bool = False) -> str | None:
        if breast:
            return _reason(
                n_br, n_pos_br, need_pos=need_pos, need_neg=need_neg, unit="breasts", what="breasts", scope=scope
            )
        if exam:
            return _reason(
                n_ex, n_pos_ex, need_pos=need_pos, need_neg=need_neg, unit="exams", what="exams", scope=scope
            )
        return _reason(n, n_pos, need_pos=need_pos, need_neg=need_neg, unit="images", what="cases", scope=scope)

    def put_exam(name: str, cut: float, cut_reason: str | None = None) -> None:
        """Sensitivity and specificity per exam at ``cut`` (recalled when any image reaches it), and what they would
        do at the screening prevalence (:func:`screening_projection`)."""
        sens, spec = sens_spec_at(y_ex, s_ex, cut) if math.isfinite(cut) else (math.nan, math.nan)
        _put(out, f"sensitivity_exam@{name}", sens, why(True, False, exam=True) if math.isfinite(cut) else cut_reason)
        _put(out, f"specificity_exam@{name}", spec, why(False, True, exam=True) if math.isfinite(cut) else cut_reason)
        projected = screening_projection(sens, spec, screening_prevalence)
        reason = why(True, True, exam=True) if math.isfinite(cut) else cut_reason
        for key, value in projected.items():
            if key == "ppv1" and math.isfinite(sens) and math.isfinite(spec) and not math.isfinite(value):
                _put(out, f"{key}_screening@{name}", value, "no exam would be recalled at this threshold")
            else:
                _put(out, f"{key}_screening@{name}", value, reason)
        if name not in points:  # a point fitted on this split: an interval would have to re-fit it in each resample
            return
        # Per exam a woman counts for a class when she has an exam of it (her other breast does not make a negative).
        exam_sens, exam_spec = f"sensitivity_exam@{name}", f"specificity_exam@{name}"
        put_ci(exam_sens, math.isfinite(sens), why(True, False, exam=True), ("positive",), exam_patients)
        put_ci(exam_spec, math.isfinite(spec), why(False, True, exam=True), ("negative",), exam_patients)
        for key in SCREENING_POINT_METRICS:
            metric = f"{key}@{name}"
            put_ci(metric, out[metric] is not None, out.get(f"{metric}_reason"), BOTH_CLASSES, exam_patients)

    intervals: dict[str, list[float | None]] = {}
    skipped: dict[str, int] = {}
    # Given operating points get intervals only when another split chose them (the validation's, on test): a point
    # fitted on these labels (a data set of the validation split, at the whole split's points) would need re-fitting.
    points = _bootstrap_points(threshold, cuts if cuts_from_another_split else None)
    if bootstrap:
        _check_bootstrap_args(bootstrap, level)
        if n:
            intervals, skipped = _bootstrap_split(
                frame, breasts, bootstrap, seed, level, points, exams=exams, screening_prevalence=screening_prevalence
            )

    out: dict[str, Any] = {}

    patients = patient_key(frame) if bootstrap else None
    class_patients_by_image = class_patients = {
        "positive": int(patients[y].nunique()) if bootstrap else 0,
        "negative": int(patients[~y].nunique()) if bootstrap else 0,
    }
    exam_keys = patient_key(exams) if bootstrap else None
    exam_patients = {
        "positive": int(exam_keys[y_ex].nunique()) if bootstrap else 0,
        "negative": int(exam_keys[~y_ex].nunique()) if bootstrap else 0,
    }

    def put_ci(
        name: str,
        point_defined: bool,
        point_reason: str | None,
        classes: Sequence[str],
        counts: Mapping[str, int] | None = None,
    ) -> None:
        """The interval of ``name``, which needs patients of ``classes``; withheld, or for a proportion (one class)
        Clopper-Pearson's on patients, where the percentile bootstrap would give a point or too few outcomes.
        ``counts``: patients per class where they are not counted by image (per exam)."""
        if not bootstrap:
            return
        class_patients = counts or class_patients_by_image
        unit = "image" if counts is None else "exam"
        key = f"{name}_ci95"
        interval = intervals.get(name, [None, None])
        few = [c for c in classes if class_patients[c] < BOOTSTRAP_MIN_PATIENTS]
        degenerate = interval[0] is not None and not interval[1] > interval[0]
        if point_defined and len(classes) == 1 and (few or degenerate):
            # A proportion: each patient of the class counted once, the estimate times their number as the count.
            trials = class_patients[classes[0]]
            out[key] = clopper_pearson(float(out[name]) * trials, trials, level)
            out[f"{key}_method"] = CLOPPER_PEARSON
        elif not point_defined:
            out[key] = None
            out[f"{key}_reason"] = point_reason or "undefined on this data"
        elif few:
            have = " and ".join(f"{class_patients[c]} with a {c} {unit}" for c in few)
            needed = " and ".join(f"{BOOTSTRAP_MIN_PATIENTS} with a {c} {unit}" for c in classes)
            out[key] = None
            out[f"{key}_reason"] = (
                f"not reported: patients in {scope}: {have}, too few for a bootstrap interval (at least {needed})"
            )
        elif interval[0] is None:
            valid = bootstrap - skipped.get(name, bootstrap)
            out[key] = None
            out[f"{key}_reason"] = (
                f"undefined: only {valid} of {bootstrap} patient resamples gave a defined {name} (need at least 2)"
            )
        elif skipped.get(name, 0) > BOOTSTRAP_MAX_SKIPPED * bootstrap:
            out[key] = None
            out[f"{key}_reason"] = (
                f"not reported: {skipped[name]} of {bootstrap} patient resamples held one class only, too many for a "
                f"percentile interval (at most {BOOTSTRAP_MAX_SKIPPED:.0%}); {n_pos} positive image(s) in {scope}"
            )
        elif degenerate:
            out[key] = None
            out[f"{key}_reason"] = (
                f"not reported: the patient resamples' percentiles coincide at {interval[0]:.3f}, an interval of "
                "zero width that would read as certainty (the estimate lies at the boundary)"
            )
        elif name == "ece":
            # Binned ECE is biased upwards, and its resamples more so: reflect their quantiles about the estimate
            # (basic bootstrap), which subtracts the bias they show; an error cannot be negative.
            low, high = interval
            basic = [max(0.0, 2.0 * out[name] - high), max(0.0, 2.0 * out[name] - low)]
            if basic[1] > basic[0]:
                out[key] = basic
                out[f"{key}_method"] = BASIC_BOOTSTRAP
            else:
                out[key] = None
                out[f"{key}_reason"] = (
                    f"not reported: the patient resamples' ECE ({low:.4f}–{high:.4f}) lies so far above the "
                    f"estimate {out[name]:.4f} that the bias-corrected (basic bootstrap) interval collapses to 0–0, "
                    "a zero-width interval that would read as certainty"
                )
        else:
            out[key] = interval

    auc_value = _auc_unchecked(y, s)
    _put(out, "auc", auc_value, why(True, True))
    put_ci("auc", math.isfinite(auc_value), why(True, True), BOTH_CLASSES)
    pr_value = _average_precision_unchecked(y, s)
    _put(out, "pr_auc", pr_value, why(True, False))
    put_ci("pr_auc", math.isfinite(pr_value), why(True, False), BOTH_CLASSES)

    for fixed in fixed_thresholds(threshold):
        sens, spec = sens_spec_at(y, s, fixed)
        key = threshold_key(fixed)
        _put(out, f"sensitivity@{key}", sens, why(True, False))
        put_ci(f"sensitivity@{key}", math.isfinite(sens), why(True, False), ("positive",))
        _put(out, f"specificity@{key}", spec, why(False, True))
        put_ci(f"specificity@{key}", math.isfinite(spec), why(False, True), ("negative",))
        put_exam(key, fixed)

    # Operating points: fitted on this split (validation), or given (the validation's, applied to test and to each
    # data set), so that a test figure at "the Youden point" is not a threshold re-fitted on the test labels.
    fitted = cuts is None
    cuts = all_operating_points(frame, specificities) if fitted else cuts
    fit_reason = why(True, True)

    def at(name: str, cut: float | None) -> None:
        cut = math.nan if cut is None else float(cut)
        sens, spec = sens_spec_at(y, s, cut) if math.isfinite(cut) else (math.nan, math.nan)
        cut_reason = fit_reason if fitted else "the validation split gives no such threshold"
        _put(out, f"sensitivity@{name}", sens, why(True, False) if math.isfinite(cut) else cut_reason)
        _put(out, f"specificity@{name}", spec, why(False, True) if math.isfinite(cut) else cut_reason)
        if name in points:  # a given threshold (the validation's, on test): an interval as at a fixed one
            put_ci(f"sensitivity@{name}", math.isfinite(sens), why(True, False), ("positive",))
            put_ci(f"specificity@{name}", math.isfinite(spec), why(False, True), ("negative",))
        put_exam(name, cut, cut_reason)
        _put(out, f"threshold@{name}", cut, cut_reason)

    at("youden", cuts.get("youden"))
    for target in specificities:
        name = f"spec{_spec_key(target)}"
        at(name, cuts.get(name))
    for target in specificities:  # the same targets per exam, as a recall is decided
        name = f"exam_spec{_spec_key(target)}"
        at(name, cuts.get(name))
    out["operating_points"] = "fitted on this split" if fitted else "from the validation split"

    auc_breast = _auc_unchecked(y_br, s_br)
    _put(out, "auc_breast", auc_breast, why(True, True, breast=True))
    put_ci("auc_breast", math.isfinite(auc_breast), why(True, True, breast=True), BOTH_CLASSES)
    _put(out, "pf1_breast", pf1(y_br, s_br), why(True, False, breast=True))
    # The other aggregation as well (DESIGN: breast level by mean or max); a point estimate beside the main one.
    other = "max" if breast_agg == "mean" else "mean"
    other_breasts = breast_level(frame, other)
    y_other, s_other = labels_and_scores(other_breasts["label"], other_breasts["prob"])
    _put(out, f"auc_breast_{other}", _auc_unchecked(y_other, s_other), why(True, True, breast=True))
    # Both mix the classes' errors, and the positives', far the larger per image, rest on the women with cancer: their
    # intervals need patients of both classes, as the AUC's do.
    ece_value = ece(y, s) if n else math.nan
    _put(out, "ece", ece_value, why(False, False))
    put_ci("ece", math.isfinite(ece_value), why(False, False), BOTH_CLASSES)
    brier_value = brier(y, s) if n else math.nan
    _put(out, "brier", brier_value, why(False, False))
    put_ci("brier", math.isfinite(brier_value), why(False, False), BOTH_CLASSES)
    out["n_images"] = n
    out["n_positive"] = n_pos
    out["n_exams"] = n_ex
    out["n_positive_exams"] = n_pos_ex
    # How many images an exam pools: a data set without exam ids makes each woman's images one exam (all her rounds).
    sizes = exams["n_images"]
    out["images_per_exam"] = (
        {"min": int(sizes.min()), "median": float(sizes.median()), "max": int(sizes.max())} if n_ex else None
    )
    out["screening_prevalence"] = float(screening_prevalence)
    if bootstrap:
        out["bootstrap"] = {
            "method": f"percentile (ECE: {BASIC_BOOTSTRAP}, `ece_ci95_method`)",
            "resampling_unit": "patient (dataset + patient_id)",
            "n_resamples": int(bootstrap),
            "seed": int(seed),
            "level": float(level),
            "skipped": {name: int(skipped.get(name, bootstrap)) for name in _bootstrap_names(points)},
            "patients": {f"with a {c} image": count for c, count in class_patients.items()},
            "min_patients_per_class": BOOTSTRAP_MIN_PATIENTS,
            "fallback": f"{CLOPPER_PEARSON} for a sensitivity or specificity at 0 or 1, or from fewer patients of "
            "its class than the minimum (`<name>_ci95_method`)",
        }
    return out


def operating_points(labels: Any, scores: Any, specificities: Sequence[float] = DEFAULT_SPECIFICITIES) -> dict:
    """The thresholds fitted on one split's images: ``youden`` and ``spec<target>`` (NaN where undefined)."""
    y, s = labels_and_scores(labels, scores)
    cuts = {"youden": youden_threshold(y, s)}
    for target in specificities:
        cuts[f"spec{_spec_key(target)}"] = threshold_at_specificity(y, s, target)
    return cuts


def exam_operating_points(frame: pd.DataFrame, specificities: Sequence[float] = DEFAULT_SPECIFICITIES) -> dict:
    """The thresholds fitted on one split's exams (:func:`exam_level`: recalled when any image reaches it):
    ``exam_spec<target>``, where ``target`` of the exams without cancer are not recalled (NaN where undefined).

    A screening programme sets its recall rate per exam; an image-level ``spec0.90`` recalls far more than 10% of
    exams, since every image of an exam is a chance to be recalled (on the demo's validation split, exam
    specificity 0.74 at the image-level spec0.90 point)."""
    exams = exam_level(frame)
    y, s = labels_and_scores(exams["label"], exams["prob"])
    return {f"exam_spec{_spec_key(target)}": threshold_at_specificity(y, s, target) for target in specificities}


def all_operating_points(frame: pd.DataFrame, specificities: Sequence[float] = DEFAULT_SPECIFICITIES) -> dict:
    """:func:`operating_points` on the images and :func:`exam_operating_points` on the exams, in one mapping."""
    return {
        **operating_points(frame["label"], frame["prob"], specificities),
        **exam_operating_points(frame, specificities),
    }


def compute_split_metrics(
    frame: pd.DataFrame,
    *,
    threshold: float = DEFAULT_THRESHOLD,
    breast_agg: str = "mean",
    specificities: Sequence[float] = DEFAULT_SPECIFICITIES,
) -> dict[str, Any]:
    """All ``metrics.json`` numbers for one split (or subset), JSON-ready.

    Args:
        frame: Predictions frame.
        threshold: Fixed operating point (the decision threshold); keys are named after it (``sensitivity@0.35``),
            and the reference's 0.3 is scored as well (``sensitivity@0.3``, see :func:`fixed_thresholds`).
        breast_agg: ``"mean"`` or ``"max"`` aggregation of image probabilities per breast.
        specificities: Targets for ``sensitivity@spec<target>``.

    Returns:
        ``auc, pr_auc, sensitivity@0.3, specificity@0.3, sensitivity@youden, specificity@youden,
        threshold@youden, sensitivity@spec0.90, sensitivity@spec0.987, auc_breast, pf1_breast, ece,
        brier, n_images, n_positive``, and per exam (recalled when any image reaches the threshold)
        ``sensitivity_exam@<point>, specificity_exam@<point>, n_exams, n_positive_exams``. Undefined values are
        None with a ``<name>_reason`` sentence.
    """
    return _split_metrics(
        frame, threshold=threshold, breast_agg=breast_agg, specificities=specificities, scope="this split"
    )


def compute_metrics(
    frame: pd.DataFrame,
    *,
    bootstrap: int = 0,
    seed: int = 0,
    threshold: float = DEFAULT_THRESHOLD,
    breast_agg: str = "mean",
    specificities: Sequence[float] = DEFAULT_SPECIFICITIES,
    level: float = 0.95,
    cuts: dict[str, float] | None = None,
    screening_prevalence: float = SCREENING_PREVALENCE,
) -> dict[str, Any]:
    """Split metrics overall and per dataset, with optional patient-bootstrap confidence intervals.

    The Youden and fixed-specificity operating points are fitted on ``frame`` unless ``cuts`` gives them (for a
    test split: the validation's, from :func:`operating_points` or ``result["cuts"]``); each data set is scored at
    the overall operating points, not at points re-fitted on its own labels.

    With ``bootstrap=n`` each level (overall and every dataset) gains ``auc_ci95``, ``pr_auc_ci95``,
    ``auc_breast_ci95``, ``ece_ci95`` and ``brier_ci95`` as ``[low, high]``: percentile intervals over ``n`` resamples
    of patients drawn with replacement (seeded by ``seed``; ECE's is the basic bootstrap's, which corrects for the
    estimate's upward bias and may lie below it, ``ece_ci95_method``), and a ``bootstrap`` entry recording the
    method and how many resamples were skipped because the metric was undefined on them (one class).
    Patients are counted per class: an AUC, ECE or Brier interval is None (with a reason) below
    ``BOOTSTRAP_MIN_PATIENTS`` patients with a positive or with a negative image, or when it would have zero width;
    sensitivity and specificity then get :func:`clopper_pearson` on the patients of their class
    (``<name>_ci95_method``).

    Args:
        frame: Predictions frame.
        bootstrap: Number of patient resamples; 0 turns the intervals off.
        seed: Seed of the resampling.
        threshold: Fixed operating point (the decision threshold), scored beside the reference's 0.3.
        breast_agg: ``"mean"`` or ``"max"``.
        specificities: Targets for ``sensitivity@spec<target>``.
        level: Coverage of the intervals.
        cuts: operating points to apply instead of fitting them here.
        screening_prevalence: cancers per exam at which each point's per-exam sensitivity and specificity are
            projected to ``recall_rate_screening@<point>``, ``cancer_detection_per_1000_screening@<point>`` and
            ``ppv1_screening@<point>`` (:func:`screening_projection`; point estimates, no intervals).

    Returns:
        The overall metrics plus ``by_dataset: {dataset: {same keys}}``.
    """
    screening_projection(0.5, 0.5, screening_prevalence)  # refuses a prevalence outside (0, 1) before any work
    options = {
        "threshold": threshold,
        "breast_agg": breast_agg,
        "specificities": specificities,
        "bootstrap": bootstrap,
        "seed": seed,
        "level": level,
        "screening_prevalence": screening_prevalence,
    }
    _require_columns(frame, ("label", "prob"))
    given = cuts is not None
    if cuts is None:
        cuts = all_operating_points(frame, specificities)
        result = _split_metrics(frame, scope="this split", **options)
    else:
        result = _split_metrics(frame, scope="this split", cuts=cuts, **options)
    by_dataset: dict[str, Any] = {}
    if "dataset" in frame.columns:
        for name, subset in frame.groupby("dataset", sort=True, dropna=False):
            label = "unknown" if pd.isna(name) else str(name)
            by_dataset[label] = _split_metrics(
                subset, scope=f"dataset {label}", cuts=cuts, cuts_from_another_split=given, **options
            )
            by_dataset[label]["operating_points"] = f"the whole split's ({result['operating_points']})"
    result["by_dataset"] = by_dataset
    return result


def thresholds_table(
    frame: pd.DataFrame,
    *,
    threshold: float = DEFAULT_THRESHOLD,
    specificities: Sequence[float] = DEFAULT_SPECIFICITIES,
) -> dict[str, dict[str, Any]]:
    """Operating points for ``thresholds.json``.

    Returns:
        ``{"0.3": ..., "youden": ..., "spec0.90": ..., "spec0.987": ...}``, each
        ``{"threshold", "sensitivity", "specificity"}`` per image, and with exam ids ``exam_spec0.90`` and
        ``exam_spec0.987``, fitted on exams, which also give ``sensitivity_exam`` and ``specificity_exam``; undefined
        values are None and the entry then carries a ``reason``.
    """
    _require_columns(frame, ("label", "prob"))
    y, s = labels_and_scores(frame["label"], frame["prob"])
    n, n_pos = int(y.size), int(y.sum())

    def why(need_pos: bool, need_neg: bool) -> str | None:
        return _reason(n, n_pos, need_pos=need_pos, need_neg=need_neg, unit="images", what="cases", scope="this split")

    def entry(cut: float, threshold_reason: str | None) -> dict[str, Any]:
        sens, spec = sens_spec_at(y, s, cut) if math.isfinite(cut) else (math.nan, math.nan)
        row: dict[str, Any] = {"threshold": _clean(cut), "sensitivity": _clean(sens), "specificity": _clean(spec)}
        reasons = []
        if row["threshold"] is None:
            reasons.append(threshold_reason)
        else:
            if row["sensitivity"] is None:
                reasons.append(why(True, False))
            if row["specificity"] is None:
                reasons.append(why(False, True))
        reasons = [r for r in dict.fromkeys(reasons) if r]
        if reasons:
            row["reason"] = "; ".join(reasons)
        return row

    table = {
        threshold_key(threshold): entry(threshold, None),
        "youden": entry(youden_threshold(y, s), why(True, True)),
    }
    for target in specificities:
        table[f"spec{_spec_key(target)}"] = entry(threshold_at_specificity(y, s, target), why(False, True))
    if {"patient_id", "exam_id"} <= set(frame.columns):
        # Fitted on exams (recalled when any image reaches it); the image figures at that threshold beside the exam's.
        exams = exam_level(frame)
        y_ex, s_ex = labels_and_scores(exams["label"], exams["prob"])
        n_ex, n_pos_ex = int(y_ex.size), int(y_ex.sum())
        exam_reason = _reason(
            n_ex, n_pos_ex, need_pos=False, need_neg=True, unit="exams", what="exams", scope="this split"
        )
        for name, cut in exam_operating_points(frame, specificities).items():
            row = entry(cut, exam_reason)
            se, sp = sens_spec_at(y_ex, s_ex, cut) if math.isfinite(cut) else (math.nan, math.nan)
            row["sensitivity_exam"], row["specificity_exam"] = _clean(se), _clean(sp)
            table[name] = row
    return table


# -------------------------------------------------------------------------------------------- gather


def gather_predictions(local_frame: pd.DataFrame) -> pd.DataFrame:
    """Collect every rank's predictions so that metrics are computed once on the whole split.

    Under an initialised ``torch.distributed`` process group this is a collective: every rank must
    call it, and every rank gets the full frame. Otherwise it returns the local frame. Either way
    the result is deduplicated by ``image_id`` (distributed samplers pad shards with repeated
    images to equal length) and sorted by ``image_id``, so it does not depend on the sharding.
    """
    frames = [local_frame]
    # A process group needs torch.distributed imported; checking sys.modules avoids importing torch
    # (seconds) in processes that only evaluate CSV files.
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        gathered: list[Any] = [None] * dist.get_world_size()
        # all_gather_object pickles the frame; with nccl it goes through the current CUDA device,
        # which the training loop has set for this rank.
        dist.all_gather_object(gathered, local_frame)
        frames = [f for f in gathered if f is not None]
    non_empty = [f for f in frames if len(f)] or frames[:1]
    frame = pd.concat(non_empty, ignore_index=True) if len(non_empty) > 1 else non_empty[0].copy()
    frame = frame.drop_duplicates(subset="image_id", keep="first")
    return frame.sort_values("image_id", kind="stable").reset_index(drop=True)
