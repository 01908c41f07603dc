"""Kill the node that hosts a Train worker in the middle of a run and let ``max_failures`` bring it back.

Run by ``tests/test_operations.py`` in its own process, because it builds its own multi-node Ray cluster
(``ray.cluster_utils.Cluster``: a 0-CPU head plus two 1-CPU nodes) and the test session already holds a
Ray instance. The caller sets ``RAY_TMPDIR`` to a private folder so that the cluster's address file does
not steer other processes' ``ray.init()`` onto this cluster.

Usage: ``python tests/scripts/node_failure.py WORK_DIR``. It writes ``WORK_DIR/summary.json``.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

RUN_NAME = "node-failure"
EPOCHS = 4


def checkpoint_epochs(run_dir: Path) -> dict[str, int]:
    """Each finished checkpoint folder of the run and the epoch it holds."""
    out = {}
    for report in sorted(run_dir.glob("checkpoint_*/report.json")):
        try:
            out[report.parent.name] = int(json.loads(report.read_text())["epoch"])
        except (OSError, ValueError, KeyError):
            continue  # still being written
    return out


def registered_epochs(run_dir: Path) -> list[int]:
    """Epochs whose checkpoint the Train controller has registered (what a restart resumes from).

    A checkpoint folder appears on disk before the controller collects the report on its next health
    check (``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S``); a worker lost in between restarts from the previous one.
    """
    try:
        snapshot = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())
    except (OSError, ValueError):
        return []
    return sorted(int(r["metrics"]["epoch"]) for r in snapshot.get("checkpoint_results", []))


def train_workers() -> list[dict]:
    """The Train worker actors, read from the GCS actor table (the state API needs a running dashboard, which
    on a loaded machine may not be up yet: "Could not read 'dashboard' from GCS")."""
    import ray

    return [
        {"actor_id": actor_id, "node_id": info.get("Address", {}).get("NodeID"), "state": info.get("State")}
        for actor_id, info in ray._private.state.actors().items()
        if "RayTrainWorker" in str(info.get("ActorClassName", ""))
    ]


def main(work: Path) -> int:
    import ray
    from ray.cluster_utils import Cluster

    from mammo_ray import config, importers, manifest, prepare, synth, train

    started = time.perf_counter()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    nodes = [cluster.add_node(num_cpus=1) for _ in range(2)]
    cluster.wait_for_nodes()
    cluster.connect()
    summary: dict = {"cluster_start_s": round(time.perf_counter() - started, 1)}

    info = synth.generate(work / "synth", patients=16, prevalence=0.25, size=(128, 104), seed=5, progress=False)
    table = importers.import_source("generic", [info["manifest_csv"]], Path(info["manifest_csv"]).parent)
    paths = prepare.run(table, work / "prepared", size=(64, 48), fractions=(0.6, 0.2, 0.2), seed=1, progress=False)
    frames = manifest.load_manifests({"train": paths["train"], "valid": paths["valid"]})
    cfg = config.load(
        "demo",
        {
            "train.epochs": EPOCHS,
            "train.batch_size": 8,
            # About 2 s per epoch here, so the run is still going when the node is removed.
            "train.epoch_length": 160,
            "train.augment": False,
            # One training stream: with the class-aware samplers' two, Ray Data's autoscaling coordinator splits
            # each 1-CPU node's spare CPU between them by whole CPUs, which leaves each a budget of 0 and epochs
            # of 30-50 s here instead of about 2 s. Recovery is what this run tests, not the samplers.
            "train.sampler": "simple",
            "data.image_size": [64, 48],
            "resources.num_workers": 1,
            "resources.cpus_per_worker": 0.5,
            "resources.max_failures": 2,
            # Keep every checkpoint, so a restart from scratch would show as a second epoch-1 checkpoint.
            "search.checkpoints_to_keep": EPOCHS + 2,
        },
    )
    storage = work / "runs"
    trainer = train.make_trainer(cfg, frames, run_name=RUN_NAME, storage_path=str(storage))
    summary["data_ready_s"] = round(time.perf_counter() - started, 1)

    outcome: dict = {}

    def fit() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as err:  # reported, not raised: the main thread owns the cluster
            outcome["error"] = repr(err)

    # fit() runs in a thread: the main thread must stay free to remove and add nodes (add_node from the
    # main thread, see NOTES.md).
    thread = threading.Thread(target=fit, daemon=True)
    thread.start()
    run_dir = storage / RUN_NAME
    deadline = time.monotonic() + 240
    while not registered_epochs(run_dir) and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.1)
    registered = registered_epochs(run_dir)
    before = {name: epoch for name, epoch in checkpoint_epochs(run_dir).items() if epoch in registered}
    summary["registered_before_failure"] = registered
    if not registered or not thread.is_alive():
        summary["error"] = f"no checkpoint while the run was alive: {outcome.get('error')}"
        (work / "summary.json").write_text(json.dumps(summary, indent=2))
        return 1
    workers = [w for w in train_workers() if w["state"] == "ALIVE"]
    victim = next(n for n in nodes if n.node_id in {w["node_id"] for w in workers})
    summary["first_worker"] = workers[0]["actor_id"]
    cluster.remove_node(victim, allow_graceful=False)  # a crash, not a drain
    summary["removed_at_s"] = round(time.perf_counter() - started, 1)
    summary["registered_when_removed"] = registered_epochs(run_dir)
    cluster.add_node(num_cpus=1)
    summary["node_added_at_s"] = round(time.perf_counter() - started, 1)
    thread.join(timeout=max(1.0, deadline - time.monotonic()))
    summary["finished_s"] = round(time.perf_counter() - started, 1)
    summary["fit_error"] = outcome.get("error")
    result = outcome.get("result")
    if result is not None:
        summary["result_error"] = None if result.error is None else repr(result.error)
        summary["final_epoch"] = (result.metrics or {}).get("epoch")
        final = Path(result.checkpoint.path) if result.checkpoint else None
        summary["final_checkpoint"] = str(final) if final else None
    summary["checkpoints"] = checkpoint_epochs(run_dir)
    summary["pre_failure_reports"] = {
        name: json.loads((run_dir / name / "report.json").read_text()) for name in before if (run_dir / name).is_dir()
    }
    summary["train_workers"] = train_workers()
    summary["victim_node"] = victim.node_id
    (work / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    ray.shutdown()
    cluster.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(Path(sys.argv[1])))
