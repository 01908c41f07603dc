"""Figures for a model bundle (``best/plots/``) and for a sweep (``results/<name>/plots/``).

The bundle set is the reference MammographyAI script's (ROC overall and per dataset, loss/AUC
curves, sensitivity/specificity per epoch, score distributions, uncertainty histogram) plus a
reliability diagram (calibration), uncertainty against error and a referral curve. The sweep set
is the optimisation history, parameter importance (fANOVA, Hutter et al. 2014, as implemented by
Optuna) and parallel coordinates, drawn with matplotlib so that no plotly is needed.

Every function writes one PNG atomically (temporary sibling, then rename, so a dashboard never
reads half a file) and returns its path. Degenerate input (one class, one dataset, no uncertainty,
an empty history, a study without finished trials) gives a figure that says what is missing
instead of an exception. Figures are built with ``matplotlib.figure.Figure`` and never touch
``pyplot``: that is headless by construction (``savefig`` renders through Agg, no display is
opened) and leaves the caller's backend alone, e.g. a notebook's inline backend, without a global
``matplotlib.use("Agg")``. It also keeps no global figure registry, so Ray workers that plot in
threads neither share state nor leak figures.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from mammo_ray import metrics
from mammo_ray.io import atomic_write

if TYPE_CHECKING:
    import optuna

DPI = 150  # 110 read as too coarse for print; vector output is not offered
# fANOVA fits a random forest to (parameters, value) points; below this many it ranks noise.
MIN_TRIALS_FOR_IMPORTANCE = 10
OVERALL_COLOR = "black"
NEGATIVE_COLOR = "tab:blue"
POSITIVE_COLOR = "tab:red"
UNCERTAINTY_COLUMNS = {
    "aleatoric": "aleatoric uncertainty (attenuation head)",
    "epistemic": "epistemic uncertainty (MC dropout / TTA)",
}
UNAVAILABLE = {
    "aleatoric": "aleatoric uncertainty not available\n(all NaN: the model has no loss-attenuation head)",
    "epistemic": "epistemic uncertainty not available\n(all NaN: predict ran without MC dropout or TTA)",
}


# ----------------------------------------------------------------------------------------- helpers


def _figure(ncols: int = 1, *, nrows: int = 1, size: tuple[float, float] | None = None) -> tuple[Figure, np.ndarray]:
    fig = Figure(figsize=size or (5.6 * ncols, 4.6 * nrows), dpi=DPI, layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, axes.ravel()


def _save(fig: Figure, path: str | Path) -> Path:
    """Render ``fig`` to ``path`` as PNG through a temporary sibling and an atomic rename."""

    def write(tmp: Path) -> None:
        fig.savefig(tmp, format="png", dpi=DPI)
        # mkstemp creates the temporary file 0600; plots are meant to be read by others (shared
        # results folders, dashboards), so give them the usual permissions of a created file.
        os.chmod(tmp, 0o644)

    return atomic_write(path, write)


def _note(ax: Any, text: str) -> None:
    """Write ``text`` in the middle of an empty axes, so the figure says why it holds no plot."""
    ax.text(0.5, 0.5, text, ha="center", va="center", wrap=True, fontsize=11, transform=ax.transAxes)
    ax.set_xticks([])
    ax.set_yticks([])


def _message_figure(path: str | Path, title: str, message: str) -> Path:
    fig, (ax,) = _figure(size=(6.4, 3.6))
    ax.set_title(title)
    _note(ax, message)
    return _save(fig, path)


def _labels_probs(frame: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    missing = [c for c in ("label", "prob") if c not in frame.columns]
    if missing:
        raise ValueError(f"predictions frame lacks columns {missing}")
    return metrics.labels_and_scores(frame["label"], frame["prob"])


def _dataset_groups(frame: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    """Per-dataset subsets, only when there is more than one dataset (one would repeat 'overall')."""
    if "dataset" not in frame.columns:
        return []
    groups = [
        ("unknown" if pd.isna(name) else str(name), subset)
        for name, subset in frame.groupby("dataset", sort=True, dropna=False)
    ]
    return groups if len(groups) > 1 else []


def _colors(n: int) -> list[Any]:
    palette = ["tab:blue", "tab:orange", "tab:green", "tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan"]
    return [palette[i % len(palette)] for i in range(n)]


def _why_auc(y: np.ndarray) -> str:
    if y.size == 0:
        return "no images"
    return "no positives" if not y.any() else "no negatives"


def _finite_column(frame: pd.DataFrame, column: str) -> np.ndarray | None:
    """The column as floats when every value is finite; None when it is absent or all NaN."""
    if column not in frame.columns or len(frame) == 0:
        return None
    values = pd.to_numeric(frame[column], errors="coerce").to_numpy(dtype=float)
    if not np.isfinite(values).any():
        return None
    return values


def _binary_entropy(p: np.ndarray) -> np.ndarray:
    q = np.clip(p, 1e-12, 1 - 1e-12)
    return -(q * np.log2(q) + (1 - q) * np.log2(1 - q))


# -------------------------------------------------------------------------------------- bundle plots


def plot_roc(
    frame: pd.DataFrame,
    path: str | Path,
    *,
    threshold: float = metrics.DEFAULT_THRESHOLD,
    split: str = "validation",
    cuts: dict[str, float] | None = None,
) -> Path:
    """Image-level ROC overall and per dataset, AUC in the legend, the fixed threshold and the operating points marked.

    Args:
        frame: Predictions frame.
        path: PNG to write.
        threshold: Operating point marked on the overall curve.
        split: Named in the title.
        cuts: Thresholds fitted on the validation split (``metrics.operating_points``), marked where they fall on
            this split's overall curve: on test the spec0.90 point shows the specificity it actually reaches.

    Returns:
        ``path``.
    """
    from sklearn.metrics import roc_curve

    fig, (ax,) = _figure(size=(6.2, 5.6))
    ax.plot([0, 1], [0, 1], linestyle=":", color="grey", label="chance")
    curves = [("overall", frame, OVERALL_COLOR)]
    groups = _dataset_groups(frame)
    curves += [(name, subset, color) for (name, subset), color in zip(groups, _colors(len(groups)), strict=True)]
    for name, subset, color in curves:
        y, p = _labels_probs(subset)
        auc = metrics.roc_auc(y, p)
        if math.isnan(auc):
            # An empty line keeps the dataset in the legend with the reason it has no curve.
            ax.plot([], [], color=color, label=f"{name}: AUC undefined ({_why_auc(y)}, n={y.size})")
            continue
        fpr, tpr, _ = roc_curve(y, p)
        width = 2.2 if name == "overall" else 1.4
        ax.plot(fpr, tpr, color=color, linewidth=width, label=f"{name}: AUC {auc:.3f} (n={y.size}, {int(y.sum())} pos)")
        if name == "overall":
            sens, spec = metrics.sens_spec_at(y, p, threshold)
            ax.plot(
                1 - spec, sens, "o", color=color, label=f"threshold {threshold:g}: sens {sens:.2f}, spec {spec:.2f}"
            )
            for (point, cut), marker in zip((cuts or {}).items(), ("s", "^", "D", "v", "P"), strict=False):
                if cut is None or not math.isfinite(cut):
                    continue
                sens, spec = metrics.sens_spec_at(y, p, cut)
                ax.plot(
                    1 - spec,
                    sens,
                    marker,
                    color="tab:orange",
                    markeredgecolor="black",
                    label=f"{point} (validation threshold {cut:.3f}): sens {sens:.2f}, spec {spec:.2f}",
                )
    ax.set(
        xlim=(0, 1),
        ylim=(0, 1.01),
        xlabel="1 - specificity (false positive rate)",
        ylabel="sensitivity (true positive rate)",
        title=f"ROC, image level, {split}",
    )
    ax.set_aspect("equal")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    return _save(fig, path)


def plot_pr(frame: pd.DataFrame, path: str | Path, *, split: str = "validation") -> Path:
    """Precision-recall curve overall and per data set, with average precision and the prevalence baseline.

    A classifier without skill has precision equal to the prevalence at every recall, so PR-AUC is read against
    that line, not against 0.5.

    Returns:
        ``path``.
    """
    from sklearn.metrics import precision_recall_curve

    fig, (ax,) = _figure(size=(6.2, 5.6))
    curves = [("overall", frame, OVERALL_COLOR)]
    groups = _dataset_groups(frame)
    curves += [(name, subset, color) for (name, subset), color in zip(groups, _colors(len(groups)), strict=True)]
    for name, subset, color in curves:
        y, p = _labels_probs(subset)
        if y.size == 0 or not y.any():
            ax.plot([], [], color=color, label=f"{name}: undefined (no positive cases, n={y.size})")
            continue
        precision, recall, _ = precision_recall_curve(y, p)
        ap = metrics.pr_auc(y, p)
        width = 2.2 if name == "overall" else 1.4
        ax.step(
            recall,
            precision,
            where="post",
            color=color,
            linewidth=width,
            label=f"{name}: PR-AUC {ap:.3f} (n={y.size}, {int(y.sum())} pos)",
        )
        ax.axhline(
            y.mean(), color=color, linestyle=":", linewidth=1, label=f"{name}: no skill = prevalence {y.mean():.3f}"
        )
    ax.set(
        xlim=(0, 1),
        ylim=(0, 1.01),
        xlabel="recall (sensitivity)",
        ylabel="precision (PPV)",
        title=f"Precision-recall, image level, {split}",
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper right")
    return _save(fig, path)


def plot_curves(history: pd.DataFrame | None, path: str | Path, *, selected_epoch: int | None = None) -> Path:
    """Loss and AUC per epoch, training and validation, with the exported epoch marked.

    Args:
        history: One row per epoch: ``epoch, train_loss, val_loss, val_auc`` and optionally ``train_auc``.
        path: PNG to write.
        selected_epoch: The epoch whose weights the bundle holds (by ``search.metric``); a dashed line on both
            panels. Without it the best validation AUC is starred.

    Returns:
        ``path``.
    """
    if history is None or len(history) == 0 or "epoch" not in history.columns:
        return _message_figure(path, "Training curves", "no epoch history available")
    epochs = pd.to_numeric(history["epoch"], errors="coerce").to_numpy(dtype=float)
    fig, (ax_loss, ax_auc) = _figure(2)
    panels = [
        # Training batches come from the sampler (class-balanced or not), validation from every image, so the two
        # losses are not on the same class mix.
        (ax_loss, "loss", [("train_loss", "train (sampled batches)"), ("val_loss", "validation (all images)")]),
        (ax_auc, "AUC", [("train_auc", "train"), ("val_auc", "validation")]),
    ]
    for ax, quantity, series in panels:
        drawn = 0
        for column, label in series:
            values = _finite_column(history, column)
            if values is None:
                continue
            ax.plot(epochs, values, "o-", markersize=3, label=label)
            drawn += 1
        if not drawn:
            _note(ax, f"no {quantity} recorded")
            continue
        ax.set(xlabel="epoch", ylabel=quantity, title=f"{quantity} per epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    val_auc = _finite_column(history, "val_auc")
    if val_auc is not None and np.isfinite(val_auc).any():
        _chance_line(ax_auc, "auc")
        low, high = ax_auc.get_ylim()
        ax_auc.set_ylim(min(low, 0.45), max(high, 0.55))  # a rise of 0.03 is not drawn as a cliff
        chosen = np.flatnonzero(epochs == selected_epoch) if selected_epoch is not None else np.array([], dtype=int)
        if chosen.size:
            at = int(chosen[0])
            for ax in (ax_loss, ax_auc):
                ax.axvline(epochs[at], color="grey", linestyle="--", linewidth=1)
            label = f"exported epoch {epochs[at]:g}: validation AUC {val_auc[at]:.3f}"
        else:
            at = int(np.nanargmax(val_auc))
            label = f"best validation AUC {val_auc[at]:.3f} (epoch {epochs[at]:g})"
        ax_auc.plot(epochs[at], val_auc[at], "*", markersize=12, color="gold", markeredgecolor="black", label=label)
        ax_auc.legend(fontsize=8)
    return _save(fig, path)


def plot_sens_spec(
    history: pd.DataFrame | None, path: str | Path, *, threshold: float = metrics.DEFAULT_THRESHOLD
) -> Path:
    """Validation sensitivity and specificity at the fixed threshold, per epoch.

    Reads ``sensitivity@0.3`` / ``specificity@0.3`` (or the same names with a ``val_`` prefix). When
    the history has neither, the figure says so.

    Returns:
        ``path``.
    """
    key = f"{threshold:g}"
    title = f"Validation sensitivity and specificity at threshold {key}"
    if history is None or len(history) == 0 or "epoch" not in history.columns:
        return _message_figure(path, title, "no epoch history available")
    found = {}
    for name in ("sensitivity", "specificity"):
        for column in (f"val_{name}@{key}", f"{name}@{key}"):
            values = _finite_column(history, column)
            if values is not None:
                found[name] = values
                break
    if not found:
        return _message_figure(path, title, f"sensitivity@{key} and specificity@{key}\nare not in the epoch history")
    epochs = pd.to_numeric(history["epoch"], errors="coerce").to_numpy(dtype=float)
    fig, (ax,) = _figure(size=(6.4, 4.4))
    styles = {"sensitivity": POSITIVE_COLOR, "specificity": NEGATIVE_COLOR}
    for name, values in found.items():
        ax.plot(epochs, values, "o-", markersize=3, color=styles[name], label=name)
    ax.set(xlabel="epoch", ylabel="rate", ylim=(-0.02, 1.02), title=title)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_score_distributions(frame: pd.DataFrame, path: str | Path, *, split: str = "validation") -> Path:
    """Predicted probability by label, and by dataset (solid: negatives, dashed: positives).

    Histograms are normalised per group, because screening data hold few positives.

    Returns:
        ``path``.
    """
    y, p = _labels_probs(frame)
    p = np.clip(p, 0.0, 1.0)
    bins = np.linspace(0.0, 1.0, 26)  # 0.04 wide: stable shapes on a few hundred images
    fig, (ax_label, ax_dataset) = _figure(2)
    if y.size == 0:
        _note(ax_label, "no predictions")
        _note(ax_dataset, "no predictions")
        return _save(fig, path)
    for mask, name, color in ((~y, "negatives", NEGATIVE_COLOR), (y, "positives", POSITIVE_COLOR)):
        if mask.any():
            ax_label.hist(
                p[mask], bins=bins, density=True, alpha=0.45, color=color, label=f"{name} (n={int(mask.sum())})"
            )
        else:
            ax_label.plot([], [], color=color, label=f"{name}: none in this split")
    ax_label.set(xlabel="predicted probability", ylabel="density", title=f"Scores by label, {split}", xlim=(0, 1))
    ax_label.legend(fontsize=8)

    datasets = _dataset_groups(frame) or [(str(frame["dataset"].iloc[0]) if "dataset" in frame else "all", frame)]
    for (name, subset), color in zip(datasets, _colors(len(datasets)), strict=True):
        ys, ps = _labels_probs(subset)
        for mask, kind, style in ((~ys, "neg", "-"), (ys, "pos", "--")):
            if mask.any():
                ax_dataset.hist(
                    np.clip(ps[mask], 0, 1),
                    bins=bins,
                    density=True,
                    histtype="step",
                    linestyle=style,
                    linewidth=1.4,
                    color=color,
                    label=f"{name} {kind} (n={int(mask.sum())})",
                )
    ax_dataset.set(xlabel="predicted probability", ylabel="density", title=f"Scores by dataset, {split}", xlim=(0, 1))
    ax_dataset.legend(fontsize=8)
    return _save(fig, path)


def plot_uncertainty_hist(frame: pd.DataFrame, path: str | Path) -> Path:
    """Histograms of aleatoric and epistemic uncertainty by label; 'not available' when all NaN.

    Returns:
        ``path``.
    """
    y, _ = _labels_probs(frame)
    fig, axes = _figure(2)
    for ax, (column, title) in zip(axes, UNCERTAINTY_COLUMNS.items(), strict=True):
        ax.set_title(title)
        values = _finite_column(frame, column)
        if values is None:
            _note(ax, UNAVAILABLE[column])
            continue
        finite = np.isfinite(values)
        bins = np.histogram_bin_edges(values[finite], bins=30)
        for mask, name, color in ((~y, "negatives", NEGATIVE_COLOR), (y, "positives", POSITIVE_COLOR)):
            chosen = values[mask & finite]
            if chosen.size:
                ax.hist(chosen, bins=bins, density=True, alpha=0.45, color=color, label=f"{name} (n={chosen.size})")
        ax.set(xlabel=column, ylabel="density")
        ax.legend(fontsize=8)
    return _save(fig, path)


def _wilson(
    positives: np.ndarray, counts: np.ndarray, z: float | np.ndarray = 1.959963984540054
) -> tuple[np.ndarray, np.ndarray]:
    """95% Wilson score interval of a binomial proportion (stays inside [0, 1] and is not zero-width at 0 or n).

    ``counts`` may be effective sample sizes (fractional), with ``positives`` the share times them. ``z`` may be one
    quantile per proportion: a t quantile in its place equals Wilson's interval on the effective count times
    (z/t)^2, Korn & Graubard's (1998) degrees-of-freedom adjustment.
    """
    n = np.maximum(counts.astype(float), 1.0)
    share = positives / n
    centre = (share + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(share * (1 - share) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return np.clip(centre - half, 0.0, 1.0), np.clip(centre + half, 0.0, 1.0)


def plot_reliability(frame: pd.DataFrame, path: str | Path, *, n_bins: int = 10, split: str = "validation") -> Path:
    """Reliability diagram (observed positive fraction against mean probability per bin), ECE in the legend.

    The overall curve carries 95% Wilson intervals and each bin's image and patient counts, and a line marks the
    split's prevalence; the lower panel shows how many images fall in each bin: in screening most sit near 0, so the
    upper bins rest on few cases. Several images come from one woman and tend to share her label, so a bin's
    interval takes its images divided by their patients' design effect as its sample size
    (``metrics.calibration_bins(patients=...)``) and the t quantile on its patients - 1 degrees of freedom in place
    of z (Korn & Graubard, 1998): the upper bins often rest on 3-5 women. A bin of one woman gets no interval (nothing
    to estimate its variance from), and says so; a frame without ``patient_id`` gets per-image intervals, and says so.

    Returns:
        ``path``.
    """
    from scipy.stats import t as student_t

    y, p = _labels_probs(frame)
    if y.size == 0:
        return _message_figure(path, "Reliability (calibration)", "no predictions")
    fig = Figure(figsize=(6.2, 6.4), dpi=DPI, layout="constrained")
    ax, ax_count = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    ax.plot([0, 1], [0, 1], linestyle=":", color="grey", label="perfect calibration")
    groups = _dataset_groups(frame)
    curves = [("overall", frame, OVERALL_COLOR)]
    curves += [(name, subset, color) for (name, subset), color in zip(groups, _colors(len(groups)), strict=True)]
    for name, subset, color in curves:
        ys, ps = _labels_probs(subset)
        bins = metrics.calibration_bins(ys, ps, n_bins)
        filled = bins[bins["count"] > 0]
        error = metrics.ece(ys, ps, n_bins)
        width = 2.0 if name == "overall" else 1.2
        ax.plot(
            filled["mean_prob"],
            filled["fraction_positive"],
            "o-",
            color=color,
            linewidth=width,
            markersize=4,
            label=f"{name}: ECE {error:.3f}, Brier {metrics.brier(ys, ps):.3f}",
        )
        if name == "overall" and len(filled):
            clustered = "patient_id" in subset.columns
            if clustered:
                bins = metrics.calibration_bins(ys, ps, n_bins, patients=metrics.patient_key(subset))
                filled = bins[bins["count"] > 0]
            counts = filled["count"].to_numpy()
            effective = filled["effective_count"].to_numpy() if clustered else counts.astype(float)
            middle = filled["fraction_positive"].to_numpy()
            if clustered:  # t on the bin's patients - 1 degrees of freedom; none from one patient
                women = filled["patients"].to_numpy()
                quantile = student_t.ppf(0.975, np.maximum(women - 1, 1))
                drawn = women > 1
            else:
                quantile, drawn = 1.959963984540054, np.ones(len(filled), dtype=bool)
            low, high = _wilson(middle * effective, effective, quantile)
            low, high = np.where(drawn, low, np.nan), np.where(drawn, high, np.nan)
            if drawn.any():
                ax.errorbar(
                    filled["mean_prob"].to_numpy()[drawn],
                    middle[drawn],
                    yerr=[np.clip(middle - low, 0, None)[drawn], np.clip(high - middle, 0, None)[drawn]],
                    fmt="none",
                    ecolor=color,
                    elinewidth=1,
                    capsize=3,
                    label="95% Wilson interval, "
                    + (
                        "patients as clusters (design effect, t on patients - 1 df)"
                        if clustered
                        else "per image (no patient_id)"
                    ),
                )
            for x, value, count, has_interval in zip(
                filled["mean_prob"], np.where(drawn, high, middle), counts, drawn, strict=True
            ):
                text = f"n={count}" if has_interval else f"n={count}, 1 patient: no interval"
                ax.annotate(text, (x, value), textcoords="offset points", xytext=(0, 4), fontsize=7, ha="center")
    if y.size:
        ax.axhline(y.mean(), color="tab:red", linestyle="--", linewidth=1, label=f"prevalence {y.mean():.3f}")
    ax.set(
        xlim=(0, 1),
        ylim=(-0.02, 1.02),
        ylabel="observed fraction positive",
        title=f"Reliability (calibration), {split}, {n_bins} equal-width bins",
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    clustered = "patient_id" in frame.columns
    overall = metrics.calibration_bins(y, p, n_bins, patients=metrics.patient_key(frame) if clustered else None)
    centres = (overall["bin_lower"] + overall["bin_upper"]) / 2
    bars = ax_count.bar(centres, overall["count"], width=0.9 / n_bins, color="grey")
    top = overall["count"].max()
    if top >= 100:
        ax_count.set_yscale("log")
    if clustered:  # the women behind each bin, on whom its interval rests
        labels = [f"{k} pt" if c else "" for k, c in zip(overall["patients"], overall["count"], strict=True)]
        ax_count.bar_label(bars, labels=labels, padding=1, fontsize=7)
        ax_count.set_ylim(top=top * (4.0 if top >= 100 else 1.3))
    ax_count.set(xlabel="predicted probability", ylabel="images (label: patients)" if clustered else "images")
    return _save(fig, path)


def plot_uncertainty_vs_error(frame: pd.DataFrame, path: str | Path) -> Path:
    """Absolute error ``|label - prob|`` against aleatoric and epistemic uncertainty.

    Each panel shows the images, the mean error in ten uncertainty quantile bins, and Spearman's rank
    correlation: a useful uncertainty rises with the error.

    Returns:
        ``path``.
    """
    from scipy.stats import spearmanr

    y, p = _labels_probs(frame)
    error = np.abs(y.astype(float) - p)
    fig, axes = _figure(2)
    for ax, (column, title) in zip(axes, UNCERTAINTY_COLUMNS.items(), strict=True):
        ax.set_title(title, fontsize=10)
        values = _finite_column(frame, column)
        if values is None:
            _note(ax, UNAVAILABLE[column])
            continue
        finite = np.isfinite(values)
        u, e, labels = values[finite], error[finite], y[finite]
        for mask, name, color in ((~labels, "negatives", NEGATIVE_COLOR), (labels, "positives", POSITIVE_COLOR)):
            if mask.any():
                ax.scatter(u[mask], e[mask], s=6, alpha=0.35, color=color, label=name, rasterized=True)
        edges = np.unique(np.quantile(u, np.linspace(0, 1, 11)))
        if edges.size >= 2:
            index = np.clip(np.searchsorted(edges, u, side="right") - 1, 0, edges.size - 2)
            centres = [u[index == k].mean() for k in range(edges.size - 1) if (index == k).any()]
            means = [e[index == k].mean() for k in range(edges.size - 1) if (index == k).any()]
            ax.plot(centres, means, "o-", color="black", label="mean error per uncertainty decile")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a constant column has no rank correlation; NaN says so
            rho = spearmanr(u, e).statistic if u.size > 1 else math.nan
        rho_text = "undefined" if not np.isfinite(rho) else f"{rho:.2f}"
        ax.set(xlabel=column, ylabel="|label - probability|", ylim=(-0.02, 1.02))
        ax.set_title(f"{title}\nSpearman rho = {rho_text}", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _save(fig, path)


def plot_referral(
    frame: pd.DataFrame,
    path: str | Path,
    *,
    fractions: Sequence[float] = metrics.DEFAULT_REFERRAL_FRACTIONS,
) -> Path:
    """AUC of the retained images after deferring the most uncertain fraction to a radiologist.

    One curve per uncertainty: predictive entropy of the probability (always available, the
    baseline a learned uncertainty should beat), aleatoric and epistemic where the frame has them. Each label gives
    Spearman's ρ between the uncertainty and the probability (near ±1, "defer the most uncertain" only defers the
    highest or lowest scores) and the positives still retained at the largest deferral, on which that AUC rests.

    Returns:
        ``path``.
    """
    y, p = _labels_probs(frame)
    title = "Referral: AUC after deferring the most uncertain cases"
    base = metrics.roc_auc(y, p)
    if math.isnan(base):
        return _message_figure(path, title, f"AUC undefined on this split ({_why_auc(y)}, n={y.size})")
    sources: list[tuple[str, np.ndarray]] = [("predictive entropy of prob", _binary_entropy(p))]
    missing = []
    for column in UNCERTAINTY_COLUMNS:
        values = _finite_column(frame, column)
        if values is not None and np.isfinite(values).all():
            sources.append((column, values))
        else:
            missing.append(column)
    fig, (ax,) = _figure(size=(6.4, 4.8))
    ax.axhline(base, linestyle=":", color="grey", label=f"no deferral: AUC {base:.3f} (random deferral keeps it)")
    from scipy.stats import spearmanr

    for (name, uncertainty), color in zip(sources, _colors(len(sources)), strict=True):
        curve = metrics.referral_curve(y, p, uncertainty, fractions)
        rho = spearmanr(uncertainty, p).statistic if np.ptp(uncertainty) > 0 and np.ptp(p) > 0 else float("nan")
        last = curve.loc[curve["fraction"].idxmax()]
        label = (
            f"by {name} (ρ with prob {rho:+.2f}; {int(last['n_positive_retained'])} of {int(y.sum())} positives "
            f"kept at {last['fraction']:.0%})"
        )
        ax.plot(curve["fraction"] * 100, curve["auc"], "o-", markersize=3, color=color, label=label)
    if missing:
        ax.plot([], [], " ", label=f"not available: {', '.join(missing)}")
    ax.set(xlabel="cases deferred to a radiologist (%)", ylabel="AUC of retained cases", title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


BUNDLE_PLOTS: dict[str, Callable[..., Path]] = {
    "roc.png": plot_roc,
    "pr.png": plot_pr,
    "curves.png": plot_curves,
    "sens_spec.png": plot_sens_spec,
    "score_distributions.png": plot_score_distributions,
    "uncertainty_hist.png": plot_uncertainty_hist,
    "reliability.png": plot_reliability,
    "uncertainty_vs_error.png": plot_uncertainty_vs_error,
    "referral.png": plot_referral,
}
_HISTORY_PLOTS = {"curves.png", "sens_spec.png"}


def plot_all_bundle(
    frame: pd.DataFrame,
    history: pd.DataFrame | None,
    out_dir: str | Path,
    *,
    threshold: float = metrics.DEFAULT_THRESHOLD,
    selected_epoch: int | None = None,
    cuts: dict[str, float] | None = None,
) -> list[Path]:
    """Write the bundle's plot set (``BUNDLE_PLOTS``) into ``out_dir``.

    Args:
        frame: Validation predictions (export adds the test split's ROC as ``roc_test.png``).
        history: Epoch history (``history.csv``); None writes the history plots as 'not available'.
        out_dir: Folder, created when missing.
        threshold: The bundle's decision threshold (``train.threshold``), marked on the ROC. The per-epoch
            sensitivity and specificity stay at the reference's 0.3, the threshold the history records.
        selected_epoch: The bundle's epoch, marked on the training curves.
        cuts: The validation's operating points (``metrics.operating_points``), marked on the ROC.

    Returns:
        The written paths, in ``BUNDLE_PLOTS`` order.
    """
    out_dir = Path(out_dir)
    paths = []
    for name, plot in BUNDLE_PLOTS.items():
        options: dict[str, Any] = {"threshold": threshold, "cuts": cuts} if name == "roc.png" else {}
        if name == "curves.png":
            options["selected_epoch"] = selected_epoch
        paths.append(plot(history if name in _HISTORY_PLOTS else frame, out_dir / name, **options))
    return paths


TEST_PLOTS = ("roc_test.png", "pr_test.png", "reliability_test.png", "score_distributions_test.png")


def plot_test(
    frame: pd.DataFrame,
    out_dir: str | Path,
    *,
    threshold: float = metrics.DEFAULT_THRESHOLD,
    cuts: dict[str, float] | None = None,
) -> list[Path]:
    """The held-out split's figures (``TEST_PLOTS``): ROC with the validation's operating points, PR, reliability
    and score distributions."""
    out_dir = Path(out_dir)
    return [
        plot_roc(frame, out_dir / TEST_PLOTS[0], threshold=threshold, split="test", cuts=cuts),
        plot_pr(frame, out_dir / TEST_PLOTS[1], split="test"),
        plot_reliability(frame, out_dir / TEST_PLOTS[2], split="test"),
        plot_score_distributions(frame, out_dir / TEST_PLOTS[3], split="test"),
    ]


# --------------------------------------------------------------------------------------- sweep plots


def _study_trials(study: optuna.Study) -> tuple[list[Any], dict[str, int]]:
    """Completed trials with a value, and the count of trials in each state."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == TrialState.COMPLETE and t.values]
    counts: dict[str, int] = {}
    for trial in trials:
        counts[trial.state.name.lower()] = counts.get(trial.state.name.lower(), 0) + 1
    return complete, counts


def _metric_name(study: optuna.Study) -> str:
    names = getattr(study, "metric_names", None)
    return names[0] if names else "objective"


def _maximize(study: optuna.Study) -> bool:
    from optuna.study import StudyDirection

    return study.directions[0] == StudyDirection.MAXIMIZE


def _state_summary(counts: dict[str, int]) -> str:
    return ", ".join(f"{n} {state}" for state, n in sorted(counts.items())) or "no trials"


def _best_epoch_values(trials: list[Any]) -> bool:
    """Whether the trials carry the leaderboard's attributes (``tune.plotted_study``): values are best epochs."""
    return bool(trials) and all("epochs" in t.user_attrs for t in trials)


def _chance_line(ax: Any, metric: str, horizontal: bool = True) -> None:
    if "auc" in metric:
        line = ax.axhline if horizontal else ax.axvline
        line(0.5, color="grey", linestyle=":", linewidth=1, label="chance (AUC 0.5)")


def plot_sweep_history(study: optuna.Study, path: str | Path) -> Path:
    """Objective per trial in start order with the best-so-far line; pruned trials at their last report.

    With the leaderboard's attributes (``tune.plotted_study``) each trial is drawn at its best epoch, trials
    stopped early (ASHA) apart from those that ran every epoch, with their epoch counts, and the exported trial
    starred. With a multi-objective study the first objective is shown.

    Returns:
        ``path``.
    """
    from optuna.trial import TrialState

    complete, counts = _study_trials(study)
    metric = _metric_name(study)
    title = f"Sweep history ({_state_summary(counts)})"
    pruned = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.PRUNED and t.intermediate_values]
    if not complete and not pruned:
        return _message_figure(path, title, "no completed or pruned trials with a value yet")
    maximize = _maximize(study)
    by_epoch = _best_epoch_values(complete)
    fig, (ax,) = _figure(size=(7.0, 4.6))
    if complete:
        numbers = np.array([t.number for t in complete])
        values = np.array([t.values[0] for t in complete], dtype=float)
        if by_epoch:
            reasons = [t.user_attrs["stop_reason"] for t in complete]
            ran_all = np.array([r == "completed" for r in reasons])
            failed = np.array([r.startswith(("error", "interrupted")) for r in reasons])
            early = ~ran_all & ~failed
            ax.plot(numbers[ran_all], values[ran_all], "o", color="tab:blue", label="ran every epoch")
            ax.plot(numbers[early], values[early], "v", color="tab:orange", label="stopped early")
            if failed.any():
                ax.plot(numbers[failed], values[failed], "X", color="tab:red", label="errored or interrupted")
            for trial, value in zip(complete, values, strict=True):
                epochs = trial.user_attrs["epochs"]
                ax.annotate(
                    f"{epochs} ep.", (trial.number, value), textcoords="offset points", xytext=(5, 4), fontsize=7
                )
            exported = [(t.number, v) for t, v in zip(complete, values, strict=True) if t.user_attrs.get("exported")]
            if exported:
                ax.plot(
                    *zip(*exported, strict=True),
                    "*",
                    markersize=15,
                    color="gold",
                    markeredgecolor="black",
                    label="exported (best trial)",
                )
        else:
            ax.plot(numbers, values, "o", color="tab:blue", label="complete")
        best = np.maximum.accumulate(values) if maximize else np.minimum.accumulate(values)
        ax.step(numbers, best, where="post", color="tab:red", label=f"best so far ({'max' if maximize else 'min'})")
    if pruned:
        last = [t.intermediate_values[max(t.intermediate_values)] for t in pruned]
        ax.plot([t.number for t in pruned], last, "x", color="grey", label="pruned (last reported value)")
    _chance_line(ax, metric)
    ylabel = f"{metric}, best epoch of each trial" if by_epoch else metric
    ax.set(xlabel="trial number (start order)", ylabel=ylabel, title=title)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_param_importance(study: optuna.Study, path: str | Path) -> Path:
    """Hyper-parameter importance by fANOVA (seeded), as horizontal bars.

    Falls back to a figure that says why when there are fewer than two completed trials or Optuna
    cannot compute importances (e.g. no parameter varied).

    Returns:
        ``path``.
    """
    import optuna

    complete, counts = _study_trials(study)
    title = f"Parameter importance for {_metric_name(study)}"
    if len(complete) < MIN_TRIALS_FOR_IMPORTANCE:
        return _message_figure(
            path,
            title,
            f"parameter importance is not computed from fewer than {MIN_TRIALS_FOR_IMPORTANCE} completed trials:\n"
            f"a random forest fitted to so few points ranks noise\n(this study: {_state_summary(counts)})",
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # optuna warns about experimental or single-value parameters
            importances = optuna.importance.get_param_importances(
                study,
                evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0),
                target=(lambda t: t.values[0]) if len(study.directions) > 1 else None,
            )
    except Exception as exc:  # importance is a diagnostic: any failure becomes the figure's message
        return _message_figure(path, title, f"parameter importance could not be computed:\n{exc}")
    if not importances:
        return _message_figure(path, title, "no searched parameter varied across the completed trials")
    names = list(importances)[::-1]  # most important at the top
    values = [importances[name] for name in names]
    fig, (ax,) = _figure(size=(6.6, 1.2 + 0.45 * len(names)))
    bars = ax.barh(names, values, color="tab:blue")
    ax.bar_label(bars, labels=[f"{v:.2f}" for v in values], padding=3, fontsize=8)
    basis = "; each trial's best epoch, whatever its budget" if _best_epoch_values(complete) else ""
    ax.set(
        xlabel=f"importance (fANOVA, sums to 1{basis})",
        xlim=(0, max(1.0, max(values) * 1.15)),
        title=f"{title} ({len(complete)} completed trials)",
    )
    return _save(fig, path)


def _axis_coordinates(trials: list[Any], name: str) -> tuple[np.ndarray, list[tuple[float, str]]]:
    """Trial values of one parameter mapped to [0, 1], and the tick positions with their labels."""
    from optuna.distributions import CategoricalDistribution

    distribution = next(t.distributions[name] for t in trials if name in t.distributions)
    raw = [t.params.get(name) for t in trials]
    if isinstance(distribution, CategoricalDistribution):
        choices = list(distribution.choices)
        span = max(len(choices) - 1, 1)
        coords = np.array([np.nan if v is None else choices.index(v) / span for v in raw], dtype=float)
        if len(choices) == 1:
            coords = np.where(np.isnan(coords), np.nan, 0.5)
            return coords, [(0.5, str(choices[0]))]
        return coords, [(i / span, str(c)) for i, c in enumerate(choices)]
    log = bool(getattr(distribution, "log", False))
    values = np.array([np.nan if v is None else float(v) for v in raw], dtype=float)
    scaled = np.log10(values) if log else values
    low, high = np.nanmin(scaled), np.nanmax(scaled)
    if high == low:
        return np.where(np.isnan(scaled), np.nan, 0.5), [(0.5, f"{np.nanmin(values):.3g}")]
    coords = (scaled - low) / (high - low)
    return coords, [(0.0, f"{np.nanmin(values):.3g}"), (1.0, f"{np.nanmax(values):.3g}")]


def _log_scaled(trials: list[Any], name: str) -> bool:
    distribution = next(t.distributions[name] for t in trials if name in t.distributions)
    return bool(getattr(distribution, "log", False))


def plot_parallel_coordinates(study: optuna.Study, path: str | Path) -> Path:
    """One vertical axis per searched parameter plus the objective; one line per completed trial.

    Numeric axes span the observed range (log-scaled for log-uniform parameters), categorical axes
    list their choices; lines are coloured by the objective.

    Returns:
        ``path``.
    """
    complete, counts = _study_trials(study)
    metric = _metric_name(study)
    title = f"Parallel coordinates ({len(complete)} completed trials)"
    names = sorted({name for t in complete for name in t.params})
    if not complete or not names:
        reason = "no completed trials yet" if not complete else "the completed trials have no searched parameters"
        return _message_figure(path, "Parallel coordinates", f"{reason}\n({_state_summary(counts)})")
    objective = np.array([t.values[0] for t in complete], dtype=float)
    axes_coords = [_axis_coordinates(complete, name) for name in names]
    low, high = float(objective.min()), float(objective.max())
    objective_coords = (objective - low) / (high - low) if high > low else np.full(objective.size, 0.5)
    columns = np.column_stack([c for c, _ in axes_coords] + [objective_coords])
    norm = Normalize(vmin=low, vmax=high if high > low else low + 1e-12)
    cmap = "viridis" if _maximize(study) else "viridis_r"  # bright = better either way
    mappable = ScalarMappable(norm=norm, cmap=cmap)

    fig, (ax,) = _figure(size=(max(6.0, 1.6 * (len(names) + 1)), 4.8))
    x = np.arange(len(names) + 1)
    exported = [bool(t.user_attrs.get("exported")) for t in complete]
    for row, value, is_exported in sorted(
        zip(columns, objective, exported, strict=True), key=lambda item: item[1] * (1 if _maximize(study) else -1)
    ):
        if is_exported:  # outlined, so that it stands out from trials of nearly the same value
            ax.plot(x, row, color="black", linewidth=3.6, label="exported (best trial)")
        ax.plot(x, row, color=mappable.to_rgba(value), alpha=0.9, linewidth=2.2 if is_exported else 1.3)
    ticks = [*(t for _, t in axes_coords), [(0.0, f"{low:.3g}"), (1.0, f"{high:.3g}")]]
    for position, axis_ticks in zip(x, ticks, strict=True):
        ax.axvline(position, color="black", linewidth=0.8)
        for level, text in axis_ticks:
            ax.text(
                position + 0.03,
                level,
                text,
                fontsize=7,
                va="center",
                ha="left",
                bbox={"facecolor": "white", "alpha": 0.7, "edgecolor": "none", "pad": 1},
            )
    axis_names = [f"{name} (log)" if _log_scaled(complete, name) else name for name in names]
    metric_axis = f"{metric} (best epoch)" if _best_epoch_values(complete) else metric
    ax.set_xticks(x, [*axis_names, metric_axis], rotation=20, ha="right", fontsize=8)
    if any(exported):
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(0.0, -0.22))
    ax.set_yticks([])
    ax.set(xlim=(-0.2, len(names) + 0.6), ylim=(-0.08, 1.08), title=title)
    for spine in ("left", "right", "top"):
        ax.spines[spine].set_visible(False)
    fig.colorbar(mappable, ax=ax, label=metric, fraction=0.04)
    return _save(fig, path)


SWEEP_PLOTS: dict[str, Callable[[Any, str | Path], Path]] = {
    "sweep_history.png": plot_sweep_history,
    "param_importance.png": plot_param_importance,
    "parallel_coordinates.png": plot_parallel_coordinates,
}


def plot_all_sweep(study: optuna.Study, out_dir: str | Path) -> list[Path]:
    """Write the sweep's plot set (``SWEEP_PLOTS``) into ``out_dir``; returns the paths."""
    out_dir = Path(out_dir)
    return [plot(study, out_dir / name) for name, plot in SWEEP_PLOTS.items()]
