"""Tests for mammo_ray.plots: every plot writes a real PNG, for normal and degenerate inputs."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import pytest

from mammo_ray import metrics, plots

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert len(data) > 1024
    assert path.stat().st_mode & 0o044 == 0o044  # readable by group and others, not mkstemp's 0600
    leftovers = [p.name for p in path.parent.iterdir() if p.name.startswith(".") and p.name.endswith(".tmp")]
    assert not leftovers, f"temporary files left behind: {leftovers}"


def predictions(n_patients: int = 80, *, seed: int = 0, datasets: tuple[str, ...] = ("EMBED", "CSAW")) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(n_patients):
        for side in ("L", "R"):
            label = int(rng.random() < 0.15)
            for view in ("CC", "MLO"):
                prob = float(np.clip(rng.normal(0.25 + 0.35 * label, 0.18), 0, 1))
                error = abs(label - prob)
                rows.append(
                    {
                        "image_id": f"P{p:03d}_{side}_{view}",
                        "patient_id": f"P{p:03d}",
                        "exam_id": f"P{p:03d}_E0",
                        "laterality": side,
                        "view": view,
                        "dataset": datasets[p % len(datasets)],
                        "label": label,
                        "prob": prob,
                        "aleatoric": float(abs(rng.normal(0.3 + error, 0.1))),
                        "epistemic": float(abs(rng.normal(0.05 + 0.1 * error, 0.02))),
                    }
                )
    return pd.DataFrame(rows, columns=list(metrics.PREDICTION_COLUMNS))


def _frames() -> dict[str, pd.DataFrame]:
    normal = predictions()
    no_positives = normal[normal["label"] == 0].reset_index(drop=True)
    nan_uncertainty = normal.assign(aleatoric=np.nan, epistemic=np.nan)
    constant = normal.assign(prob=0.4, aleatoric=0.2, epistemic=0.2)  # all-equal scores and uncertainties
    return {
        "normal": normal,
        "one-class": no_positives,
        "one-dataset": predictions(datasets=("EMBED",), seed=1),
        "nan-uncertainty": nan_uncertainty,
        "constant": constant,
        "empty": normal.iloc[:0],
    }


FRAMES = _frames()


def _histories() -> dict[str, pd.DataFrame | None]:
    epochs = np.arange(1, 6)
    full = pd.DataFrame(
        {
            "epoch": epochs,
            "train_loss": 0.7 / epochs,
            "val_loss": 0.75 / epochs + 0.05,
            "train_auc": 0.6 + 0.07 * epochs,
            "val_auc": [0.55, 0.62, np.nan, 0.7, 0.69],
            "sensitivity@0.3": [0.9, 0.85, 0.8, 0.82, 0.8],
            "specificity@0.3": [0.3, 0.45, 0.5, 0.55, 0.6],
        }
    )
    return {
        "full": full,
        "one-epoch-no-train-auc": pd.DataFrame(
            {"epoch": [1], "train_loss": [0.6], "val_loss": [0.65], "val_auc": [0.5]}
        ),
        "undefined-auc": pd.DataFrame(
            {"epoch": [1, 2], "train_loss": [0.6, 0.5], "val_loss": [0.6, 0.55], "val_auc": [None, None]}
        ),
        "empty": pd.DataFrame(columns=["epoch", "train_loss", "val_loss", "val_auc"]),
        "none": None,
    }


HISTORIES = _histories()


def _objective(trial: optuna.Trial) -> float:
    lr = trial.suggest_float("train.lr", 1e-5, 1e-2, log=True)
    dropout = trial.suggest_float("model.dropout", 0.0, 0.5)
    sampler = trial.suggest_categorical("train.sampler", ["weighted", "balanced", "simple"])
    freeze = trial.suggest_int("model.freeze_units", 0, 42)
    if trial.number == 3:
        trial.report(0.52, 0)
        trial.report(0.55, 1)
        raise optuna.TrialPruned()
    if trial.number == 5:
        raise ValueError("simulated trial failure")
    return 0.7 + 0.05 * math.log10(lr / 1e-5) / 3 - 0.1 * dropout + 0.02 * (sampler == "balanced") - 0.001 * freeze


def _studies() -> dict[str, optuna.Study]:
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    normal = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        normal.set_metric_names(["val_auc"])
    normal.optimize(_objective, n_trials=14, catch=(ValueError,))  # 12 complete: enough for importance

    minimize = optuna.create_study(direction="minimize", sampler=optuna.samplers.RandomSampler(seed=1))
    minimize.optimize(lambda t: (t.suggest_float("x", -2, 2) - 0.5) ** 2, n_trials=6)

    def fail(trial: optuna.Trial) -> float:
        trial.suggest_float("x", 0, 1)
        raise ValueError("always fails")

    failed_only = optuna.create_study()
    failed_only.optimize(fail, n_trials=2, catch=(ValueError,))

    one_complete = optuna.create_study()
    one_complete.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=1)

    no_params = optuna.create_study()  # nothing searched: importance cannot be computed
    no_params.optimize(lambda t: float(t.number), n_trials=3)
    return {
        "normal": normal,
        "minimize": minimize,
        "failed-only": failed_only,
        "one-complete": one_complete,
        "no-params": no_params,
        "empty": optuna.create_study(),
    }


@pytest.fixture(scope="module")
def studies() -> dict[str, optuna.Study]:
    return _studies()


FRAME_PLOTS: list[Callable[..., Path]] = [
    plots.plot_roc,
    plots.plot_pr,
    plots.plot_score_distributions,
    plots.plot_uncertainty_hist,
    plots.plot_reliability,
    plots.plot_uncertainty_vs_error,
    plots.plot_referral,
]


@pytest.mark.parametrize("frame_name", list(FRAMES))
@pytest.mark.parametrize("plot", FRAME_PLOTS, ids=lambda f: f.__name__)
def test_frame_plots(plot: Callable[..., Path], frame_name: str, tmp_path: Path) -> None:
    path = tmp_path / f"{plot.__name__}.png"
    assert plot(FRAMES[frame_name], path) == path
    assert_png(path)


@pytest.mark.parametrize("history_name", list(HISTORIES))
@pytest.mark.parametrize("plot", [plots.plot_curves, plots.plot_sens_spec], ids=lambda f: f.__name__)
def test_history_plots(plot: Callable[..., Path], history_name: str, tmp_path: Path) -> None:
    path = tmp_path / "nested" / f"{plot.__name__}.png"  # the folder is created
    assert plot(HISTORIES[history_name], path) == path
    assert_png(path)


@pytest.mark.parametrize("study_name", ["normal", "minimize", "failed-only", "one-complete", "no-params", "empty"])
@pytest.mark.parametrize(
    "plot",
    [plots.plot_sweep_history, plots.plot_param_importance, plots.plot_parallel_coordinates],
    ids=lambda f: f.__name__,
)
def test_sweep_plots(
    plot: Callable[..., Path], study_name: str, studies: dict[str, optuna.Study], tmp_path: Path
) -> None:
    path = tmp_path / f"{plot.__name__}.png"
    assert plot(studies[study_name], path) == path
    assert_png(path)


def test_normal_study_has_pruned_and_failed_trials(studies: dict[str, optuna.Study]) -> None:
    states = {t.state for t in studies["normal"].trials}
    assert {optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.FAIL} <= states


def test_plot_overwrites_atomically(tmp_path: Path) -> None:
    path = tmp_path / "roc.png"
    path.write_bytes(b"stale")
    plots.plot_roc(FRAMES["normal"], path)
    assert_png(path)


def test_plot_all_bundle(tmp_path: Path) -> None:
    written = plots.plot_all_bundle(FRAMES["normal"], HISTORIES["full"], tmp_path / "plots")
    assert [p.name for p in written] == list(plots.BUNDLE_PLOTS)
    for path in written:
        assert_png(path)
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == sorted(plots.BUNDLE_PLOTS)


def test_plot_all_bundle_marks_the_bundles_threshold_and_keeps_the_historys(tmp_path: Path, monkeypatch) -> None:
    """With train.threshold 0.5 the ROC marks 0.5; the per-epoch curves stay at the 0.3 the history records (the
    bundle looked for sensitivity@0.5 there and drew 'not in the epoch history')."""
    messages = []
    real = plots._message_figure
    monkeypatch.setattr(
        plots, "_message_figure", lambda path, title, message: messages.append(message) or real(path, title, message)
    )
    seen = {}
    real_roc = plots.plot_roc
    monkeypatch.setitem(
        plots.BUNDLE_PLOTS, "roc.png", lambda frame, path, **kw: seen.update(kw) or real_roc(frame, path, **kw)
    )
    plots.plot_all_bundle(FRAMES["normal"], HISTORIES["full"], tmp_path, threshold=0.5)
    assert not [m for m in messages if "epoch history" in m]
    assert seen == {"threshold": 0.5, "cuts": None}


def _messages(monkeypatch) -> list[str]:
    messages: list[str] = []
    real = plots._message_figure
    monkeypatch.setattr(
        plots, "_message_figure", lambda path, title, message: messages.append(message) or real(path, title, message)
    )
    return messages


def test_param_importance_is_not_computed_from_a_handful_of_trials(studies, tmp_path: Path, monkeypatch) -> None:
    # The demo's 6 trials gave fANOVA bars printed to two decimals.
    messages = _messages(monkeypatch)
    few = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0))
    few.optimize(lambda t: t.suggest_float("x", 0, 1) + t.suggest_float("y", 0, 1) / 10, n_trials=6)
    plots.plot_param_importance(few, tmp_path / "few.png")
    assert len(messages) == 1 and f"fewer than {plots.MIN_TRIALS_FOR_IMPORTANCE}" in messages[0]
    plots.plot_param_importance(studies["normal"], tmp_path / "enough.png")  # 12 complete trials: bars
    assert len(messages) == 1


def _stored_sweep() -> tuple[optuna.Study, pd.DataFrame]:
    """What a sweep leaves: a study holding each trial's last report, and the leaderboard with the best epoch."""
    stored = optuna.create_study(direction="maximize", study_name="s")
    for value in (0.52, 0.58, 0.50, 0.55):
        trial = stored.ask({"train.lr": optuna.distributions.FloatDistribution(1e-5, 1e-2, log=True)})
        stored.tell(trial, value)
    board = pd.DataFrame(
        {
            "trial_id": ["a", "b", "c"],
            "status": ["TERMINATED", "TERMINATED", "ERROR"],
            "stop_reason": ["completed", "early_stopped (asha)", "error: boom"],
            "epochs": [8, 2, 1],
            "train.lr": [t.params["train.lr"] for t in stored.trials[:3]],
            "val_auc_best": [0.61, 0.58, None],
            "val_auc_last": [0.52, 0.58, None],
        }
    )  # the fourth trial was asked for but never started: not on the leaderboard
    return stored, board


def test_plotted_study_shows_each_trial_at_its_best_epoch() -> None:
    # The stored study holds the last report: the demo's exported trial (best epoch 0.601) was drawn at 0.516.
    from mammo_ray import config, tune

    stored, board = _stored_sweep()
    cfg = config.load("demo")
    cfg.space = {"train.lr": {"type": "loguniform", "low": 1e-5, "high": 1e-2}}
    view = tune.plotted_study(stored, board, cfg)
    assert view.metric_names == ["val_auc"]
    states = [t.state for t in view.trials]
    assert states == [optuna.trial.TrialState.COMPLETE] * 2 + [optuna.trial.TrialState.FAIL]
    assert [t.values[0] for t in view.trials[:2]] == [0.61, 0.58]
    assert [t.user_attrs["epochs"] for t in view.trials] == [8, 2, 1]
    assert [t.user_attrs["exported"] for t in view.trials] == [True, False, False]
    assert [t.params for t in view.trials] == [t.params for t in stored.trials[:3]]
    assert len(stored.trials) == 4  # the stored study is left as it was


def test_plotted_study_keeps_trials_that_drew_the_same_values_and_odd_values() -> None:
    # Rows were keyed by their parameter tuple: two trials that drew the same sampler collapsed into one, a None
    # read back as NaN matched nothing, and a list-valued choice raised TypeError (all sweep plots lost).
    from mammo_ray import config, tune

    stored = optuna.create_study(direction="maximize", study_name="s")
    choices = {
        "train.sampler": optuna.distributions.CategoricalDistribution(["weighted", "simple"]),
        "train.pos_weight": optuna.distributions.CategoricalDistribution([None, 2.0]),
        "data.image_size": optuna.distributions.CategoricalDistribution([(64, 48), (128, 96)]),
    }
    drawn = [("weighted", None, (64, 48)), ("simple", 2.0, (128, 96)), ("weighted", None, (64, 48))]
    for values in drawn:
        params = dict(zip(choices, values, strict=True))
        stored.add_trial(optuna.trial.create_trial(params=params, distributions=choices, value=0.5))
    board = pd.DataFrame(
        {
            "trial_id": ["c", "b", "a"],
            "stop_reason": ["completed", "early_stopped (asha)", "completed"],
            "epochs": [8, 1, 8],
            "train.sampler": ["weighted", "simple", "weighted"],
            "train.pos_weight": [None, 2.0, None],  # NaN in a float column
            "data.image_size": [[64, 48], [128, 96], [64, 48]],
            "val_auc_best": [0.7, 0.6, 0.5],
        }
    )
    cfg = config.load("demo")
    cfg.space = {key: {"type": "choice", "values": []} for key in choices}
    view = tune.plotted_study(stored, board, cfg)
    assert len(view.trials) == 3
    assert sorted(t.values[0] for t in view.trials) == [0.5, 0.6, 0.7]
    assert [t.user_attrs["trial_id"] for t in view.trials if t.user_attrs["exported"]] == ["c"]


def test_sweep_plots_of_the_best_epochs_name_the_metric_and_the_exported_trial(tmp_path: Path, monkeypatch) -> None:
    from mammo_ray import config, tune

    stored, board = _stored_sweep()
    cfg = config.load("demo")
    cfg.space = {"train.lr": {"type": "loguniform", "low": 1e-5, "high": 1e-2}}
    view = tune.plotted_study(stored, board, cfg)
    labels: list[str] = []
    real_save = plots._save

    def save(fig, path):
        for ax in fig.axes:
            labels.extend([ax.get_ylabel(), ax.get_xlabel(), *(t.get_text() for t in ax.get_xticklabels())])
            legend = ax.get_legend()
            labels.extend(t.get_text() for t in legend.get_texts()) if legend else None
        return real_save(fig, path)

    monkeypatch.setattr(plots, "_save", save)
    plots.plot_sweep_history(view, tmp_path / "h.png")
    plots.plot_parallel_coordinates(view, tmp_path / "p.png")
    assert "val_auc, best epoch of each trial" in labels
    assert "val_auc (best epoch)" in labels and "train.lr (log)" in labels
    assert labels.count("exported (best trial)") == 2
    assert "stopped early" in labels and "objective" not in labels


def _legend_texts(monkeypatch) -> list[str]:
    texts: list[str] = []
    real_save = plots._save

    def save(fig, path):
        for ax in fig.axes:
            if ax.get_legend():
                texts.extend(t.get_text() for t in ax.get_legend().get_texts())
        return real_save(fig, path)

    monkeypatch.setattr(plots, "_save", save)
    return texts


@pytest.mark.parametrize(
    ("selected", "expected"),
    [
        (2, "exported epoch 2: validation AUC 0.620"),  # not the best AUC (0.700, epoch 4): the bundle's epoch
        (None, "best validation AUC 0.700 (epoch 4)"),
        (9, "best validation AUC 0.700 (epoch 4)"),  # an epoch the history does not hold
    ],
)
def test_curves_mark_the_bundles_epoch(selected, expected: str, tmp_path: Path, monkeypatch) -> None:
    texts = _legend_texts(monkeypatch)
    plots.plot_curves(HISTORIES["full"], tmp_path / "curves.png", selected_epoch=selected)
    assert expected in texts and "chance (AUC 0.5)" in texts


def test_the_test_split_gets_its_roc_pr_reliability_and_scores_with_the_validation_points(tmp_path, monkeypatch):
    texts = _legend_texts(monkeypatch)
    titles: list[str] = []
    real_save = plots._save

    def save(fig, path):
        titles.extend(ax.get_title() for ax in fig.axes)
        return real_save(fig, path)

    monkeypatch.setattr(plots, "_save", save)
    frame = FRAMES["normal"]
    cuts = metrics.operating_points(frame["label"], frame["prob"])
    written = plots.plot_test(frame, tmp_path, threshold=0.3, cuts=cuts)
    assert [p.name for p in written] == list(plots.TEST_PLOTS)
    for path in written:
        assert_png(path)
    sens, spec = metrics.sens_spec_at(frame["label"].to_numpy(), frame["prob"].to_numpy(), cuts["youden"])
    assert f"youden (validation threshold {cuts['youden']:.3f}): sens {sens:.2f}, spec {spec:.2f}" in texts
    prevalence = frame["label"].mean()
    assert f"prevalence {prevalence:.3f}" in texts  # reliability
    assert f"overall: no skill = prevalence {prevalence:.3f}" in texts  # PR baseline
    assert all("test" in t for t in titles if t and t != "")


def test_reliability_intervals_are_wilsons() -> None:
    from scipy.stats import binomtest

    positives, counts = np.array([0, 1, 3, 10]), np.array([4, 4, 281, 10])
    low, high = plots._wilson(positives, counts)
    for k, n, lo, hi in zip(positives, counts, low, high, strict=True):
        expected = binomtest(int(k), int(n)).proportion_ci(confidence_level=0.95, method="wilson")
        assert (lo, hi) == pytest.approx((expected.low, expected.high), abs=1e-9)


def test_plot_all_sweep(studies: dict[str, optuna.Study], tmp_path: Path) -> None:
    written = plots.plot_all_sweep(studies["normal"], tmp_path)
    assert [p.name for p in written] == list(plots.SWEEP_PLOTS)
    for path in written:
        assert_png(path)


def test_missing_columns_are_named(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="prob"):
        plots.plot_roc(FRAMES["normal"].drop(columns=["prob"]), tmp_path / "roc.png")


def test_referral_says_when_uncertainty_only_reranks_the_score(tmp_path, monkeypatch) -> None:
    # On the demo the probabilities lie in 0.19-0.66, so entropy ranks images exactly as prob does (rho 0.9996):
    # "defer the most uncertain" deferred the highest scores, and the label did not say so.
    texts = _legend_texts(monkeypatch)
    frame = FRAMES["normal"]
    plots.plot_referral(frame, tmp_path / "referral.png")
    entropy = [t for t in texts if t.startswith("by predictive entropy")]
    assert len(entropy) == 1 and "ρ with prob" in entropy[0]
    y = frame["label"].to_numpy().astype(bool)
    curve = metrics.referral_curve(y, frame["prob"].to_numpy(), plots._binary_entropy(frame["prob"].to_numpy()))
    last = curve.loc[curve["fraction"].idxmax()]
    assert (
        f"{int(last['n_positive_retained'])} of {int(y.sum())} positives kept at {last['fraction']:.0%}" in entropy[0]
    )


def _reliability_intervals(
    frame: pd.DataFrame, path: Path, monkeypatch, annotations: list[str] | None = None
) -> tuple[np.ndarray, list[str]]:
    """The overall curve's per-bin intervals as drawn ([[low, high], ...]), and the legend's texts; the figure's
    other texts are added to ``annotations`` when given."""
    from matplotlib.container import ErrorbarContainer

    drawn: list[np.ndarray] = []
    texts = _legend_texts(monkeypatch)
    inner = plots._save

    def save(fig, target):
        for ax in fig.axes:
            if annotations is not None:
                annotations.extend(text.get_text() for text in ax.texts)
            for container in ax.containers:
                if isinstance(container, ErrorbarContainer):
                    segments = container.lines[2][0].get_segments()
                    drawn.append(np.array([[seg[0][1], seg[1][1]] for seg in segments]))
        return inner(fig, target)

    monkeypatch.setattr(plots, "_save", save)
    plots.plot_reliability(frame, path)
    monkeypatch.setattr(plots, "_save", inner)
    assert len(drawn) == 1
    return drawn[0], texts


def test_reliability_intervals_count_a_womans_images_as_correlated(tmp_path, monkeypatch) -> None:
    """Each bin's Wilson interval treated a woman's four images as four independent cases: her images twice over
    narrowed it as much as twice the women would."""
    frame = predictions(seed=2)  # a breast's two views share its label
    twice = pd.concat([frame, frame.assign(image_id=frame["image_id"] + "_copy")], ignore_index=True)
    new_women = twice.assign(
        patient_id=np.where(twice["image_id"].str.endswith("_copy"), "copy", "") + twice["patient_id"]
    )
    once, texts = _reliability_intervals(frame, tmp_path / "once.png", monkeypatch)
    repeated, _ = _reliability_intervals(twice, tmp_path / "twice.png", monkeypatch)
    independent, _ = _reliability_intervals(new_women, tmp_path / "independent.png", monkeypatch)
    assert repeated == pytest.approx(once, abs=1e-9)  # the same women say no more about calibration
    widths = once[:, 1] - once[:, 0]
    assert ((independent[:, 1] - independent[:, 0]) < 0.85 * widths).all()  # twice the women do
    assert "95% Wilson interval, patients as clusters (design effect, t on patients - 1 df)" in texts
    # Per image, the plain Wilson interval, narrower than the clustered one where a woman's images share her label.
    per_image, texts = _reliability_intervals(frame.drop(columns="patient_id"), tmp_path / "image.png", monkeypatch)
    assert "95% Wilson interval, per image (no patient_id)" in texts
    assert (per_image[:, 1] - per_image[:, 0] <= widths + 1e-12).all()
    assert (per_image[:, 1] - per_image[:, 0] < widths - 1e-3).any()


def test_reliability_intervals_use_t_on_the_bins_patients_and_none_from_one_woman(tmp_path, monkeypatch) -> None:
    """The upper bins rest on 3-5 women, yet their intervals used z = 1.96 and a cluster variance without the
    finite-cluster factor; a bin of one woman with mixed labels counted her 4 images as 4 independent cases."""

    rows = [(f"n{i}", 0.05, 0) for i in range(30) for _ in range(2)]  # 30 women, all negative, bin 0
    rows += [("one", 0.65, label) for label in (1, 1, 0, 0)]  # one woman, mixed labels, bin 6
    rows += [
        (woman, 0.85, label) for woman, labels in (("a", (1, 1)), ("b", (1, 0)), ("c", (0, 0))) for label in labels
    ]
    frame = pd.DataFrame(rows, columns=["patient_id", "prob", "label"]).assign(
        image_id=lambda f: [f"img{i}" for i in range(len(f))], exam_id=lambda f: f["patient_id"] + "_E0",
        laterality="L", view="CC", dataset="CSAW", aleatoric=np.nan, epistemic=np.nan,
    )  # fmt: skip
    annotations: list[str] = []
    intervals, _ = _reliability_intervals(frame, tmp_path / "reliability.png", monkeypatch, annotations)
    assert len(intervals) == 2  # bins 0 and 8; none for the one woman of bin 6, and the figure says so
    assert "n=4, 1 patient: no interval" in annotations

    def wilson(share: float, n: float, q: float) -> list[float]:
        centre = (share + q * q / (2 * n)) / (1 + q * q / n)
        half = q * math.sqrt(share * (1 - share) / n + q * q / (4 * n * n)) / (1 + q * q / n)
        return [max(centre - half, 0.0), min(centre + half, 1.0)]

    # Bin 0: all negative, no variance to estimate: each of the 30 women once, t on 29 df (2.045, not 1.96).
    assert intervals[0] == pytest.approx(wilson(0.0, 30, 2.0452296), abs=1e-6)
    assert intervals[0][1] == pytest.approx(0.1223, abs=1e-4)
    # Bin 8: share 0.5 over 3 women with 2 images each; residuals (2-1)^2 + 0 + (0-1)^2 = 2, times 3/2 for 3
    # clusters = 3, over the binomial 6 x 0.25 = 1.5: design effect 2, effective 3 (was 4.5); t on 2 df = 4.303.
    assert intervals[1] == pytest.approx(wilson(0.5, 3, 4.3026527), abs=1e-6)
    assert intervals[1] == pytest.approx([0.036, 0.964], abs=1e-3)  # was 0.161-0.839
