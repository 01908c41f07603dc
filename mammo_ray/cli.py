"""Shared command-line plumbing: the ``mammo-ray`` dispatcher, logging, Ray start-up, data resolution."""

from __future__ import annotations

import argparse
import itertools
import logging
import os
import socket
import sys
from pathlib import Path

import pandas as pd

from mammo_ray import config as config_mod
from mammo_ray import manifest, storage

log = logging.getLogger("mammo_ray")

COMMANDS = ("tune", "train", "prepare", "synth", "predict", "export")

# Ray's own chatter is off unless -v: a sweep prints a trial table, not a log flood.
QUIET_ENV = {
    "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    "RAY_DEDUP_LOGS": "1",
    "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S": "60",
    "PYTHONWARNINGS": "ignore::DeprecationWarning",
}

# Ray settings for a cluster that start_ray starts itself (a cluster it joins keeps its own).
# Ray ends a worker process that has been idle for 1 s once the node runs more worker processes than CPUs, which a
# sweep on a small machine always does (each trial has its actor, a Train controller, workers and their helper
# actors). Each trial's Ray Data tasks then started in new processes, which import torch, albumentations and
# mammo_ray again (2.4 s of CPU) before the trial's first batch. Kept for a minute, the next trial reuses them:
# on 2 cores a later trial's own set-up plus its worker's wait for the first batch went from 10.9-11.3 s to
# 6.5-6.9 s, and the demo's sweep from 304-317 s to 287-299 s (README, Benchmarks).
LOCAL_SYSTEM_CONFIG = {"idle_worker_killing_time_threshold_ms": 60_000}


# True once start_ray has started a Ray instance of its own on this machine (no node will ever join it); False
# when it joined a cluster, which an autoscaler may grow.
_STARTED_HERE = False


class DataMissingError(ValueError):
    """No manifests were given and the space file does not generate data."""


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for name in ("ray", "ray.data", "ray.train", "ray.tune", "filelock", "optuna", "tensorboardX"):
        logging.getLogger(name).setLevel(logging.INFO if verbose else logging.WARNING)


def start_ray(address: str | None = None, dashboard_host: str = "127.0.0.1", verbose: bool = False) -> dict:
    """Start (or join) Ray with the dashboard on ``dashboard_host``; print the dashboard URL."""
    import ray

    if ray.is_initialized():
        return {}
    check_address(address)
    if not verbose:
        for key, value in QUIET_ENV.items():
            os.environ.setdefault(key, value)
    kwargs = {
        "address": address,
        "include_dashboard": True,
        "logging_level": logging.INFO if verbose else logging.WARNING,
        # Worker logs (per-step Train and Ray Data chatter) stay in the dashboard and in /tmp/ray unless -v;
        # the terminal shows Tune's trial table, and failures reach leaderboard.csv with their reason.
        "log_to_driver": verbose,
        "runtime_env": {
            "env_vars": {k: os.environ[k] for k in QUIET_ENV if k in os.environ},
            "worker_process_setup_hook": "mammo_ray.cli.pin_ray_address",
        },
    }
    if address is None:
        kwargs["dashboard_host"] = dashboard_host
        kwargs["_system_config"] = dict(LOCAL_SYSTEM_CONFIG)
    global _STARTED_HERE
    try:
        context = ray.init(**kwargs)
        _STARTED_HERE = "_system_config" in kwargs
    except ValueError as err:
        # No address still joins the cluster that RAY_ADDRESS names (as in a `ray job submit` driver) or that a
        # `ray start` on this machine recorded; Ray refuses settings of its own for a cluster it joins.
        if "_system_config" not in kwargs or "_system_config" not in str(err):
            raise
        del kwargs["_system_config"]
        context = ray.init(**kwargs)
    url = context.dashboard_url
    if url:
        print(f"Ray dashboard: http://{url}", flush=True)
    return {"dashboard_url": f"http://{url}" if url else None}


def int_at_least(minimum: int):
    """An argparse ``type`` for an integer of at least ``minimum`` (``--batch-size``, ``--bootstrap``)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return parse


def check_shared_storage(folder, remedy: str) -> None:
    """Refuse a folder on this machine as the run's storage when the Ray cluster this process joined has several
    nodes: Train workers on the other nodes write their checkpoints there, and Train failed at the first one
    ("Unable to set up cluster storage"), after the start-up and an epoch of every trial.

    A cluster is joined with ``--address``, or without it through ``RAY_ADDRESS`` (a ``ray job submit`` driver)
    or a local ``ray start``; a Ray that this process started (:func:`start_ray`) has one node.

    Raises:
        ValueError: naming the cluster, its node count, the folder and ``remedy``.
    """
    if _STARTED_HERE:
        return
    import ray

    nodes = [node for node in ray.nodes() if node.get("Alive")]
    if len(nodes) > 1:
        where = os.environ.get("RAY_ADDRESS") or getattr(ray.get_runtime_context(), "gcs_address", None)
        raise ValueError(
            f"the cluster {f'at {where} ' if where else 'this command joined '}has {len(nodes)} nodes but results "
            f"would go to the local folder {folder}: {remedy}"
        )


def check_model(cfg: config_mod.Config, searched: bool = True) -> None:
    """Refuse, before Ray starts, a backbone that timm does not have or a freeze depth beyond a backbone's units.

    Both failed in every Train worker before: after Ray's start-up, as a traceback (the reference's
    ``--upto_freeze 30`` on the default convnext_atto, which has 18 units). With ``searched`` (``tune``), every
    backbone and freeze depth that the search space can draw is checked in place of the fixed value it overrides;
    ``train`` ignores the space.

    Raises:
        ConfigError: naming the key, the value and the backbone's unit count.
    """
    from mammo_ray import model as model_mod

    def drawn(key: str, fixed):
        spec = cfg.space.get(key) if searched else None
        if not isinstance(spec, dict):
            return [(key, fixed)]
        if isinstance(spec.get("values"), list):
            return [(f"space.{key}", value) for value in spec["values"]]
        return [(f"space.{key}", spec[bound]) for bound in ("low", "high") if bound in spec]

    known = model_mod.available_backbones()
    backbones = drawn("model.backbone", cfg.model.backbone)
    for key, backbone in backbones:
        if backbone not in known:
            raise config_mod.ConfigError(
                f"{key}: unknown backbone {backbone!r}; mammo_ray builds timm's ConvNeXt V1/V2 models: "
                f"{', '.join(known)}"
            )
        units = model_mod.count_units(backbone)
        for freeze_key, depth in drawn("model.freeze_units", cfg.model.freeze_units):
            if isinstance(depth, int | float) and not 0 <= depth <= units:
                raise config_mod.ConfigError(
                    f"{freeze_key}: {depth:g} freeze units, but {backbone} has {units} (0 … {units}; README, "
                    "'Model, freeze depth and losses'). The reference's --upto_freeze numbers count "
                    "convnext_small's 42 units."
                )
    pretrained = [value for _, value in drawn("model.pretrained", cfg.model.pretrained) if value]
    frozen = [(key, depth) for key, depth in drawn("model.freeze_units", cfg.model.freeze_units) if depth]
    if frozen and not pretrained:
        key, depth = max(frozen, key=lambda item: item[1])
        print(
            f"warning: {key} freezes up to {depth:g} unit(s) of a randomly initialised model (model.pretrained is "
            "not set): frozen random weights stay random; set model.pretrained to a weights file",
            file=sys.stderr,
        )
    files = [
        (key, value)
        for key, value in drawn("model.pretrained", cfg.model.pretrained)
        if isinstance(value, str) and value and not value.startswith(model_mod.TIMM_PREFIX)
    ]
    if files:
        builds = itertools.product(
            [backbone for _, backbone in backbones],
            [stem for _, stem in drawn("model.stem", cfg.model.stem)],
            [norm for _, norm in drawn("model.norm", cfg.model.norm)],
        )
        check_weights(files, list(builds), cfg.model.in_chans)


def check_weights(files: list[tuple[str, str]], builds: list[tuple[str, str, str]], in_chans: int = 1) -> None:
    """Refuse, before Ray starts, a weights file in which no tensor fits the model, and warn of partial fits.

    Each file is matched against each (backbone, stem, norm) the run can build, on the meta device (no weights
    are allocated), by the rules of ``model.load_pretrained``: before, a file of another architecture failed in
    every Train worker ("No tensor ... fits") after Ray's start-up.

    Raises:
        ConfigError: naming the key and the file, with the loader's reason.
    """
    import torch

    from mammo_ray import model as model_mod

    for key, path in files:
        try:
            tensors = model_mod.read_state_dict(path)  # once per file, however many builds it is matched against
        except (OSError, ValueError) as err:
            raise config_mod.ConfigError(f"{key}: {path}: {err}") from err
        for backbone, stem, norm in builds:
            with torch.device("meta"):
                net = model_mod.create_model(backbone, in_chans=in_chans, stem=stem, norm=norm)
            try:
                report = model_mod.check_pretrained(net, path, tensors)
            except ValueError as err:
                raise config_mod.ConfigError(f"{key}: {err} (backbone {backbone}, stem={stem}, norm={norm})") from err
            problems = report.problems
            if problems:
                print(
                    f"warning: {key}: {len(report.loaded)} of {len(net.state_dict())} tensors of {backbone} "
                    f"(stem={stem}, norm={norm}) load from {path}; the rest keep their random initialisation "
                    f"({len(problems)} mismatches, first: {problems[0]})",
                    file=sys.stderr,
                )


# The node label that says "an autoscaler may add nodes to this cluster". Every `cluster/` config sets it on its
# head (`ray start --labels`); a user's own autoscaling cluster can set it the same way.
GROWS_LABEL = "mammo-ray/autoscaling"


def cluster_is_fixed(nodes: list[dict] | None = None) -> bool:
    """Whether no node will join: a Ray that this process started, or a joined cluster that neither labels a node
    with :data:`GROWS_LABEL` ``=true`` nor has an autoscaling config recorded in Ray.

    Ray Train reads that record (``get_max_resources_from_cluster_config``) to tell whether a worker group can ever
    fit, but in Ray 2.60 no autoscaler writes it (only a later autoscaler v2 reports it), so on the `cluster/`
    clusters the label is what says they grow. Where neither says so, or Ray cannot be asked, the cluster counts as
    fixed: capping a sweep that could have grown costs concurrency, while not capping one that cannot grow leaves
    Ray Data no CPU and hangs it.

    Args:
        nodes: the alive nodes as ``ray.nodes()`` lists them (default: asked from Ray).
    """
    if _STARTED_HERE:
        return True
    import ray

    try:
        from ray._private import state

        if state.state.get_max_resources_from_cluster_config():
            return False
    except Exception:  # a private API: if it moves, ask the labels
        pass
    try:
        if nodes is None:
            nodes = [n for n in ray.nodes() if n.get("Alive")]
    except Exception:  # cannot be asked: be safe
        return True
    return not any((n.get("Labels") or {}).get(GROWS_LABEL) == "true" for n in nodes)


def check_placement(cfg: config_mod.Config, nodes: list[dict] | None = None, fixed: bool | None = None) -> list[str]:
    """Refuse a run whose Train workers no node can host, before a trial waits for them forever.

    Ray queues a worker that asks for more than any node has, without an error: a GPU space on a machine without
    a GPU, or more CPUs per worker than a node has, left ``tune`` and ``train`` waiting silently. On a cluster
    that cannot grow (``fixed``, see :func:`cluster_is_fixed`) nothing will join, so that is an error; Ray Train
    itself checks only clusters whose autoscaling config Ray records and, on the others, waits. On a cluster an
    autoscaler may still add such nodes to, it is a warning, printed and returned. (Ray Data's share of the CPUs is
    ``tune.fit_concurrency``'s.)

    Args:
        nodes: the alive nodes' resources (default: asked from Ray).
        fixed: whether the cluster cannot grow (default: :func:`cluster_is_fixed`).

    Raises:
        ValueError: the run cannot start here; the message names the keys to change.
    """
    if nodes is None:
        import ray

        alive = [n for n in ray.nodes() if n.get("Alive")]
        nodes = [n.get("Resources", {}) for n in alive]
        if fixed is None:
            fixed = cluster_is_fixed(alive)
    if fixed is None:
        fixed = cluster_is_fixed()
    res = cfg.resources
    cpus, gpus = res.cpus_per_worker, res.gpus_per_worker

    def hosts(node: dict) -> int:
        fits = [node.get("CPU", 0.0) / cpus if cpus > 0 else float("inf")]
        if gpus > 0:
            fits.append(node.get("GPU", 0.0) / gpus)
        return int(min(fits) + 1e-9)

    total_cpus = sum(n.get("CPU", 0.0) for n in nodes)
    total_gpus = sum(n.get("GPU", 0.0) for n in nodes)
    where = (
        f"this machine has {total_cpus:g} CPUs and {total_gpus:g} GPUs"
        if len(nodes) == 1
        else f"the cluster's {len(nodes)} nodes have {total_cpus:g} CPUs and {total_gpus:g} GPUs"
    )
    hosted = sum(hosts(n) for n in nodes)
    if hosted >= res.num_workers:
        return []
    need = f"{cpus:g} CPUs" + (f" and {gpus:g} GPU(s)" if gpus > 0 else "")
    problem = (
        f"{res.num_workers} Train worker(s) of {need} each (resources.num_workers, resources.cpus_per_worker, "
        f"resources.gpus_per_worker) do not fit: {where}, room for {hosted} such worker(s)"
    )
    if fixed:
        # Only a cluster that cannot grow is told to train on CPUs: a joined one may still get GPU nodes.
        cpu_hint = "; to train on CPUs set resources.gpus_per_worker=0" if gpus > 0 and total_gpus == 0 else ""
        static = (
            ""
            if _STARTED_HERE
            else f"; no node of this cluster is labelled {GROWS_LABEL}=true and Ray holds no autoscaling config for "
            "it, so no node will join"
        )
        raise ValueError(problem + static + cpu_hint)
    message = f"{problem}; the run waits until nodes with these resources join the cluster"
    print(f"warning: {message}", file=sys.stderr)
    return [message]


def check_address(address: str | None, timeout_s: float = 5.0) -> None:
    """Fail within seconds when nothing listens at ``--address`` ``host:port`` (or ``ray://host:port``).

    ``ray.init`` on an address where no cluster answers retried for minutes, printing only GCS time-outs. ``auto``
    and addresses without a port are left to Ray.

    Raises:
        ValueError: naming the address and what the connection attempt said.
    """
    if not address or address == "auto":
        return
    host, _, port = address.split("://", 1)[-1].rstrip("/").rpartition(":")
    if not port.isdigit():
        return
    host = host.strip("[]")  # an IPv6 literal, [::1]:6379
    try:
        socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout_s).close()
    except OSError as err:
        raise ValueError(
            f"--address {address}: no Ray cluster answers at {host or '127.0.0.1'}:{port} ({err}); give the head "
            "node's address as `ray start --head` printed it (GCS port 6379 by default, ray://…:10001 for Ray "
            "Client), or `auto` on a node of the cluster"
        ) from err


def pin_ray_address() -> None:
    """Worker setup hook: make Ray's address auto-detection in every worker find this worker's own cluster.

    Train V2's PlacementGroupCleaner asks the state API about the Train controller without an address. With
    more than one Ray instance on the machine that look-up raises "Found multiple active Ray instances", the
    cleaner's monitor dies, and every trial that Tune stops (ASHA, max_t, Ctrl-C) leaves its workers'
    placement group reserved; the next trial's Ray Data then never gets a whole CPU and the sweep hangs.
    """
    import ray

    os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address


def apply_smoke_test(cfg: config_mod.Config) -> None:
    """A handful of images, one epoch, two trials, on CPU."""
    cfg.train.epochs = 1
    cfg.search.num_samples = 2
    cfg.search.grace_period = 1
    cfg.resources.num_workers = 1
    cfg.resources.gpus_per_worker = 0.0
    cfg.resources.cpus_per_worker = min(cfg.resources.cpus_per_worker, 0.5)
    cfg.resources.max_concurrent_trials = 1
    cfg.train.amp = False
    cfg.train.batch_size = min(cfg.train.batch_size, 8)
    cfg.train.epoch_length = 32
    cfg.data.image_size = [64, 48]
    cfg.model.backbone = "convnext_atto"
    cfg.model.pretrained = None
    cfg.model.freeze_units = min(cfg.model.freeze_units, 2)
    cfg.train.mc_dropout_samples = min(cfg.train.mc_dropout_samples, 2)
    cfg.data.synthetic.patients = 16
    cfg.data.synthetic.prevalence = 0.25
    cfg.data.synthetic.size = [128, 104]
    cfg.data.synthetic.out = str(Path(cfg.data.synthetic.out).with_name(Path(cfg.data.synthetic.out).name + "-smoke"))
    for key, spec in list(cfg.space.items()):
        if key == "model.freeze_units" and spec["type"] == "int":
            spec["high"] = min(spec["high"], 2)
            spec["low"] = min(spec["low"], spec["high"] - 1)
        if key in ("data.image_size", "model.backbone", "train.epochs", "train.batch_size"):
            del cfg.space[key]
    config_mod.validate(cfg, "smoke test")


def manifest_paths(cfg: config_mod.Config, args) -> dict[str, str | None]:
    """The manifests from the flags or the space file, local ones made absolute (:func:`absolute_path`)."""
    return {
        role: absolute_path(getattr(args, role, None) or getattr(cfg.data, role)) for role in ("train", "valid", "test")
    }


def absolute_path(path: str | None) -> str | None:
    """A local path made absolute against this process's working directory; None and URIs stay as they are.

    Every path that travels to Ray has to be absolute: Tune runs each trial in its own trial folder and Train each
    worker in its run's folder, so a relative path given on the command line finds nothing there. Symbolic links
    are kept (not resolved), so that nodes that mount shared storage at the same path see the same name.
    """
    if not path or storage.is_uri(str(path)):
        return path
    return os.path.abspath(os.path.expanduser(str(path)))


def resolve_weights(cfg: config_mod.Config) -> None:
    """Make ``model.pretrained`` (and its values in the search space) absolute, and check the files exist.

    Checked before Ray starts: the Train workers load the file in their run's folder, where a relative path finds
    nothing, and a missing file would otherwise fail every trial after Ray's start-up. ``timm:<tag>`` is left
    alone; a URI is refused (the model loads local files only). On a multi-node cluster the file must exist at the
    same path on every node.

    Raises:
        ConfigError: a weights file that does not exist, named with its key.
    """

    def resolve(value, key: str):
        if not isinstance(value, str) or not value or value.startswith("timm:"):
            return value
        path = absolute_path(value)
        if storage.is_uri(path) or not Path(path).is_file():
            raise config_mod.ConfigError(f"{key}: local weights file {value!r} not found (looked for {path})")
        return path

    cfg.model.pretrained = resolve(cfg.model.pretrained, "model.pretrained")
    spec = cfg.space.get("model.pretrained")
    if isinstance(spec, dict) and isinstance(spec.get("values"), list):
        spec["values"] = [resolve(value, "space.model.pretrained") for value in spec["values"]]


def needs_synthetic(cfg: config_mod.Config, args, reference_csvs=(None, None)) -> bool:
    """Whether the run trains on the synthetic set: no data of the user's was named at all, and the config allows it."""
    paths = manifest_paths(cfg, args)
    return not (any(paths.values()) or any(reference_csvs)) and cfg.data.synthetic.enabled


def check_data_given(cfg: config_mod.Config, args, reference_csvs=(None, None)) -> None:
    """Fail fast, before Ray starts, when there is no data to train on, or only part of the user's.

    Half of a pair (``--train`` without ``--valid``, a test manifest alone, one of the reference's CSVs) is an
    error even where the synthetic set is enabled: falling back to it would train on other data than was named.
    """
    paths = manifest_paths(cfg, args)
    if paths["train"] and paths["valid"]:
        return
    if all(reference_csvs):
        return
    named = [f"--{role} {paths[role]}" for role in ("train", "valid", "test") if paths[role]]
    flags = ("train_csv_pth", "valid_csv_pth")
    named += [f"--{flag} {csv}" for flag, csv in zip(flags, reference_csvs, strict=True) if csv]
    if named:
        raise DataMissingError(
            f"{', '.join(named)} given without the rest of its pair: pass both --train and --valid manifests (or "
            "set data.train and data.valid in the space file), or both --train_csv_pth and --valid_csv_pth for "
            "train. Nothing was run: the built-in synthetic set is used only when no data is named at all."
        )
    if cfg.data.synthetic.enabled:
        return
    missing = [f"--{role}" for role in ("train", "valid") if not paths[role]]
    raise DataMissingError(
        f"no {' and '.join(missing)} manifest given. Pass --train and --valid (Parquet manifests from "
        "`python -m mammo_ray.prepare`), or set data.train/data.valid in the space file. To try mammo_ray "
        "on the built-in synthetic data set, run `make demo` (search_spaces/demo.yaml)."
    )


def synthetic_manifests(cfg: config_mod.Config) -> dict[str, str]:
    """Generate (once) and prepare (once) the synthetic data set; return its manifest paths."""
    from mammo_ray import importers, prepare, synth

    spec = cfg.data.synthetic
    root = Path(spec.out)
    info = synth.generate(
        root, patients=spec.patients, prevalence=spec.prevalence, size=tuple(spec.size), seed=spec.seed
    )
    prepared = root / "prepared"
    size = tuple(cfg.data.image_size)
    expected = {role: prepared / f"{role}.parquet" for role in manifest.SPLITS}
    table = importers.import_source("generic", [info["manifest_csv"]], root)
    paths = prepare.run(table, prepared, size=size, fractions=tuple(spec.split), seed=spec.seed, progress=False)
    return {role: str(paths.get(role, expected[role])) for role in manifest.SPLITS if role in paths}


def resolve_data(cfg: config_mod.Config, args, reference_csvs=(None, None)) -> dict[str, pd.DataFrame]:
    """Validated manifests from flags, the space file, the reference's CSVs or the synthetic set."""
    check_data_given(cfg, args, reference_csvs)
    paths = manifest_paths(cfg, args)
    if not (paths["train"] and paths["valid"]) and all(reference_csvs):
        frames = _reference_frames(reference_csvs, test=paths["test"], use_cache=cfg.data.use_cache)
        if "test" in frames and cfg.data.use_cache:
            source = storage.public(paths["test"])
            manifest.check_cache_size(frames["test"], cfg.data.image_size, source, cache_size_remedy(cfg))
        check_classes(frames, cfg.search.metric)
        warn_unflippable(cfg, frames["train"])
        return frames
    if needs_synthetic(cfg, args, reference_csvs):
        start_ray(address=getattr(args, "address", None))
        generated = synthetic_manifests(cfg)
        paths = {"train": generated["train"], "valid": generated["valid"], "test": generated.get("test")}
    frames = manifest.load_manifests(paths, use_cache=cfg.data.use_cache)
    for role, frame in frames.items():
        frame.attrs["path"] = paths[role]
        if cfg.data.use_cache:
            manifest.check_cache_size(frame, cfg.data.image_size, storage.public(paths[role]), cache_size_remedy(cfg))
    check_classes(frames, cfg.search.metric)
    warn_unflippable(cfg, frames["train"])
    return frames


def warn_unflippable(cfg: config_mod.Config, train: pd.DataFrame) -> bool:
    """Warn, once per command, when augmentation is on but no training image's view allows the vertical flip
    (``augment.flips_vertically``): a manifest without CC views or without a ``view`` column then trains with no
    flip at all, which the space file does not say. Returns whether it warned."""
    if not (cfg.train.augment or "train.augment" in cfg.space) or train.empty:
        return False
    from mammo_ray import augment

    views = train["view"] if "view" in train.columns else pd.Series([None] * len(train))
    if any(augment.flips_vertically(view) for view in views.unique()):
        return False
    shown = sorted({str(v) for v in views.unique()})[:5]
    print(
        f"warning: no training image is flipped vertically: the flip is only for CC-family views "
        f"({', '.join(sorted(augment.VERTICAL_FLIP_VIEWS))}), and the training manifest's views are "
        f"{', '.join(shown) if 'view' in train.columns else 'missing (no view column)'}; the other transforms "
        "still apply",
        file=sys.stderr,
    )
    return True


# Selection metrics (search.metric) that stay defined on a validation split of one class.
ONE_CLASS_METRICS = ("val_loss", "val_ece", "val_brier")


def check_classes(frames: dict[str, pd.DataFrame], metric: str, roles=("train", "valid")) -> None:
    """Refuse, before Ray starts, a training split of one class, and a validation split of one class unless ``metric``
    stays defined on it (then warn).

    A training split of one class has nothing to learn from, and the weighted and balanced samplers fail in every
    Train worker after Ray's start-up. On a validation split of one class the AUCs are undefined, so a sweep selecting
    by them has no epoch to compare or export.

    Raises:
        manifest.ManifestError: naming the manifest, its label and its number of images.
    """
    for role in roles:
        frame = frames.get(role)
        if frame is None or frame.empty:
            continue
        labels = sorted(set(pd.to_numeric(frame["label"], errors="coerce").dropna().astype(int)))
        if len(labels) != 1:
            continue
        where = f"manifest {frame.attrs.get('source', role)} ({role}): all {len(frame)} image(s) have label {labels[0]}"
        if role == "train":
            raise manifest.ManifestError(
                f"{where}; training needs both classes (there is nothing to learn from one, and the weighted and "
                "balanced samplers cannot form their batches). Check the label column, or the split: prepare's "
                "summary prints the positives per split."
            )
        if metric not in ONE_CLASS_METRICS:
            raise manifest.ManifestError(
                f"{where}; search.metric {metric} is undefined on one class, so no epoch could be compared or "
                f"exported. Give a validation manifest with both classes, or select by {', '.join(ONE_CLASS_METRICS)} "
                "(--set search.metric=val_loss --set search.mode=min)."
            )
        print(
            f"warning: {where}; its AUCs are undefined (null in metrics.json), and epochs are selected by {metric}",
            file=sys.stderr,
        )


def cache_size_remedy(cfg: config_mod.Config) -> str:
    height, width = cfg.data.image_size
    return (
        f"Prepare a cache at this size (`python -m mammo_ray.prepare ... --size {height} {width}`; a new cache "
        f"folder, the old one is kept) and pass its manifests, set data.image_size to the cache's size, or set "
        f"data.use_cache=false to decode the source images at {height}×{width}."
    )


def model_size_remedy(image_size, then: str) -> str:
    """What to do about a cache smaller than a trained model's input (``predict``, ``export --test``)."""
    height, width = image_size
    return (
        f"The model takes {height}×{width}: prepare a cache at that size (`python -m mammo_ray.prepare ... "
        f"--size {height} {width}`) and {then}."
    )


def _reference_frames(csvs, test=None, use_cache: bool = True) -> dict[str, pd.DataFrame]:
    """The reference's train/valid CSVs (decoded on the fly) and an optional ``--test`` manifest, all validated."""
    from mammo_ray import importers

    frames = {}
    for role, csv in zip(("train", "valid"), csvs, strict=True):
        frame = importers.import_source("seed", [csv], Path(csv).parent)
        frame["split"] = role
        frame.attrs["source"] = csv
        manifest.validate_manifest(frame, csv, use_cache=False)
        frames[role] = frame
    if test:
        # Checked as --test is beside --train/--valid: a bad label would otherwise fail the export after training.
        frames["test"] = manifest.load_manifests({"test": test}, use_cache=use_cache)["test"]
    manifest.check_overlap(frames)
    return frames


def subset_frames(frames: dict[str, pd.DataFrame], args, seed: int, metric: str) -> dict[str, pd.DataFrame]:
    """The reference's --data, --dataset_partition and --rows_experiment, patient-level and seeded.

    A subset left with one class is refused as :func:`check_classes` refuses it (``metric``: ``search.metric``).
    """
    from mammo_ray import importers

    wanted = [d.strip() for d in (getattr(args, "data", None) or "").split(",") if d.strip()]
    if wanted:
        for role in list(frames):
            kept = frames[role][frames[role]["dataset"].isin(wanted)]
            if kept.empty:
                raise ValueError(
                    f"--data {','.join(wanted)}: no {role} rows; datasets: {sorted(frames[role]['dataset'].unique())}"
                )
            frames[role] = kept.reset_index(drop=True)
    fraction = getattr(args, "dataset_partition", None)
    rows = getattr(args, "rows_experiment", None)
    if fraction or rows:
        frames["train"] = importers.subset_patients(frames["train"], fraction=fraction, n_rows=rows, seed=seed)
    if wanted or fraction or rows:
        check_classes(frames, metric, roles=("train", "valid") if wanted else ("train",))
    return frames


def main(argv: list[str] | None = None) -> int:
    """``mammo-ray <command> [flags]``: the same commands as ``python -m mammo_ray.<command>``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    usage = f"usage: mammo-ray {{{','.join(COMMANDS)}}} [flags]   (each also runs as python -m mammo_ray.<command>)"
    if argv and argv[0] in ("-h", "--help"):
        print(usage)
        return 0
    if not argv or argv[0] not in COMMANDS:
        import difflib

        print(usage, file=sys.stderr)
        if argv:
            close = difflib.get_close_matches(argv[0], COMMANDS, n=1)
            hint = f"; did you mean {close[0]}?" if close else ""
            print(f"mammo-ray: error: unknown command {argv[0]!r}{hint}", file=sys.stderr)
        return 2
    import importlib

    module = importlib.import_module(f"mammo_ray.{argv[0]}")
    return module.main(argv[1:])


if __name__ == "__main__":
    # The importable module's main, not this ``__main__`` copy's: Ray pickles ``__main__`` by value (see prepare.py).
    from mammo_ray import cli as _module

    raise SystemExit(_module.main())
