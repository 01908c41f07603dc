"""Operations (DESIGN.md "Sweep" and "Cluster"): fault tolerance, --resume, failing trials, monitoring, safe loading.

The Ray-heavy cases run their own Ray instance in a subprocess (the session's ``ray_session`` must not
collide with a second driver in this process) with a private ``RAY_TMPDIR``, so that a test cluster's
address file never steers another process's ``ray.init()`` onto it. They are marked ``slow``.
"""

from __future__ import annotations

import contextlib
import inspect
import itertools
import json
import os
import pickle
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

import pandas as pd
import pytest

from mammo_ray import cli, config, manifest, predict, train, tune

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = Path(__file__).resolve().parent / "scripts"

# Small, fast runs: tiny images, a few steps per epoch, one 0.5-CPU worker (NOTES.md: leave Ray Data a CPU).
TINY = {
    "data.image_size": "[64,48]",
    "train.batch_size": 8,
    "train.epoch_length": 32,
    "train.augment": "false",
    "resources.num_workers": 1,
    "resources.cpus_per_worker": 0.5,
    "resources.max_concurrent_trials": 1,
}


def _sets(overrides: dict) -> list[str]:
    return [arg for key, value in overrides.items() for arg in ("--set", f"{key}={value}")]


@pytest.fixture
def ray_env():
    """Environment for a subprocess that starts its own Ray: a private, short temp dir (socket paths)."""
    private = tempfile.mkdtemp(prefix="mr", dir="/tmp")
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    env.update(
        RAY_TMPDIR=private,
        RAY_AUTH_MODE="disabled",
        RAY_DATA_DISABLE_PROGRESS_BARS="1",
        RAY_TRAIN_ENABLE_PREEMPTION_WATCHER="0",
        RAY_TRAIN_HEALTH_CHECK_INTERVAL_S="0.2",
        PYTHONUNBUFFERED="1",
    )
    yield env
    shutil.rmtree(private, ignore_errors=True)


def _tail(text: str, lines: int = 40) -> str:
    return "\n".join(text.splitlines()[-lines:])


def _sweep_command(space: str, name: str, results: Path, prepared: dict[str, str], *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "mammo_ray.tune",
        "--space",
        space,
        "--name",
        name,
        "--results",
        str(results),
        "--train",
        prepared["train"],
        "--valid",
        prepared["valid"],
        *_sets(TINY),
        *extra,
    ]


def _checkpoints(run_dir: Path) -> list[str]:
    return sorted(p.name for p in run_dir.glob("checkpoint_*") if p.is_dir())


def _registered_epochs(run_dir: Path) -> list[int]:
    """Epochs whose checkpoint the Train controller has registered (what a restart resumes from)."""
    try:
        snapshot = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())
    except (OSError, ValueError):
        return []
    return sorted(int(r["metrics"]["epoch"]) for r in snapshot.get("checkpoint_results", []))


def _latest_history(run_dir: Path) -> pd.DataFrame:
    """history.csv of the run's checkpoint with the highest epoch."""
    best = max(run_dir.glob("checkpoint_*/report.json"), key=lambda p: json.loads(p.read_text())["epoch"])
    return pd.read_csv(best.parent / "history.csv")


def _optuna_trials(db: Path, study: str) -> pd.DataFrame:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    trials = optuna.load_study(study_name=study, storage=f"sqlite:///{db}").trials
    return pd.DataFrame(
        {
            "number": [t.number for t in trials],
            "state": [t.state.name for t in trials],
            "value": [t.value for t in trials],
        }
    )


# --------------------------------------------------------------------------------------------------
# 1. A node dies in the middle of a run: max_failures restarts the worker from the last checkpoint.


def test_node_failure_restarts_from_last_checkpoint(tmp_path, ray_env):
    work = tmp_path / "work"
    work.mkdir()
    proc = subprocess.run(
        [sys.executable, str(SCRIPTS / "node_failure.py"), str(work)],
        cwd=REPO,
        env=ray_env,
        capture_output=True,
        text=True,
        timeout=330,
        check=False,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, _tail(output)
    summary = json.loads((work / "summary.json").read_text())
    assert summary["fit_error"] is None and summary["result_error"] is None, summary
    epochs = 4
    # The node went away mid-run: after at least one registered checkpoint, before the last epoch.
    assert summary["registered_when_removed"] and max(summary["registered_when_removed"]) < epochs
    assert summary["final_epoch"] == epochs
    # Epochs 1..N, each once: the restarted worker went on from the checkpoint, not from epoch 1.
    history = pd.read_csv(Path(summary["final_checkpoint"]) / "history.csv")
    assert history["epoch"].tolist() == list(range(1, epochs + 1))
    # The rows before the failure are the ones the first worker measured (restored from its checkpoint).
    assert summary["pre_failure_reports"]
    for report in summary["pre_failure_reports"].values():
        row = history[history["epoch"] == report["epoch"]].iloc[0]
        assert row["epoch_time_s"] == pytest.approx(report["epoch_time_s"])
        assert row["train_loss"] == pytest.approx(report["train_loss"])
    # There was a restart: the first worker lived on the removed node, a second worker on another node
    # finished the run, and the controller logged the retry against max_failures.
    workers = summary["train_workers"]
    assert len({w["actor_id"] for w in workers}) >= 2
    first = next(w for w in workers if w["actor_id"] == summary["first_worker"])
    assert first["node_id"] == summary["victim_node"]
    assert any(w["node_id"] != summary["victim_node"] for w in workers)
    assert "[FailurePolicy] RETRY" in output


# --------------------------------------------------------------------------------------------------
# 2. --resume: a sweep killed mid-way continues without re-running finished trials.


def _wait_for_second_trial(proc: subprocess.Popen, runs: Path, timeout: float) -> list[Path]:
    """Poll until a second trial has a registered checkpoint (so the first one has finished)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        folders = sorted(runs.glob("trial_*"), key=lambda p: p.stat().st_mtime) if runs.is_dir() else []
        if len(folders) >= 2 and _registered_epochs(folders[-1]):
            return folders
        time.sleep(0.5)
    return []


def _stop(proc: subprocess.Popen, grace: float = 45.0) -> None:
    """Ctrl-C, then SIGKILL to the whole process group (the driver and the Ray it started) after a grace period."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(grace)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # our own process group: the driver and the Ray processes it started
    proc.wait()


def test_resume_continues_an_interrupted_sweep(prepared_data, tmp_path, ray_env):
    results = tmp_path / "results"
    name = "resume"
    trials, epochs = 3, 3
    command = _sweep_command(
        "demo", name, results, prepared_data, "--num-samples", str(trials), "--set", f"train.epochs={epochs}"
    )
    experiment = results / name
    runs = experiment / "train_runs"
    log = (tmp_path / "first.log").open("w")
    first = subprocess.Popen(
        command, cwd=REPO, env=ray_env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        folders = _wait_for_second_trial(first, runs, timeout=240)
    finally:
        _stop(first)
        log.close()
    first_log = (tmp_path / "first.log").read_text()
    assert folders, f"no second trial started before the deadline:\n{_tail(first_log)}"
    assert re.search(r"Ray dashboard: http://127\.0\.0\.1:\d+", first_log)
    assert first.returncode in (130, -signal.SIGKILL), _tail(first_log)
    if first.returncode == 130:  # Ctrl-C was handled within the grace period: a partial, honest leaderboard
        partial = pd.read_csv(experiment / "leaderboard.csv", dtype={"trial_id": str})
        assert (partial["stop_reason"].str.startswith("interrupted")).sum() == 1, partial
        assert "--resume" in first_log and not (experiment / "best").exists()

    # State at the kill: every trial but the newest had finished (one trial at a time).
    finished = {folder.name: _checkpoints(folder) for folder in folders[:-1]}
    interrupted = folders[-1]
    interrupted_reports = {
        int(json.loads(p.read_text())["epoch"]): json.loads(p.read_text())
        for p in interrupted.glob("checkpoint_*/report.json")
    }
    registered_before = _registered_epochs(interrupted)
    study_before = _optuna_trials(experiment / "optuna.db", name)
    complete_before = study_before[study_before["state"] == "COMPLETE"]
    assert len(complete_before) >= len(finished)

    second = subprocess.run(
        [*command, "--resume"], cwd=REPO, env=ray_env, capture_output=True, text=True, timeout=400, check=False
    )
    output = second.stdout + second.stderr
    assert second.returncode == 0, _tail(output)
    assert "resuming the sweep" in output

    # Finished trials were not re-run: their Train runs gained no checkpoint.
    for run_name, checkpoints in finished.items():
        assert _checkpoints(runs / run_name) == checkpoints, run_name
    # The interrupted trial went on from its last registered checkpoint: its epochs are 1..k with no
    # duplicate, and the epochs before the kill are the ones measured then.
    history = _latest_history(interrupted)
    assert history["epoch"].tolist() == list(range(1, len(history) + 1))
    for epoch in registered_before:
        if epoch in interrupted_reports and epoch in set(history["epoch"]):
            row = history[history["epoch"] == epoch].iloc[0]
            assert row["epoch_time_s"] == pytest.approx(interrupted_reports[epoch]["epoch_time_s"])

    # The sweep completed with the planned number of trials, all on the leaderboard.
    board = pd.read_csv(experiment / "leaderboard.csv", dtype={"trial_id": str})
    assert len(board) == trials and board["trial_id"].is_unique
    assert (board["status"] == "TERMINATED").all(), board
    assert {f"trial_{t}" for t in board["trial_id"]} == {p.name for p in runs.glob("trial_*")}
    assert (experiment / "best" / "model.safetensors").is_file()

    # The Optuna study kept its history: the trials finished before the kill are unchanged, and every
    # planned trial is complete.
    study_after = _optuna_trials(experiment / "optuna.db", name)
    kept = study_after.set_index("number").loc[complete_before["number"]]
    assert (kept["state"] == "COMPLETE").all()
    assert kept["value"].tolist() == pytest.approx(complete_before["value"].tolist())
    assert (study_after["state"] == "COMPLETE").sum() == trials


# --------------------------------------------------------------------------------------------------
# 3. A trial that fails for good is recorded with its reason, and the sweep goes on.


def _one_epoch_space(path: Path, lr: dict, *, searcher: str) -> Path:
    """The demo space, one trial (per grid value) of one epoch on given manifests, no retries, searching only lr."""
    space = config.load("demo").to_dict()
    space["search"].update(searcher=searcher, scheduler="fifo", num_samples=1)
    space["space"] = {"train.lr": lr}
    space["train"].update(epochs=1, warmup_epochs=0.0, grad_clip=0.0)
    space["resources"]["max_failures"] = 0
    space["data"]["synthetic"]["enabled"] = False
    path.write_text(json.dumps(space))
    return path


def test_failing_trial_is_recorded_and_the_sweep_goes_on(prepared_data, tmp_path, ray_env):
    # A grid makes the two trials deterministic; lr 1e6 drives the loss to inf or NaN in the first steps.
    space_file = _one_epoch_space(
        tmp_path / "failing.yaml", {"type": "grid", "values": [1.0e6, 1.0e-3]}, searcher="random"
    )
    results = tmp_path / "results"
    # Run from the manifests' folder and name them relatively, as a user does: Tune runs each trial in its own
    # trial folder, so the driver must hand the trials absolute paths (before, every trial failed to find them).
    data_dir = Path(prepared_data["train"]).parent
    relative = {role: os.path.relpath(path, data_dir) for role, path in prepared_data.items()}
    assert not Path(relative["train"]).is_absolute()
    proc = subprocess.run(
        _sweep_command(str(space_file), "failing", results, relative),
        cwd=data_dir,
        env=ray_env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, _tail(output)
    board = pd.read_csv(results / "failing" / "leaderboard.csv", dtype={"trial_id": str})
    assert len(board) == 2
    failed = board[board["train.lr"] == 1.0e6].iloc[0]
    assert failed["status"] == "ERROR"
    assert "NonFiniteLossError" in failed["stop_reason"] and "non-finite" in failed["stop_reason"]
    good = board[board["train.lr"] == 1.0e-3].iloc[0]
    assert good["status"] == "TERMINATED" and good["stop_reason"] == "completed"
    manifests = json.loads((results / "failing" / "manifests.json").read_text())
    assert manifests["train"] == prepared_data["train"] and manifests["valid"] == prepared_data["valid"]
    # The exported model is the trial that worked.
    metrics = json.loads((results / "failing" / "best" / "metrics.json").read_text())
    assert metrics["selected"]["report"]["nonfinite_loss"] == 0.0
    assert Path(metrics["selected"]["checkpoint"]).parent.name == f"trial_{good['trial_id']}"


def _sweep_errored_then_resume(prepared_data, tmp_path, ray_env, name: str, trials: int) -> list[str]:
    """A sweep of ``trials`` one-epoch trials that all fail (Optuna, the default searcher; lr 1e6 makes the loss
    non-finite in the first steps), then the same command with --resume; both outputs."""
    space_file = _one_epoch_space(tmp_path / f"{name}.yaml", {"type": "choice", "values": [1.0e6]}, searcher="optuna")
    command = _sweep_command(str(space_file), name, tmp_path / "results", prepared_data, "--num-samples", str(trials))
    outputs = []
    for extra in ([], ["--resume"]):
        proc = subprocess.run(
            [*command, *extra], cwd=REPO, env=ray_env, capture_output=True, text=True, timeout=300, check=False
        )
        outputs.append(proc.stdout + proc.stderr)
        assert proc.returncode == 1 and "nothing to export" in outputs[-1], _tail(outputs[-1])
    assert "resuming the sweep" in outputs[1], _tail(outputs[1])
    board = pd.read_csv(tmp_path / "results" / name / "leaderboard.csv", dtype={"trial_id": str})
    assert board["status"].tolist() == ["ERROR"] * trials
    assert len(_optuna_trials(tmp_path / "results" / name / "optuna.db", name)) == trials
    return outputs


@pytest.mark.slow
def test_resume_of_a_sweep_with_an_errored_trial_keeps_the_optuna_study_whole(prepared_data, tmp_path, ray_env):
    """--resume restarted errored trials under new ids, which OptunaSearch had never seen: the first report raised
    KeyError in the searcher and ended the resumed sweep. Resumed, the trial keeps its id and fails again, cleanly."""
    outputs = _sweep_errored_then_resume(prepared_data, tmp_path, ray_env, "errored", trials=1)
    assert "KeyError" not in outputs[1], _tail(outputs[1])


@pytest.mark.slow
def test_resume_runs_errored_trials_no_more_at_a_time_than_the_concurrency_limit(prepared_data, tmp_path, ray_env):
    """Tune gives every resumed trial an actor at once: the concurrency limiter only holds back new suggestions. Two
    errored demo trials resumed side by side reserve 1.2 of the 2 CPUs, Ray Data gets no whole CPU and the resumed
    sweep hung. The trials now queue for the sweep's slots."""
    _sweep_errored_then_resume(prepared_data, tmp_path, ray_env, "errored2", trials=2)


# Trials that run side by side, as the shipped spaces' max_concurrent_trials: 4 asks on a GPU node. The driver's
# Ray gets 4 logical CPUs on the 2 cores, so that two 0.6-CPU trials still leave Ray Data a whole CPU.
CONCURRENT_DRIVER = """
import functools, sys
import ray
ray.init = functools.partial(ray.init, num_cpus=4)
from mammo_ray import tune
sys.exit(tune.main(sys.argv[1:]))
"""


def _trial_spans(experiment: Path) -> list[tuple[float, float]]:
    """(start, end) of each trial from Tune's result.json rows: the first report's time less its run time."""
    spans = []
    for result in experiment.glob("trial_function_*/result.json"):
        rows = [json.loads(line) for line in result.read_text().splitlines() if line.strip()]
        spans.append((rows[0]["timestamp"] - rows[0]["time_total_s"], rows[-1]["timestamp"]))
    return spans


@pytest.mark.slow
def test_concurrent_trials_run_side_by_side_and_the_sweep_completes(prepared_data, tmp_path, ray_env):
    results = tmp_path / "results"
    trials = 4
    command = _sweep_command("demo", "concurrent", results, prepared_data, "--num-samples", str(trials))
    command[1:3] = ["-c", CONCURRENT_DRIVER]  # replaces "-m mammo_ray.tune"
    sets = {"resources.max_concurrent_trials": 2, "resources.torch_threads": 1, "train.epochs": 2}
    proc = subprocess.run(
        [*command, *_sets(sets)], cwd=REPO, env=ray_env, capture_output=True, text=True, timeout=420, check=False
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, _tail(output)
    assert "running 1 at a time" not in output  # fit_concurrency kept both
    experiment = results / "concurrent"
    board = pd.read_csv(experiment / "leaderboard.csv", dtype={"trial_id": str})
    assert len(board) == trials and (board["status"] == "TERMINATED").all(), board
    assert (board["epochs"] >= 1).all()
    spans = sorted(_trial_spans(experiment))
    assert len(spans) == trials
    overlapping = [a for a, b in itertools.pairwise(spans) if b[0] < a[1]]
    assert overlapping, f"no two trials ran at the same time: {spans}"
    assert max(sum(start <= t < end for start, end in spans) for t, _ in spans) <= 2  # the limit held
    assert (experiment / "best" / "model.safetensors").is_file()


def test_a_trial_whose_worker_fits_no_node_stops_the_sweep_with_an_error(prepared_data, tmp_path, ray_env):
    """Before, the trial waited forever for a worker with a GPU, silently. 64 GPUs per worker fit no machine, so
    this holds on a GPU host too. (A subprocess: only a Ray instance the command starts itself makes it an error.)"""
    results = tmp_path / "results"
    command = _sweep_command("demo", "cannot", results, prepared_data, "--set", "resources.gpus_per_worker=64")
    proc = subprocess.run(command, cwd=REPO, env=ray_env, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 2, _tail(proc.stdout + proc.stderr)
    assert "error: 1 Train worker(s) of 0.5 CPUs and 64 GPU(s) each" in proc.stderr
    assert "do not fit: this machine has" in proc.stderr
    assert not (results / "cannot").exists()  # nothing written that a later run would find


def test_a_trial_that_leaves_ray_data_no_cpu_stops_the_sweep_with_an_error(
    ray_session, prepared_data, tmp_path, capsys, monkeypatch
):
    """Before, a traceback: the refusal was raised outside the command's error handling."""
    # The session's Ray is a local one that no node will join, as a Ray `tune` starts itself; on a cluster it
    # joined, `tune` only warns (an autoscaler may add nodes).
    monkeypatch.setattr(cli, "_STARTED_HERE", True)
    results = tmp_path / "results"
    argv = _sweep_command("demo", "cannot", results, prepared_data, "--set", "resources.cpus_per_worker=1.5")[3:]
    assert tune.main(argv) == 2
    assert "error: one trial reserves 1.6 CPUs of the cluster's 2" in capsys.readouterr().err
    assert not (results / "cannot").exists()


def test_a_train_run_whose_worker_fits_no_node_stops_with_an_error(prepared_data, tmp_path, ray_env):
    out = tmp_path / "run"
    command = [
        sys.executable, "-m", "mammo_ray.train", "--config", "demo", "--train", prepared_data["train"],
        "--valid", prepared_data["valid"], "--out_dir", str(out), *_sets({**TINY, "resources.gpus_per_worker": 64}),
    ]  # fmt: skip
    proc = subprocess.run(command, cwd=REPO, env=ray_env, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 2, _tail(proc.stdout + proc.stderr)
    assert "error: 1 Train worker(s) of 0.5 CPUs and 64 GPU(s) each" in proc.stderr
    assert not out.exists()


# --------------------------------------------------------------------------------------------------
# 4. Prometheus metrics from ray.util.metrics, labelled with the run.


def test_prometheus_metrics_are_exported_with_the_run_name(ray_session, prepared_data, tmp_path):
    import ray

    cfg = config.load(
        "demo",
        {
            "train.epochs": 1,
            "train.batch_size": 8,
            "train.epoch_length": 32,
            "train.augment": False,
            "data.image_size": [64, 48],
            "resources.num_workers": 1,
            "resources.cpus_per_worker": 0.5,
            "search.checkpoints_to_keep": 1,
        },
    )
    frames = manifest.load_manifests({"train": prepared_data["train"], "valid": prepared_data["valid"]})
    run_name = f"metrics-{uuid.uuid4().hex[:8]}"
    result = train.make_trainer(cfg, frames, run_name=run_name, storage_path=str(tmp_path)).fit()
    expected = ["images_per_s", "train_loss", "epoch_time_s"]
    if pd.notna(result.metrics.get("val_auc")):  # a NaN AUC (one class in valid) is not set, by design
        expected.append("val_auc")

    node = next(n for n in ray.nodes() if n["Alive"])
    url = f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
    patterns = {
        key: re.compile(rf'^ray_mammo_ray_{key}\{{[^}}]*run="{run_name}"[^}}]*\}} (\S+)$', re.M) for key in expected
    }
    text, deadline = "", time.monotonic() + 45  # the metrics agent exports on an interval
    while time.monotonic() < deadline:
        with urllib.request.urlopen(url, timeout=5) as response:
            text = response.read().decode()
        if all(p.search(text) for p in patterns.values()):
            break
        time.sleep(1.0)
    for key, pattern in patterns.items():
        match = pattern.search(text)
        assert match, f"ray_mammo_ray_{key} with run={run_name!r} not in {url}"
        assert float(match.group(1)) == pytest.approx(result.metrics[key], rel=1e-6)


# --------------------------------------------------------------------------------------------------
# 5. The dashboard listens on loopback only, and its URL is printed.


def test_start_ray_binds_the_dashboard_to_loopback_and_prints_its_url(monkeypatch, capsys):
    import ray

    calls = []

    class Context:
        dashboard_url = "127.0.0.1:8265"

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: calls.append(kwargs) or Context())
    monkeypatch.setattr(cli, "_STARTED_HERE", False)
    info = cli.start_ray()
    assert cli._STARTED_HERE  # a Ray instance of its own: check_placement refuses what it cannot host
    assert calls[0]["include_dashboard"] is True
    assert calls[0]["dashboard_host"] == "127.0.0.1"
    assert calls[0]["runtime_env"]["worker_process_setup_hook"] == "mammo_ray.cli.pin_ray_address"
    # Idle worker processes outlive a trial, so the next trial's Ray Data tasks need not import everything again.
    assert calls[0]["_system_config"] == {"idle_worker_killing_time_threshold_ms": 60_000}
    assert info["dashboard_url"] == "http://127.0.0.1:8265"
    assert "Ray dashboard: http://127.0.0.1:8265" in capsys.readouterr().out
    # Joining a cluster leaves its dashboard and its settings (Ray refuses a _system_config there) as they are.
    calls.clear()
    cli.start_ray(address="auto")
    assert "dashboard_host" not in calls[0] and "_system_config" not in calls[0]
    assert not cli._STARTED_HERE  # a joined cluster: check_placement asks Ray whether it may grow


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_an_address_where_no_cluster_answers_fails_in_seconds_before_ray_init(monkeypatch):
    """Before, ray.init retried for minutes on such an address, printing only GCS time-outs."""
    import ray

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: pytest.fail("ray.init was called"))
    port = _closed_port()
    for address in (f"127.0.0.1:{port}", f"ray://127.0.0.1:{port}"):
        started = time.monotonic()
        with pytest.raises(ValueError, match=rf"--address {re.escape(address)}: no Ray cluster answers"):
            cli.start_ray(address=address)
        assert time.monotonic() - started < 10
    with socket.socket() as listening:  # something answers: the address is Ray's to judge
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        cli.check_address(f"127.0.0.1:{listening.getsockname()[1]}")
    for left_to_ray in (None, "auto", "head-node"):
        cli.check_address(left_to_ray)


def test_start_ray_without_an_address_joins_the_cluster_that_ray_address_names(ray_session):
    """A `ray job submit` driver has RAY_ADDRESS set: start_ray joins that cluster, which refuses Ray settings."""
    import os
    import subprocess
    import sys

    address = ray_session.get_runtime_context().gcs_address
    script = (
        "from mammo_ray import cli; cli.start_ray(); import ray; print('joined', ray.get_runtime_context().gcs_address)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script],
        env=dict(os.environ, RAY_ADDRESS=address),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"joined {address}" in proc.stdout


def test_dashboard_answers_on_loopback_and_not_on_other_interfaces(ray_session):
    import ray

    url = ray._private.worker.get_dashboard_url()  # what ray.init's context reports as dashboard_url
    host, port = url.replace("http://", "").rsplit(":", 1)
    assert host == "127.0.0.1"
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/version", timeout=10) as response:
        version = json.loads(response.read())
    assert version["ray_version"] == ray.__version__
    # Bound to 127.0.0.1, not 0.0.0.0: the node's own network address refuses the connection.
    node_ip = ray.util.get_node_ip_address()
    if node_ip.startswith("127."):
        pytest.skip("the node has no address other than loopback")
    with pytest.raises(OSError), socket.create_connection((node_ip, int(port)), timeout=3):
        pass


STATE_API_PROBE = """
import os, ray
from mammo_ray import cli

cli.start_ray()

@ray.remote(num_cpus=0)
def probe(controller_id):
    from ray.util.state import get_actor  # what Train's PlacementGroupCleaner calls, with no address
    return os.environ.get("RAY_ADDRESS"), get_actor(controller_id, timeout=30).state

actor = ray.remote(num_cpus=0)(type("Controller", (), {"ping": lambda self: 1})).remote()
ray.get(actor.ping.remote())
print("RESULT", ray.get_runtime_context().gcs_address, *ray.get(probe.remote(actor._actor_id.hex())))
"""


@pytest.mark.slow
def test_workers_query_their_own_cluster_when_several_run(ray_session, ray_env):
    """With two Ray instances on the machine (this session's and the probe's), address auto-detection in a
    worker must still find the worker's own cluster; Train's placement-group cleaner depends on it."""
    proc = subprocess.run(
        [sys.executable, "-c", STATE_API_PROBE], cwd=REPO, env=ray_env, capture_output=True, text=True, timeout=180
    )
    assert proc.returncode == 0, _tail(proc.stdout + proc.stderr)
    gcs, worker_address, state = proc.stdout.split("RESULT", 1)[1].split()
    assert worker_address == gcs
    assert state == "ALIVE"


# --------------------------------------------------------------------------------------------------
# 6. Weights load without unpickling arbitrary objects.


class _Payload:
    """Unpickling this object runs code (it touches a marker file): the case weights_only=True must refuse."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _tiny_model_and_optimizer():
    import torch

    net = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.Flatten(), torch.nn.Linear(72, 1))
    optimizer = train.build_optimizer("adamw", [{"params": list(net.parameters()), "weight_decay": 0.05}], 1e-3)
    net(torch.randn(2, 1, 8, 8)).sum().backward()
    optimizer.step()
    return net, optimizer


def test_training_state_loads_weights_only(tmp_path):
    import torch

    # The worker loop restores a checkpoint through train.restore_state, which loads the state with weights_only.
    assert "restore_state(" in inspect.getsource(train.train_loop_per_worker)

    net, optimizer = _tiny_model_and_optimizer()
    good = tmp_path / "good"
    good.mkdir()
    train._write_checkpoint(
        good,
        model=net,
        optimizer=optimizer,
        epoch=3,
        history=[{"epoch": 1}, {"epoch": 2}, {"epoch": 3}],
        config_yaml="name: t\n",
        predictions=pd.DataFrame({"image_id": ["a"], "prob": [0.5]}),
        metrics={"auc": 0.5},
        report={"epoch": 3},
    )
    fresh, fresh_optimizer = _tiny_model_and_optimizer()
    epoch, history = train.restore_state(good, fresh, fresh_optimizer, None, "cpu")
    assert epoch == 3 and len(history) == 3
    for name, tensor in net.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], tensor)

    marker = tmp_path / "code-ran"
    evil = tmp_path / "evil"
    evil.mkdir()
    torch.save({"epoch": 1, "model": net.state_dict(), "extra": _Payload(marker)}, evil / train.CHECKPOINT_STATE)
    with pytest.raises(pickle.UnpicklingError, match="[Ww]eights only"):
        train.restore_state(evil, fresh, fresh_optimizer, None, "cpu")
    assert not marker.exists()
    # The payload is real: a full unpickle would have run it.
    torch.load(evil / train.CHECKPOINT_STATE, map_location="cpu", weights_only=False)
    assert marker.exists()


def test_bundle_without_safetensors_is_not_loaded_from_a_pickle(tmp_path):
    import torch

    net, _ = _tiny_model_and_optimizer()
    (tmp_path / "config.yaml").write_text(config.dump(config.load("demo")))
    torch.save(net.state_dict(), tmp_path / "model.pt")
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        predict.load_bundle(tmp_path)
