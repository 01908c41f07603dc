"""Sweep efficiency: OptunaSearch + ASHA against random search without early stopping, same trial count.

Both sweeps run through ``tune.main`` (the ``python -m mammo_ray.tune`` entry) on the prepared synthetic
set with the demo space file, the same ``--set`` overrides, the same seed and the same number of trials,
under separate ``--name``s in a temporary results folder:

* ours: ``search.searcher=optuna``, ``search.scheduler=asha`` (TPE behind the concurrency limit, ASHA on the
  per-epoch validation AUC with ``time_attr="epoch"``);
* baseline: ``search.searcher=random``, ``search.scheduler=fifo`` (every trial runs all its epochs).

Trial-epochs are counted from each sweep's ``leaderboard.csv`` (``epochs`` column: the epochs each trial
reported). The headline is trials per trial-epoch, so that ``ratio`` = ours/baseline = trial-epochs of the
random search / trial-epochs of ours (higher is better). The JSON also holds both best validation AUCs
(``val_auc_best``) and whether ours is within 0.01 of random's best. The ratio counts only when it is
(``ratio_valid``): ours' best AUC is no more than 0.01 below random's, and no trial on either side errored (an
errored trial's few epochs would pass for cheap ones); otherwise ``ratio_invalid_reason`` says why and
``meets_target`` is false. On the small quick set the AUCs are noisy; the quick mode checks the mechanics, the
full mode gives the figure.

    python benchmarks/sweep_efficiency.py --quick --out sweep_efficiency.json
"""

from __future__ import annotations

import contextlib
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

AUC_TOLERANCE = 0.01


def run_sweep(
    name: str, results: Path, manifests: dict[str, str], overrides: dict[str, object], timeout_s: float
) -> dict:
    """One ``tune.main`` sweep; its leaderboard summarised."""
    import pandas as pd

    from mammo_ray import tune

    argv = ["--space", "demo", "--name", name, "--results", str(results)]
    argv += ["--train", manifests["train"], "--valid", manifests["valid"]]
    for key, value in overrides.items():
        argv += ["--set", f"{key}={value}"]
    start = time.perf_counter()
    # Tune's trial tables go to stderr, so that stdout carries only the JSON result.
    with contextlib.redirect_stdout(sys.stderr), common.Watchdog(timeout_s, f"sweep {name}") as watchdog:
        code = tune.main(argv)
    wall = time.perf_counter() - start
    if watchdog.fired:
        raise RuntimeError(f"sweep {name!r} was stopped by the watchdog after {timeout_s:.0f} s; no figure")
    board_path = results / name / "leaderboard.csv"
    if code != 0 or not board_path.is_file():
        raise RuntimeError(f"sweep {name!r} failed (exit code {code}); see the log above")
    board = pd.read_csv(board_path)
    auc = pd.to_numeric(board.get("val_auc_best"), errors="coerce")
    return {
        "trials": len(board),
        "trial_epochs": int(board["epochs"].sum()),
        "epochs_per_trial": [int(v) for v in board["epochs"]],
        "errored_trials": int((board["status"] == "ERROR").sum()),
        "stop_reasons": board["stop_reason"].value_counts().to_dict(),
        "best_val_auc": None if auc.dropna().empty else float(auc.max()),
        "wall_s": wall,
        "command": "python -m mammo_ray.tune " + " ".join(argv),
    }


def ratio_invalid_reason(ours: dict, baseline: dict, within: bool | None) -> str | None:
    """Why the trial-epoch ratio does not count, or None when it does.

    The requirement compares trial-epochs only when ours' best AUC is no more than ``AUC_TOLERANCE`` below random's;
    an errored trial stops after few epochs and would pass for a cheap one, on either side.
    """
    reasons = []
    if within is None:
        reasons.append(
            f"no best validation AUC to compare (ours {ours['best_val_auc']}, random {baseline['best_val_auc']})"
        )
    elif not within:
        reasons.append(
            f"ours' best validation AUC {ours['best_val_auc']:.3f} is more than {AUC_TOLERANCE} below "
            f"random's {baseline['best_val_auc']:.3f}"
        )
    for label, sweep in (("ours", ours), ("random", baseline)):
        if sweep["errored_trials"]:
            reasons.append(f"{sweep['errored_trials']} of {label}'s {sweep['trials']} trials errored")
    return "; ".join(reasons) or None


def main(argv: list[str] | None = None) -> int:
    parser = common.base_parser(__doc__.split("\n\n")[0])
    positive = common.int_at_least(1)
    parser.add_argument("--trials", type=positive, help="trials per sweep (quick 4, full 16)")
    parser.add_argument("--epochs", type=positive, help="max epochs per trial (quick 4, full 8)")
    parser.add_argument("--grace-period", type=positive, help="ASHA grace period in epochs (quick 1, full 1)")
    parser.add_argument("--reduction-factor", type=common.int_at_least(2), default=2)
    parser.add_argument("--patients", type=positive, help="synthetic patients (quick 60, full 300)")
    parser.add_argument("--image-size", type=positive, nargs=2, metavar=("H", "W"), help="quick 64 48, full 128 96")
    parser.add_argument("--epoch-length", type=positive, help="training images per epoch (quick 64, full 512)")
    parser.add_argument("--batch-size", type=positive, help="quick 16, full 32")
    parser.add_argument(
        "--max-concurrent",
        type=positive,
        help="concurrent trials (default: (cores - 1) // 2, at least 1, so that Ray Data keeps a whole CPU)",
    )
    parser.add_argument(
        "--timeout",
        type=common.float_at_least(0, strict=True),
        help="seconds per sweep before giving up (quick 600, full 7200)",
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    started = time.perf_counter()
    trials = (4 if args.quick else 16) if args.trials is None else args.trials
    epochs = (4 if args.quick else 8) if args.epochs is None else args.epochs
    grace = 1 if args.grace_period is None else args.grace_period
    patients = (60 if args.quick else 300) if args.patients is None else args.patients
    image_size = tuple(((64, 48) if args.quick else (128, 96)) if args.image_size is None else args.image_size)
    batch_size = (16 if args.quick else 32) if args.batch_size is None else args.batch_size
    epoch_length = (64 if args.quick else 512) if args.epoch_length is None else args.epoch_length

    num_cpus = common.start_ray(common.cores())
    manifests = common.prepared_synthetic(patients, (512, 416), image_size)
    overrides: dict[str, object] = {
        "data.synthetic.enabled": "false",
        "data.image_size": f"[{image_size[0]},{image_size[1]}]",
        "train.epochs": epochs,
        "train.batch_size": batch_size,
        "search.num_samples": trials,
        "search.grace_period": grace,
        "search.reduction_factor": args.reduction_factor,
        "search.seed": args.seed,
        "train.seed": args.seed,
    }
    overrides["train.epoch_length"] = epoch_length
    # Each running trial streams a training and a validation dataset per worker; on 2 cores two
    # concurrent trials leave Ray Data no whole CPU and the sweep hangs (README, "The space file", Resources).
    max_concurrent = max(1, (common.cores() - 1) // 2) if args.max_concurrent is None else args.max_concurrent
    overrides["resources.max_concurrent_trials"] = max_concurrent
    timeout_s = (600.0 if args.quick else 7200.0) if args.timeout is None else args.timeout
    with tempfile.TemporaryDirectory(prefix="mammo-bench-sweep-") as tmp:
        results = Path(tmp) / "results"
        ours = run_sweep(
            "ours-optuna-asha",
            results,
            manifests,
            {**overrides, "search.searcher": "optuna", "search.scheduler": "asha"},
            timeout_s,
        )
        print(f"ours: {ours['trial_epochs']} trial-epochs in {ours['wall_s']:.0f} s", file=sys.stderr)
        baseline = run_sweep(
            "baseline-random-fifo",
            results,
            manifests,
            {**overrides, "search.searcher": "random", "search.scheduler": "fifo"},
            timeout_s,
        )
        print(f"random: {baseline['trial_epochs']} trial-epochs in {baseline['wall_s']:.0f} s", file=sys.stderr)
    for label, sweep in (("ours", ours), ("random", baseline)):
        if sweep["trials"] != trials:
            raise RuntimeError(f"{label} sweep ran {sweep['trials']} trials, expected {trials}")
    ours_best, random_best = ours["best_val_auc"], baseline["best_val_auc"]
    within = None if ours_best is None or random_best is None else bool(ours_best >= random_best - AUC_TOLERANCE)
    invalid_reason = ratio_invalid_reason(ours, baseline, within)
    params = {
        "mode": "quick" if args.quick else "full",
        "space": "search_spaces/demo.yaml (train.lr, model.dropout, train.sampler, model.freeze_units)",
        "trials": trials,
        "max_epochs": epochs,
        "asha_grace_period": grace,
        "asha_reduction_factor": args.reduction_factor,
        "seed": args.seed,
        "overrides": {k: str(v) for k, v in overrides.items()},
        "synth_patients": patients,
        "image_size": list(image_size),
        "ray_num_cpus": num_cpus,
        "max_concurrent_trials": max_concurrent,
        "figure": "trials per trial-epoch; ratio = random's trial-epochs / ours",
        "trial_epochs_source": "sum of leaderboard.csv 'epochs'",
    }
    extra = {
        "ours_trial_epochs": ours["trial_epochs"],
        "baseline_trial_epochs": baseline["trial_epochs"],
        "ours_best_val_auc": ours_best,
        "baseline_best_val_auc": random_best,
        "ours_within_0.01_of_random_best": within,
        "ours_detail": ours,
        "baseline_detail": baseline,
    }
    common.finish(
        "sweep_efficiency",
        ours=trials / ours["trial_epochs"] if ours["trial_epochs"] else float("nan"),
        baseline=trials / baseline["trial_epochs"] if baseline["trial_epochs"] else float("nan"),
        unit="trials per trial-epoch",
        params=params,
        out=args.out,
        target_ratio=2.0,
        extra=extra,
        started=started,
        invalid_reason=invalid_reason,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
