"""Shared fixtures: one Ray session for the whole test run, and the shared DICOM test data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Quiet, fast Ray for tests; set before Ray starts so that every worker process inherits them.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
os.environ.setdefault("RAY_DEDUP_LOGS", "1")


@pytest.fixture(scope="session")
def ray_session():
    """Start Ray once per test session (2 CPUs, like CI) with the dashboard, and shut it down at the end."""
    import ray

    from mammo_ray import cli

    if not ray.is_initialized():
        # The same worker hook and settings as cli.start_ray: with another Ray instance on the machine, Train's
        # placement-group cleaner would otherwise query the wrong cluster and leave stopped trials' CPUs reserved.
        ray.init(
            num_cpus=2,
            include_dashboard=True,
            dashboard_host="127.0.0.1",
            logging_level="ERROR",
            runtime_env={"worker_process_setup_hook": "mammo_ray.cli.pin_ray_address"},
            _system_config=dict(cli.LOCAL_SYSTEM_CONFIG),
        )
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def synthetic_data(tmp_path_factory):
    """A small synthetic DICOM set, generated once per session."""
    from mammo_ray import synth

    out = tmp_path_factory.mktemp("synth") / "data"
    info = synth.generate(out, patients=24, prevalence=0.25, size=(128, 104), seed=3, progress=False)
    return info


@pytest.fixture(scope="session")
def prepared_data(ray_session, synthetic_data, tmp_path_factory):
    """The small synthetic set run through ``prepare`` (manifests + pixel cache at 64×48)."""
    from mammo_ray import importers, prepare

    root = Path(synthetic_data["manifest_csv"]).parent
    table = importers.import_source("generic", [synthetic_data["manifest_csv"]], root)
    out = tmp_path_factory.mktemp("prepared")
    paths = prepare.run(table, out, size=(64, 48), fractions=(0.6, 0.2, 0.2), seed=1, progress=False)
    return {role: str(path) for role, path in paths.items()}


def _testdata_dir() -> Path:
    override = os.environ.get("MAMMO_RAY_TESTDATA")
    return Path(override) if override else Path(__file__).resolve().parents[2] / "shared" / "testdata" / "dicom"


@pytest.fixture(scope="session")
def testdata() -> Path:
    folder = _testdata_dir()
    if not all((folder / name).is_file() for name in ("MG1_J2KI.dcm", "MG1_JPLY.dcm")):
        pytest.fail(
            f"DICOM test data not found at {folder}. It ships beside the repository as shared/testdata/dicom; "
            "set MAMMO_RAY_TESTDATA to its folder."
        )
    return folder
