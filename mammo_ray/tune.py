"""The sweep: ``python -m mammo_ray.tune --space FILE``.

Ray Tune runs one function trial per sampled configuration; each trial builds and fits a
``TorchTrainer`` (Train V2: ``Tuner(trainer)`` is gone) whose workers report once per epoch through
``TuneReportCallback``. Optuna's TPE (seeded, SQLite study at ``results/<name>/optuna.db`` for
optuna-dashboard) proposes configurations behind a concurrency limit, and ASHA stops weak trials on
the per-epoch validation metric, with ``time_attr="epoch"`` so its rungs survive ``--resume``.
At the end the sweep writes ``leaderboard.csv`` and the sweep plots, and exports the best trial's
best epoch to ``results/<name>/best/``.

With ``--storage s3://…`` or ``gs://…`` the sweep has two homes: Tune's trial folders and every trial's
Train run (checkpoints) go to ``<storage>/<name>/``, where all nodes can write, and the driver's own outputs
stay in ``results/<name>/`` on the driver: ``optuna.db`` is SQLite, which needs a local disk, and the
leaderboard, plots and ``best/`` are what the user opens. A local or NFS ``--storage`` holds both, as
``results/`` does without it.

This is the only module that builds a Tuner.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import yaml

from mammo_ray import config as config_mod
from mammo_ray import io, manifest, storage
from mammo_ray.export import STORAGE_POINTER, TRAIN_RUNS, auc_versus_chance

if TYPE_CHECKING:
    import optuna


def tune_space(space: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The space section as Tune distributions (OptunaSearch converts them to Optuna's)."""
    from ray import tune

    out = {}
    for key, spec in space.items():
        kind = spec["type"]
        step = spec.get("step")
        if kind == "loguniform":
            out[key] = tune.loguniform(spec["low"], spec["high"])
        elif kind == "uniform" and step:
            out[key] = tune.quniform(spec["low"], spec["high"], step)  # both bounds reachable
        elif kind == "uniform":
            out[key] = tune.uniform(spec["low"], spec["high"])
        elif kind == "int" and step and step > 1:
            out[key] = tune.qrandint(int(spec["low"]), int(spec["high"]), int(step))  # both bounds included
        elif kind == "int":
            # Tune's randint excludes the upper bound; the space file's int range includes it.
            out[key] = tune.randint(int(spec["low"]), int(spec["high"]) + 1)
        elif kind == "choice":
            out[key] = tune.choice(spec["values"])
        elif kind == "grid":
            out[key] = tune.grid_search(spec["values"])
    return out


def trial_function(
    params: dict[str, Any],
    *,
    base: dict[str, Any],
    manifests: dict[str, str | None],
    experiment: str,
    slots: Any = None,
) -> None:
    """One trial: the base config plus this trial's parameters, fitted by a TorchTrainer.

    ``experiment`` is the sweep's folder on its storage, a local path or a URI (Train takes either). ``slots`` is
    the sweep's :class:`mammo_ray.trial_slots.TrialSlots` actor: the trial waits for a slot before it starts.
    """
    import ray.tune

    from mammo_ray import trial_slots

    trial_id = ray.tune.get_context().get_trial_id()
    slot = trial_slots.Slot(slots, trial_id) if slots is not None else None
    if slot is not None:
        _SLOTS[trial_id] = slot
        slot.acquire()
        if slot.released:  # Tune stopped the trial while it waited
            return
    try:
        _fit_trial(params, base, manifests, experiment, trial_id)
    finally:
        if slot is not None:
            slot.release()
            _SLOTS.pop(trial_id, None)


def _fit_trial(
    params: dict[str, Any], base: dict[str, Any], manifests: dict[str, str | None], experiment: str, trial_id: str
) -> None:
    from ray.tune.integration.ray_train import TuneReportCallback

    from mammo_ray import train

    cfg = config_mod.from_dict(base, source="sweep config", overrides=params)
    frames = manifest.load_manifests(manifests, check_files=False, use_cache=cfg.data.use_cache)
    runs = str(storage.join(experiment, TRAIN_RUNS))
    # A fixed Train run name per trial lets a restarted trial (--resume, max_failures) find its checkpoints.
    run_name = f"trial_{trial_id}"
    storage.write_text(storage.join(runs, run_name, "config.yaml"), config_mod.dump(cfg))
    stopper = train.RunStopper()
    trainer = train.make_trainer(
        cfg, frames, run_name=run_name, storage_path=runs, callbacks=[TuneReportCallback()], stopper=stopper
    )
    _RUNNING[trial_id] = stopper
    try:
        result = stopper.fit(trainer)
    finally:
        _RUNNING.pop(trial_id, None)
    # The loop returns its non-finite report (Train V2 keeps only reports with a checkpoint in result.metrics).
    final = result.return_value if isinstance(result.return_value, dict) else (result.metrics or {})
    if final.get("nonfinite_loss"):
        raise train.NonFiniteLossError(
            f"non-finite training loss in epoch {final.get('epoch')} (lr {cfg.train.lr:.3g})"
        )


# The Train runs of the trials in this process (a trial actor runs one trial), by trial id, so that
# _StopRunFirst can reach its trial's run.
_RUNNING: dict[str, Any] = {}
# The trial slots (trial_slots.Slot) held or awaited by the trials in this process, by trial id.
_SLOTS: dict[str, Any] = {}
# How long a stopped trial waits for its Train run to leave: a step, the controller's shutdown and, when the stop
# comes early, the worker group's start-up.
STOP_TIMEOUT_S = 60.0


class _StopRunFirst:
    """Mixin of the trial trainable: when Tune stops the trial, its Train run stops cooperatively first.

    Tune ends a stopped trial's actor right after ``cleanup``; without this the run's workers would be killed
    mid-pass, and their Ray Data budget would stay reserved for minutes (see ``train.RunStopper``).
    """

    def cleanup(self):
        stopper = _RUNNING.get(self.trial_id)
        if stopper is not None and not stopper.stop(STOP_TIMEOUT_S):
            print(
                f"warning: trial {self.trial_id}: its Train run did not stop within {STOP_TIMEOUT_S:.0f} s",
                file=sys.stderr,
            )
        slot = _SLOTS.get(self.trial_id)
        if slot is not None:  # after the run has left: the next trial's run must not meet this one's
            slot.release()
        super().cleanup()


# Tune builds the trial's Trainable class from the function and its __mixins__ (kept by tune.with_parameters).
trial_function.__mixins__ = (_StopRunFirst,)


def make_trainable(cfg: config_mod.Config, manifests: dict[str, str | None], experiment: str | Path, slots: Any = None):
    """The Tune trainable, with the small trial actor that only drives a TorchTrainer.

    ``slots``: the sweep's :class:`mammo_ray.trial_slots.TrialSlots` actor (None: trials take no slot).
    """
    from ray import tune

    base = cfg.to_dict()
    base["space"] = {}
    trainable = tune.with_parameters(
        trial_function, base=base, manifests=manifests, experiment=str(experiment), slots=slots
    )
    return tune.with_resources(trainable, {"cpu": cfg.resources.trial_cpus})


def make_searcher(cfg: config_mod.Config, out_dir: Path):
    """Seeded Optuna TPE with its study in SQLite (optuna-dashboard reads it), or seeded random search.

    ``out_dir`` is the driver's local output folder (:func:`output_dir`): SQLite needs a local disk.
    """
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.basic_variant import BasicVariantGenerator

    if cfg.search.searcher == "random":
        return BasicVariantGenerator(random_state=cfg.search.seed, max_concurrent=cfg.resources.max_concurrent_trials)
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    study_storage = optuna.storages.RDBStorage(url=f"sqlite:///{(out_dir / 'optuna.db').resolve()}")
    searcher = OptunaSearch(
        metric=cfg.search.metric,
        mode=cfg.search.mode,
        sampler=optuna.samplers.TPESampler(seed=cfg.search.seed),
        storage=study_storage,
        study_name=cfg.name,
    )
    return ConcurrencyLimiter(searcher, max_concurrent=cfg.resources.max_concurrent_trials)


def make_scheduler(cfg: config_mod.Config):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if cfg.search.scheduler == "fifo":
        return FIFOScheduler()
    return ASHAScheduler(
        time_attr="epoch",
        max_t=cfg.train.epochs,
        grace_period=min(cfg.search.grace_period, cfg.train.epochs),
        reduction_factor=cfg.search.reduction_factor,
    )


def make_tuner(cfg: config_mod.Config, trainable, results: Path, storage_location: str | None = None):
    """The sweep's Tuner over ``trainable`` (:func:`make_trainable`)."""
    from ray import tune

    return tune.Tuner(
        trainable,
        param_space=tune_space(cfg.space),
        tune_config=tune.TuneConfig(
            metric=cfg.search.metric,
            mode=cfg.search.mode,
            search_alg=make_searcher(cfg, output_dir(cfg, results, storage_location)),
            scheduler=make_scheduler(cfg),
            num_samples=cfg.search.num_samples,
            # Not here: Optuna's ConcurrencyLimiter and the random search's BasicVariantGenerator (make_searcher)
            # hold the limit; Tune ignores this setting for a BasicVariantGenerator, with a warning.
        ),
        run_config=tune.RunConfig(
            name=cfg.name,
            # A URI goes to Ray as given: Ray resolves it with pyarrow.fs.FileSystem.from_uri, as mammo_ray.storage
            # does, so query options (an S3-compatible endpoint) reach both.
            storage_path=str(storage_location or results.resolve()),
            # Retries happen inside each trial's TorchTrainer (resources.max_failures); a trial that still
            # fails is recorded and the sweep goes on.
            failure_config=tune.FailureConfig(max_failures=0),
            verbose=1,
        ),
    )


def experiment_path(cfg: config_mod.Config, results: Path, storage_location: str | None = None) -> str | Path:
    """Where Tune and Train write the sweep: ``<storage>/<name>``, or ``<results>/<name>`` without ``--storage``.

    A URI stays a URI string (its query, e.g. an S3 endpoint, kept at the end); a path stays a ``Path``.
    """
    if not storage_location:
        return results.resolve() / cfg.name
    return storage.join(storage_location, cfg.name)


def output_dir(cfg: config_mod.Config, results: Path, storage_location: str | None = None) -> Path:
    """The local folder for the driver's outputs (config, manifests.json, optuna.db, leaderboard, plots, best/).

    It is the experiment folder itself unless that is a URI; then it is ``<results>/<name>`` on the driver,
    because the Optuna study is SQLite, which needs a local file system.
    """
    experiment = experiment_path(cfg, results, storage_location)
    return results.resolve() / cfg.name if storage.is_uri(str(experiment)) else Path(experiment)


# --------------------------------------------------------------------------------------------------
# Outputs.


def unfinished_trials(experiment_dir: str | Path) -> dict[str, str]:
    """Trials that the sweep's saved state holds as neither terminated nor errored, with their status.

    After Ctrl-C, Tune stops the running trials and marks them TERMINATED in memory, but the state it
    saved for ``--resume`` still has them RUNNING or PENDING; that saved state is what tells an interrupted
    sweep from a finished one.
    """
    from ray.tune import ExperimentAnalysis

    try:
        trials = ExperimentAnalysis(str(experiment_dir)).trials
    except Exception as err:  # the leaderboard is still written; it just cannot flag interrupted trials
        print(f"warning: cannot read the sweep state in {storage.public(experiment_dir)}: {err}", file=sys.stderr)
        return {}
    return {t.trial_id: t.status for t in trials if t.status not in ("TERMINATED", "ERROR")}


def _stop_reason(result, cfg: config_mod.Config, epochs: int, unfinished: bool = False) -> str:
    if unfinished:
        return "interrupted (continue with --resume)"
    if result.error is not None:
        first = str(result.error).strip().splitlines()
        text = next((line for line in reversed(first) if "Error" in line), first[-1] if first else "error")
        return f"error: {text[:300]}"
    if epochs >= cfg.train.epochs:
        return "completed"
    return "early_stopped (asha)" if cfg.search.scheduler == "asha" else "stopped"


def leaderboard(result_grid, cfg: config_mod.Config, unfinished: dict[str, str] | None = None) -> pd.DataFrame:
    """One row per trial: id, status, why it stopped, epochs, searched keys, best and last metric.

    ``unfinished`` maps the ids of trials an interrupted sweep left unfinished to their saved status.
    """
    metric = cfg.search.metric
    unfinished = unfinished or {}
    rows = []
    for result in result_grid:
        history = result.metrics_dataframe if result.metrics_dataframe is not None else pd.DataFrame()
        values = pd.to_numeric(history[metric], errors="coerce") if metric in history else pd.Series(dtype=float)
        epochs = int(history["epoch"].max()) if "epoch" in history and len(history) else 0
        config = result.config or {}
        trial_id = (result.metrics or {}).get("trial_id") or Path(result.path).name
        row = {
            "trial_id": trial_id,
            "status": "ERROR" if result.error is not None else unfinished.get(trial_id, "TERMINATED"),
            "stop_reason": _stop_reason(result, cfg, epochs, unfinished=trial_id in unfinished),
            "epochs": epochs,
        }
        for key in cfg.space:
            row[key] = config.get(key)
        best = values.max() if cfg.search.mode == "max" else values.min()
        row[f"{metric}_best"] = None if values.dropna().empty else float(best)
        row[f"{metric}_last"] = None if values.dropna().empty else float(values.dropna().iloc[-1])
        rows.append(row)
    frame = pd.DataFrame(rows)
    if not frame.empty:
        frame = frame.sort_values(f"{metric}_best", ascending=cfg.search.mode == "min", na_position="last")
    return frame.reset_index(drop=True)


def _param_key(values: list[Any]) -> str:
    """A hashable, type-stable key of a trial's parameter values: NaN (pandas' None) as None, 2.0 as 2, lists kept."""

    def plain(value: Any) -> Any:
        if isinstance(value, float | np.floating):
            if math.isnan(value):
                return None
            return int(value) if float(value).is_integer() else float(value)
        if isinstance(value, np.integer):
            return int(value)
        if isinstance(value, list | tuple | np.ndarray):
            return [plain(v) for v in value]
        return value

    return json.dumps([plain(v) for v in values], sort_keys=True, default=str)


def plotted_study(stored: optuna.Study, board: pd.DataFrame, cfg: config_mod.Config) -> optuna.Study:
    """The sweep as its plots show it: an in-memory study with each trial at its best epoch's metric.

    The stored study holds what Ray's searcher told Optuna, each trial's *last* report; the leaderboard and the
    export pick the best epoch, so plots of the stored values showed the exported trial at its last epoch (0.516
    instead of 0.601 in the demo) and every ASHA-stopped trial as complete. Trials keep their numbers (start order)
    and carry ``epochs``, ``stop_reason``, ``trial_id`` and ``exported`` (the leaderboard's first row) as user
    attributes; a trial without a finite best value (an error, not yet reported) is kept as failed.
    """
    import optuna
    from optuna.trial import TrialState

    metric = cfg.search.metric
    keys = list(cfg.space)
    best_column = f"{metric}_best"
    # Trials are matched to leaderboard rows by their parameters; trials that drew the same values (a small discrete
    # space) take the rows of those values one each, so none is lost and the exported one is marked once.
    rows: dict[str, list[dict]] = {}
    for row in board.to_dict("records"):
        rows.setdefault(_param_key([row.get(k) for k in keys]), []).append(row)
    exported = board.iloc[0]["trial_id"] if len(board) and pd.notna(board.iloc[0].get(best_column)) else None
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # not "A new study created in memory"
    try:
        view = optuna.create_study(directions=stored.directions, study_name=stored.study_name)
    finally:
        optuna.logging.set_verbosity(verbosity)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        view.set_metric_names([metric])
    for trial in stored.get_trials(deepcopy=False):
        matches = rows.get(_param_key([trial.params.get(k) for k in keys]))
        if not matches:
            continue  # asked for, never started
        row = matches.pop(0)
        value = row.get(best_column)
        finite = value is not None and math.isfinite(float(value))
        view.add_trial(
            optuna.trial.create_trial(
                state=TrialState.COMPLETE if finite else TrialState.FAIL,
                params=trial.params,
                distributions=trial.distributions,
                value=float(value) if finite else None,
                user_attrs={
                    "epochs": int(row.get("epochs") or 0),
                    "stop_reason": str(row.get("stop_reason", "")),
                    "trial_id": str(row.get("trial_id", "")),
                    "exported": bool(row.get("trial_id") == exported),
                },
            )
        )
    return view


def sweep_plots(experiment_dir: Path, board: pd.DataFrame, cfg: config_mod.Config) -> list[Path]:
    import optuna

    from mammo_ray import plots

    db = experiment_dir / "optuna.db"
    if not db.is_file():
        return []
    stored = optuna.load_study(study_name=cfg.name, storage=f"sqlite:///{db.resolve()}")
    study = plotted_study(stored, board, cfg)
    out = experiment_dir / "plots"
    return [
        plots.plot_sweep_history(study, out / "sweep_history.png"),
        plots.plot_param_importance(study, out / "param_importance.png"),
        plots.plot_parallel_coordinates(study, out / "parallel_coordinates.png"),
    ]


def _auc_text(split: dict) -> str:
    auc, ci = split.get("auc"), split.get("auc_ci95")
    if auc is None:
        return "n/a"
    return f"{auc:.3f}" + (f" (95% CI {ci[0]:.3f}–{ci[1]:.3f})" if ci and ci[0] is not None else "")


def auc_caveats(split: dict, candidates: int, has_test: bool) -> list[str]:
    """What a reader of the printed AUC should know: a figure picked as the best of several checkpoints on the
    same split is optimistic, and an interval that holds 0.5 does not show the model beats chance."""
    auc, ci = split.get("auc"), split.get("auc_ci95")
    if auc is None:
        return []
    lines = []
    if candidates > 1:
        lines.append(
            f"picked as the best of {candidates} trial-epochs on this split, so it is optimistic; "
            + ("the test AUC below is not" if has_test else "pass --test for a figure that is not")
        )
    versus_chance = auc_versus_chance(ci)
    if versus_chance:
        lines.append(f"its 95% CI {versus_chance}")
    return lines


def summary_table(board: pd.DataFrame, cfg: config_mod.Config) -> str:
    metric = cfg.search.metric
    columns = ["trial_id", "status", "stop_reason", "epochs", *cfg.space.keys(), f"{metric}_best"]
    shown = board[[c for c in columns if c in board.columns]].copy()
    for column in shown.columns:
        if shown[column].dtype.kind == "f":
            shown[column] = shown[column].map(lambda v: "n/a" if pd.isna(v) else f"{v:.4g}")
    return shown.to_string(index=False)


# --------------------------------------------------------------------------------------------------
# The command.


def build_parser() -> argparse.ArgumentParser:
    from mammo_ray import cli

    parser = argparse.ArgumentParser(prog="mammo-ray tune", description="Run a hyper-parameter sweep on Ray.")
    parser.add_argument("--space", required=True, help="space file: a path, or a name looked up in search_spaces/")
    parser.add_argument("--train", help="training manifest")
    parser.add_argument("--valid", help="validation manifest")
    parser.add_argument("--test", help="test manifest (scored by the exported best model)")
    parser.add_argument("--name", help="sweep name (default: the space file's name)")
    parser.add_argument("--results", default="results", help="output root (default: results/)")
    parser.add_argument("--address", help="join an existing Ray cluster, e.g. auto or ray://host:10001")
    parser.add_argument(
        "--storage",
        help="shared storage for trial folders and checkpoints on multi-node runs: s3://BUCKET/PREFIX, "
        "gs://BUCKET/PREFIX (options as query parameters, e.g. ?endpoint_override=...) or an NFS path",
    )
    parser.add_argument("--dashboard-host", default="127.0.0.1", help="dashboard bind address (default 127.0.0.1)")
    parser.add_argument("--num-samples", type=cli.int_at_least(1), help="number of trials")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted sweep of the same name")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier sweep of the same name")
    parser.add_argument("--smoke-test", action="store_true", help="two trials, one epoch, a handful of images, CPU")
    parser.add_argument("--dry-run", action="store_true", help="print config, space and resource plan; no Ray")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    parser.add_argument("-v", "--verbose", action="store_true")
    return parser


def dry_run_text(cfg: config_mod.Config) -> str:
    from mammo_ray import train

    plan = train.resources_plan(cfg)
    return (
        "# resolved config\n"
        + config_mod.dump(cfg)
        + "\n# search space\n"
        + (yaml.safe_dump(cfg.space, sort_keys=False) if cfg.space else "{}  # nothing searched\n")
        + "\n# resources per trial\n"
        + yaml.safe_dump(plan, sort_keys=False)
    )


def main(argv: list[str] | None = None) -> int:
    from mammo_ray import cli

    args = build_parser().parse_args(argv)
    cli.setup_logging(args.verbose)
    try:
        overrides = dict(config_mod.parse_override(item) for item in args.set)
        if args.name:
            overrides["name"] = args.name
        if args.num_samples is not None:
            overrides["search.num_samples"] = args.num_samples
        cfg = config_mod.load(args.space, overrides)
        if args.smoke_test:
            cli.apply_smoke_test(cfg)
            if args.num_samples is not None:
                cfg.search.num_samples = args.num_samples
        config_mod.check_searched_overrides(cfg, overrides, str(config_mod.resolve_space_path(args.space)))
        cli.resolve_weights(cfg)
        if not args.dry_run:
            cli.check_data_given(cfg, args)  # first: it needs no torch import, so it answers in a fraction of a second
        cli.check_model(cfg)
        if args.dry_run:
            print(dry_run_text(cfg))
            return 0
    except (config_mod.ConfigError, cli.DataMissingError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    # A local --storage reaches Ray as an absolute path (Ray reads a relative one as a URI without a scheme).
    args.storage = cli.absolute_path(args.storage)
    results = Path(args.results)
    experiment = experiment_path(cfg, results, args.storage)
    out_dir = output_dir(cfg, results, args.storage)
    try:
        # A bad URI, a missing bucket or missing credentials fail here, naming the URI, before Ray starts.
        if args.storage:
            storage.check_reachable(args.storage)
        taken = [location for location in dict.fromkeys([experiment, out_dir]) if storage.exists(location)]
    except storage.StorageError as err:
        print(f"error: --storage {err}", file=sys.stderr)
        return 2
    if taken and not (args.resume or args.overwrite):
        print(
            f"error: {storage.public(taken[0])} already holds a sweep named {cfg.name!r}; pass --resume to continue "
            "it, --overwrite to replace it, or --name for a new one",
            file=sys.stderr,
        )
        return 2
    if taken and args.overwrite and not args.resume:
        try:
            foreign = [location for location in taken if not holds_a_sweep(location)]
        except storage.StorageError as err:
            print(f"error: --storage {err}", file=sys.stderr)
            return 2
        if foreign:
            print(
                f"error: --overwrite would delete {storage.public(foreign[0])}, which does not hold a mammo_ray "
                f"sweep (no {' or '.join(SWEEP_MARKERS)}); choose another --name, or remove that folder yourself",
                file=sys.stderr,
            )
            return 2
    return run_sweep(cfg, args, results, experiment, out_dir)


# Files that only a sweep's folder holds: ours (write_sweep_files, before Ray starts) and Tune's experiment state.
SWEEP_MARKERS = ("manifests.json", "tuner.pkl")


def holds_a_sweep(location: str | Path) -> bool:
    """Whether ``--overwrite`` may delete ``location``: it holds a sweep's files, or nothing at all."""
    if any(storage.is_file(storage.join(location, marker)) for marker in SWEEP_MARKERS):
        return True
    return not storage.is_uri(str(location)) and Path(location).is_dir() and not any(Path(location).iterdir())


def run_sweep(cfg: config_mod.Config, args, results: Path, experiment: str | Path, out_dir: Path) -> int:
    """Validate the data, start Ray, run the sweep, write the driver's outputs and export the best trial.

    Args:
        experiment: where Tune and Train write (:func:`experiment_path`), local or a URI.
        out_dir: the driver's local output folder (:func:`output_dir`); the same folder unless ``experiment``
            is a URI.
    """
    from ray import tune

    from mammo_ray import cli, export, trial_slots

    started = time.perf_counter()
    try:
        # Given manifests are validated before any Ray resource is taken; the synthetic set needs Ray to prepare.
        frames = None if cli.needs_synthetic(cfg, args) else cli.resolve_data(cfg, args)
        ray_info = cli.start_ray(address=args.address, dashboard_host=args.dashboard_host, verbose=args.verbose)
        check_storage(args)
        cli.check_placement(cfg)
        fit_concurrency(cfg)
        if frames is None:
            frames = cli.resolve_data(cfg, args)
    except (manifest.ManifestError, cli.DataMissingError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    manifests = {role: frame.attrs.get("path") for role, frame in frames.items()}
    remote = storage.is_uri(str(experiment))
    try:
        if args.overwrite and not args.resume:
            if out_dir.exists():
                shutil.rmtree(out_dir)
            if remote:
                storage.delete_dir(experiment)
        write_sweep_files(cfg, manifests, experiment, out_dir)
    except storage.StorageError as err:
        print(f"error: --storage {err}", file=sys.stderr)
        return 2
    for role, frame in frames.items():
        counts = manifest.summary(frame)
        print(f"{role}: {counts['n_images']} images, {counts['n_positive']} positive, {counts['n_patients']} patients")

    # The searcher holds back new suggestions beyond the limit; restored trials bypass it, so the trials hold it too.
    trainable = make_trainable(cfg, manifests, experiment, trial_slots.start(cfg.resources.max_concurrent_trials))
    if args.resume and tune.Tuner.can_restore(str(experiment)):
        print(f"resuming the sweep in {storage.public(experiment)}")
        # resume_errored, not restart_errored: a restarted trial gets a new id that OptunaSearch has never seen, and
        # its first report raised KeyError in the searcher and ended the sweep; resumed, it keeps its id and its
        # Train run goes on from its last checkpoint.
        tuner = tune.Tuner.restore(str(experiment), trainable=trainable, resume_errored=True)
    else:
        tuner = make_tuner(cfg, trainable, results, args.storage)
    grid = tuner.fit()

    unfinished = unfinished_trials(experiment)
    board = leaderboard(grid, cfg, unfinished)
    io.atomic_write_csv(out_dir / "leaderboard.csv", board)
    if remote:
        try:  # a copy beside the trial folders, for whoever browses the bucket; the local file is the record
            storage.write_text(storage.join(experiment, "leaderboard.csv"), board.to_csv(index=False))
        except storage.StorageError as err:
            print(f"warning: {err}", file=sys.stderr)
    try:
        sweep_plots(out_dir, board, cfg)
    except Exception as err:  # plots never cost the sweep's results
        print(f"warning: sweep plots failed: {err}", file=sys.stderr)
    print("\n" + summary_table(board, cfg))
    if unfinished:
        # Ctrl-C: Tune saved its state; the partial sweep is not exported as if it had finished.
        print(
            f"\nsweep interrupted; continue it with the same command plus --resume ({storage.public(experiment)})",
            file=sys.stderr,
        )
        return 130
    trial_epochs = int(pd.to_numeric(board["epochs"], errors="coerce").fillna(0).sum()) if "epochs" in board else 0
    try:
        checkpoints = export.find_checkpoints(experiment)
        checkpoint = export.best_checkpoint(experiment, cfg.search.metric, cfg.search.mode, table=checkpoints)
    except (FileNotFoundError, ValueError, storage.StorageError) as err:
        print(f"error: nothing to export: {err}", file=sys.stderr)
        return 1
    try:
        # From a URI only the files of the one best checkpoint are downloaded (to a temporary folder).
        bundle = export.export_bundle(
            checkpoint,
            out_dir / "best",
            cfg,
            frames,
            sweep_info={"metric": cfg.search.metric, "candidates": trial_epochs},
            history_from=export.last_checkpoint(experiment, checkpoint, table=checkpoints),
        )
    except (storage.StorageError, export.CheckpointError) as err:
        print(f"error: cannot export the best checkpoint: {err}", file=sys.stderr)
        return 1
    metrics = json.loads((bundle / "metrics.json").read_text())
    elapsed = time.perf_counter() - started
    trial = storage.name(storage.parent(checkpoint))
    print(f"\nbest trial: {trial}, epoch {metrics['selected'].get('epoch')}")
    test = metrics.get("test") or {}
    print(f"best validation AUC: {_auc_text(metrics['val'])}")
    for line in auc_caveats(metrics["val"], trial_epochs, has_test=test.get("auc") is not None):
        print(f"  {line}")
    if test.get("auc") is not None:
        print(f"test AUC of the exported model: {_auc_text(test)}")
        for line in auc_caveats(test, 1, has_test=True):
            print(f"  {line}")
    print(f"bundle: {bundle}")
    print(f"leaderboard: {out_dir / 'leaderboard.csv'}   optuna study: {out_dir / 'optuna.db'}")
    if remote:
        print(f"trial folders and checkpoints: {storage.public(experiment)}")
    if ray_info.get("dashboard_url"):
        print(f"Ray dashboard: {ray_info['dashboard_url']} (while this process runs)")
    print(f"sweep time: {elapsed:.0f} s")
    return 0


def write_sweep_files(
    cfg: config_mod.Config, manifests: dict[str, str | None], experiment: str | Path, out_dir: Path
) -> None:
    """The sweep's config.yaml and manifests.json in ``out_dir``, and, for a URI experiment, on the URI too.

    The copies on the URI let ``export --experiment <URI>`` work from any machine; ``storage.json`` in
    ``out_dir`` lets ``export --experiment results/<name>`` find the checkpoints. URIs are written without
    credentials. Each file on an object store is one upload, which appears whole or not at all.
    """
    recorded = {role: storage.public(path) if path else path for role, path in manifests.items()}
    out_dir.mkdir(parents=True, exist_ok=True)
    config_mod.save(cfg, out_dir / "config.yaml")
    io.atomic_write_json(out_dir / "manifests.json", recorded)
    if not storage.is_uri(str(experiment)):
        return
    io.atomic_write_json(out_dir / STORAGE_POINTER, {"experiment": storage.public(experiment)})
    storage.write_text(storage.join(experiment, "config.yaml"), config_mod.dump(cfg))
    storage.write_text(storage.join(experiment, "manifests.json"), json.dumps(recorded, indent=2) + "\n")


def fit_concurrency(
    cfg: config_mod.Config, total: float | None = None, *, single_run: bool = False, fixed: bool | None = None
) -> None:
    """Cap concurrent trials so that Ray Data keeps at least one whole CPU free on this cluster.

    Ray Data's tasks need a whole CPU; if the trials' reservations leave less than one, every trial's data
    pipeline waits forever ("backpressured"). On GPU clusters the per-node layout matters too (see README).
    ``total`` is the cluster's CPU count (default: asked from Ray). Also warns when ``resources.torch_threads``
    asks for more torch threads than the cluster has CPUs: threads are not reserved, so they would compete.
    ``single_run``: the ``train`` command's one run, which has no trial actor and no concurrency to cap.
    ``fixed``: whether the cluster cannot grow (default: :func:`cli.cluster_is_fixed`). Only then is the cap applied,
    or a run that cannot fit refused. On a cluster that an autoscaler may grow, ``total`` is a snapshot: every
    shipped cluster config starts with no GPU node, and a cap taken from the head alone held KubeRay's adamw sweep
    at 3 trials for its whole run. There it only warns.
    """
    if fixed is None:
        from mammo_ray import cli

        fixed = cli.cluster_is_fixed()
    if total is None:
        import ray

        total = ray.cluster_resources().get("CPU", 0.0)
    res = cfg.resources
    per_trial = (0.0 if single_run else res.trial_cpus) + res.num_workers * res.cpus_per_worker
    if per_trial <= 0 or total <= 0:
        return
    fitting = int((total - 1.0) // per_trial)
    # What to say on a joined cluster: the rule that matters there is per GPU node (cluster/README.md).
    may_grow = (
        "as this process joined the cluster and an autoscaler may add nodes (the run waits for them). Keep workers "
        "on a node × resources.cpus_per_worker ≤ the node's CPUs − 2 for Ray Data"
    )
    if fitting < 1:
        problem = (
            f"one {'run' if single_run else 'trial'} reserves {per_trial:g} CPUs of the cluster's {total:g}, leaving "
            "Ray Data less than one CPU"
        )
        if fixed:
            raise ValueError(f"{problem}; lower resources.cpus_per_worker or resources.num_workers")
        print(
            f"warning: {problem} now; not refused, {may_grow}. If no node will join, lower "
            "resources.cpus_per_worker or resources.num_workers",
            file=sys.stderr,
        )
    elif not single_run and res.max_concurrent_trials > fitting:
        if fixed:
            print(
                f"warning: {res.max_concurrent_trials} concurrent trials × {per_trial:g} CPUs would leave Ray "
                f"Data less than one of the cluster's {total:g} CPUs; running {fitting} at a time",
                file=sys.stderr,
            )
            res.max_concurrent_trials = fitting
        else:
            print(
                f"warning: {res.max_concurrent_trials} concurrent trials × {per_trial:g} CPUs would leave Ray Data "
                f"less than one of the cluster's {total:g} CPUs now; resources.max_concurrent_trials is not "
                f"lowered, {may_grow}. If no node will join, set resources.max_concurrent_trials={fitting}",
                file=sys.stderr,
            )
    concurrent = 1 if single_run else res.max_concurrent_trials
    threads = res.torch_threads * res.num_workers * concurrent
    if threads > total:
        print(
            f"warning: resources.torch_threads {res.torch_threads} × {res.num_workers} worker(s) × "
            f"{concurrent} concurrent trial(s) = {threads} torch threads on the cluster's {total:g} "
            "CPUs; they will compete for cores (0 lets Ray set them from the CPUs each worker holds)",
            file=sys.stderr,
        )


def check_storage(args) -> None:
    """Multi-node sweeps need shared storage: refuse a local results folder on a multi-node cluster."""
    if args.storage:
        return
    from mammo_ray import cli

    cli.check_shared_storage(
        args.results, "pass --storage s3://…, gs://… or a shared NFS path so every node can write checkpoints"
    )


if __name__ == "__main__":
    # The importable module's main, not this ``__main__`` copy's: Ray pickles ``__main__`` by value (see prepare.py).
    from mammo_ray import tune as _module

    raise SystemExit(_module.main())
