"""Shared plumbing of the benchmark programs: machine facts, JSON results, timers, Ray start-up, data.

Every benchmark compares "ours" (mammo_ray's own code path) with a baseline measured in the same run on
the same data, and writes one JSON object (printed, and saved with ``--out FILE``) with at least
``benchmark, ours, baseline, ratio, unit, params, machine, date``; ``ratio`` is ours/baseline and higher
is better. Data sets are generated and prepared once into a cache folder that later runs reuse:
``$MAMMO_RAY_BENCH_DIR``, by default ``<tmp>/mammo_ray_bench``.

Process statistics come from ``/proc`` (Linux), so that the peak memory and CPU time of Ray's worker
processes, which are not children the driver waits on, can be read as well as the driver's own.
"""

from __future__ import annotations

import _thread
import argparse
import datetime as dt
import json
import logging
import math
import os
import platform
import resource
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python benchmarks/x.py` from a checkout without an installed package
    sys.path.insert(0, str(REPO))

# Quiet Ray; set before Ray starts so that every worker process inherits them.
QUIET_ENV = {
    "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    "RAY_DEDUP_LOGS": "1",
    "RAY_AUTH_MODE": "disabled",
    # Workers' Python loggers at WARNING: Train's per-report INFO lines would bury the figures.
    "RAY_LOGGER_LEVEL": "warning",
    "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S": "60",
    "PYTHONWARNINGS": "ignore::DeprecationWarning",
}
# Synthetic set shared by ingest, train_overhead and sweep_efficiency: more cancers than the demo's 5 %, so
# that a small validation split still has enough positives for an AUC.
SYNTH_PREVALENCE = 0.15
SYNTH_SPLIT = (0.6, 0.2, 0.2)


def bench_dir() -> Path:
    """The folder where generated and prepared data sets live between runs."""
    root = os.environ.get("MAMMO_RAY_BENCH_DIR") or str(Path(tempfile.gettempdir()) / "mammo_ray_bench")
    path = Path(root).expanduser().resolve()
    path.mkdir(parents=True, exist_ok=True)
    return path


# Ray Data's default logging config with the console at WARNING (the per-execution INFO lines go to the file).
_RAY_DATA_LOGGING = """\
version: 1
disable_existing_loggers: false
formatters:
  ray: {format: "%(asctime)s\\t%(levelname)s %(filename)s:%(lineno)s -- %(message)s"}
filters:
  console_filter: {"()": ray.data._internal.logging.HiddenRecordFilter}
handlers:
  file: {class: ray.data._internal.logging.SessionFileHandler, formatter: ray, filename: ray-data.log}
  console: {class: ray._private.log.PlainRayHandler, formatter: ray, level: WARNING, filters: [console_filter]}
loggers:
  ray.data: {level: DEBUG, handlers: [file, console], propagate: false}
"""


def set_quiet_env() -> None:
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    if "RAY_DATA_LOGGING_CONFIG" not in os.environ:
        path = bench_dir() / "ray_data_logging.yaml"
        if not path.is_file() or path.read_text() != _RAY_DATA_LOGGING:
            path.write_text(_RAY_DATA_LOGGING)
        os.environ["RAY_DATA_LOGGING_CONFIG"] = str(path)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name in ("ray", "ray.data", "ray.train", "ray.tune", "filelock", "optuna", "mammo_ray"):
        logging.getLogger(name).setLevel(logging.WARNING)


def cores() -> int:
    """CPU cores this process may run on (the affinity mask, not the host's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def start_ray(num_cpus: int | None = None) -> int:
    """Start a fresh local Ray instance with ``num_cpus`` (default: this machine's cores); return that number.

    ``address="local"`` never joins another process's cluster on a shared machine. The dashboard stays on:
    without it Train V2's placement-group cleaner warns every second. The cluster gets the same system settings
    as one that ``tune``/``train`` start themselves (``cli.LOCAL_SYSTEM_CONFIG``: idle workers are kept for a
    minute), so that per-trial start-up costs here what it costs a user.
    """
    import ray

    from mammo_ray import cli

    set_quiet_env()
    num_cpus = num_cpus or cores()
    if ray.is_initialized():
        return int(ray.cluster_resources().get("CPU", num_cpus))
    _pin_address()
    ray.init(
        address="local",
        num_cpus=num_cpus,
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        logging_level=logging.WARNING,
        log_to_driver=True,
        runtime_env={"env_vars": {k: os.environ[k] for k in (*QUIET_ENV, "RAY_DATA_LOGGING_CONFIG")}},
        _system_config=dict(cli.LOCAL_SYSTEM_CONFIG),
    )
    return num_cpus


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def _pin_address() -> None:
    """Fix the new cluster's GCS port and export its address, so that every Ray process it starts knows it.

    Train V2's PlacementGroupCleaner finds "the" cluster through the state API, which looks for running GCS
    processes when RAY_ADDRESS is unset; with another Ray instance on the machine (CI runners, a shared
    workstation) it fails with "Found multiple active Ray instances", and a trial's placement group that the
    cleaner should remove stays reserved: its CPUs are lost to Ray Data and the next trial's pipeline waits
    forever. ``address="local"`` still starts a new cluster; child processes inherit this environment.
    """
    from ray._private.services import get_node_ip_address

    port = _free_port()
    os.environ["RAY_GCS_SERVER_PORT"] = str(port)
    os.environ["RAY_ADDRESS"] = f"{get_node_ip_address()}:{port}"


# --------------------------------------------------------------------------------------------------
# Machine facts and results.


def _ram_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def gpu_info() -> dict[str, Any] | None:
    """Name, count and memory of the CUDA GPUs, or None when torch sees none."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(0)
    return {
        "name": props.name,
        "count": torch.cuda.device_count(),
        "memory_gib": round(props.total_memory / 2**30, 1),
        "cuda": torch.version.cuda,
    }


def machine_info() -> dict[str, Any]:
    """CPU model, cores, RAM, GPU, load and library versions: what a reader needs to compare figures."""
    from mammo_ray import environment

    try:
        load = [round(v, 2) for v in os.getloadavg()]
    except OSError:
        load = None
    return {
        "cpu_model": environment.cpu_model(),
        "cpu_capability": environment.cpu_capability(),
        "cores": cores(),
        "host_cpus": os.cpu_count(),
        "ram_gib": _ram_gib(),
        "gpu": gpu_info(),
        "os": platform.platform(),
        "load_average_1_5_15": load,
        "versions": environment.library_versions(),
    }


def now_iso() -> str:
    return dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat()


def _clean(value: Any) -> Any:
    """JSON-safe: NaN/inf become None, numpy scalars plain numbers, paths strings."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, str | bytes):
        try:
            value = value.item()
        except (TypeError, ValueError):
            return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value


def finish(
    name: str,
    *,
    ours: float,
    baseline: float,
    unit: str,
    params: dict[str, Any],
    out: str | None,
    target_ratio: float | None = None,
    extra: dict[str, Any] | None = None,
    started: float | None = None,
    invalid_reason: str | None = None,
) -> dict[str, Any]:
    """Build the result object, print it and write it to ``out`` (when given).

    Args:
        invalid_reason: why ``ratio`` does not answer the benchmark's question (an AUC condition not met, errored
            trials); the JSON then says ``ratio_valid: false`` with this reason, and ``meets_target`` is false.
    """
    ratio = ours / baseline if baseline and math.isfinite(baseline) and baseline > 0 else float("nan")
    meets_target = None if target_ratio is None or not math.isfinite(ratio) else bool(ratio >= target_ratio)
    if invalid_reason is not None:
        meets_target = False if target_ratio is not None else None
        print(f"{name}: the ratio does not count: {invalid_reason}", file=sys.stderr)
    result = {
        "benchmark": name,
        "ours": ours,
        "baseline": baseline,
        "ratio": ratio,
        "ratio_valid": invalid_reason is None,
        "ratio_invalid_reason": invalid_reason,
        "unit": unit,
        "target_ratio": target_ratio,
        "meets_target": meets_target,
        **(extra or {}),
        "params": params,
        "machine": machine_info(),
        "date": now_iso(),
    }
    if started is not None:
        result["wall_time_s"] = round(time.perf_counter() - started, 1)
    return write_result(result, out)


def write_result(result: dict[str, Any], out: str | Path | None) -> dict[str, Any]:
    """Print ``result`` as JSON and, when ``out`` is given, write it there atomically; return the cleaned object.

    NaN and infinities become null (``allow_nan=False`` would catch one that slipped through: ``NaN`` is not
    JSON), and the file is written to a temporary sibling and renamed, so a reader never sees half a result.
    """
    from mammo_ray.io import atomic_write_text

    result = _clean(result)
    text = json.dumps(result, indent=2, allow_nan=False)
    print(text, flush=True)
    if out:
        path = atomic_write_text(out, text + "\n")
        print(f"written to {path}", file=sys.stderr)
    return result


def int_at_least(minimum: int):
    """An argparse ``type``: an integer of at least ``minimum``, or exit code 2 with a message saying so."""
    from mammo_ray.cli import int_at_least as parse

    return parse(minimum)


def float_at_least(minimum: float, *, strict: bool = False):
    """An argparse ``type``: a number of at least ``minimum`` (greater than it when ``strict``), or exit code 2."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not (value > minimum if strict else value >= minimum):  # NaN fails too
            bound = "greater than" if strict else "at least"
            raise argparse.ArgumentTypeError(f"must be {bound} {minimum:g}, got {text}")
        return value

    return parse


def base_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="small sizes: minutes on a 2-core machine")
    parser.add_argument("--out", help="also write the JSON result to this file")
    return parser


class Timer:
    """Wall-clock and this-process CPU time of a ``with`` block."""

    def __enter__(self) -> Timer:
        self.start = time.perf_counter()
        self.cpu_start = time.process_time()
        return self

    def __exit__(self, *exc) -> None:
        self.elapsed = time.perf_counter() - self.start
        self.cpu = time.process_time() - self.cpu_start


class Watchdog:
    """Interrupts the main thread when a ``with`` block runs past ``seconds``; hard exit 90 s later.

    A Ray Data pipeline starved of CPUs waits forever instead of failing (README, "The space file", Resources); a
    benchmark should end with a message that says so rather than hang a CI job.
    """

    def __init__(self, seconds: float, what: str):
        self.seconds, self.what = seconds, what
        self.fired = False
        self._timers: list[threading.Timer] = []

    def _interrupt(self) -> None:
        self.fired = True
        print(
            f"\nwatchdog: {self.what} ran past {self.seconds:.0f} s; interrupting. A pipeline that makes no progress "
            "is usually Ray Data starved of CPUs: lower the concurrency or the CPUs per worker.",
            file=sys.stderr,
            flush=True,
        )
        _thread.interrupt_main()
        hard = threading.Timer(90.0, self._hard_exit)
        hard.daemon = True
        hard.start()
        self._timers.append(hard)

    def _hard_exit(self) -> None:
        print(f"watchdog: {self.what} did not stop after the interrupt; exiting", file=sys.stderr, flush=True)
        try:
            import ray

            ray.shutdown()
        finally:
            os._exit(124)

    def __enter__(self) -> Watchdog:
        timer = threading.Timer(self.seconds, self._interrupt)
        timer.daemon = True
        timer.start()
        self._timers.append(timer)
        return self

    def __exit__(self, *exc) -> None:
        for timer in self._timers:
            timer.cancel()


# --------------------------------------------------------------------------------------------------
# Process statistics from /proc (Linux).

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # The command name is in parentheses and may hold spaces; the fields after it are fixed.
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    return children


def process_tree(pid: int | None = None) -> list[int]:
    """``pid`` (default: this process) and all its descendants that are alive now."""
    root = pid or os.getpid()
    children = _children_map()
    out, todo = [], [root]
    while todo:
        current = todo.pop()
        out.append(current)
        todo.extend(children.get(current, []))
    return out


def _status_kib(pid: int, field: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def proc_cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def ray_worker_pids(pids: list[int]) -> list[int]:
    """The Ray worker processes (tasks and actors) among ``pids``; Ray's own agents and daemons excluded."""
    agents = ("ray::RuntimeEnvAgent", "ray::DashboardAgent")
    out = []
    for pid in pids:
        cmdline = proc_cmdline(pid)
        # A worker renames itself ray::IDLE, ray::<task> or ray::<Actor>.<method> once it has started.
        if "default_worker.py" in cmdline or (cmdline.startswith("ray::") and not cmdline.startswith(agents)):
            out.append(pid)
    return out


def peak_rss_mib(pid: int | None = None) -> float:
    """Peak resident memory (VmHWM) of one live process, in MiB (0 once it has exited: sample it while it runs)."""
    return _status_kib(pid or os.getpid(), "VmHWM") / 1024


def rss_mib(pid: int) -> float:
    return _status_kib(pid, "VmRSS") / 1024


def cpu_seconds(pid: int) -> float:
    """User plus system CPU seconds of one live process so far (0 when it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS  # utime, stime (fields 14 and 15 of stat)


def start_ticks(pid: int) -> int | None:
    """When the process started (clock ticks after boot), or None when it is gone: with the pid, an identity that a
    reused pid does not share."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])  # field 22, starttime
    except (OSError, IndexError, ValueError):
        return None


def self_peak_rss_mib() -> float:
    """Peak resident memory of this process, from getrusage (works where /proc does not)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# --------------------------------------------------------------------------------------------------
# Data: the synthetic set, generated and prepared once per parameter set.


def synthetic_set(patients: int, size: tuple[int, int], seed: int = 0, prevalence: float = SYNTH_PREVALENCE) -> dict:
    """Generate (or reuse) a synthetic DICOM set under the bench folder; ``synth.generate``'s summary."""
    from mammo_ray import synth

    # The generator's version is in the name: a new version writes a new folder instead of refusing the old one.
    name = f"synth-v{synth.GENERATOR_VERSION}-p{patients}-{size[0]}x{size[1]}-prev{prevalence}-seed{seed}"
    root = bench_dir() / name
    return synth.generate(root, patients=patients, prevalence=prevalence, size=tuple(size), seed=seed, progress=False)


def prepared_synthetic(
    patients: int,
    synth_size: tuple[int, int],
    image_size: tuple[int, int],
    seed: int = 0,
    prevalence: float = SYNTH_PREVALENCE,
) -> dict[str, str]:
    """Manifests of the synthetic set prepared at ``image_size`` (prepare skips complete shards). Needs Ray."""
    from mammo_ray import importers, prepare

    info = synthetic_set(patients, synth_size, seed, prevalence)
    root = Path(info["manifest_csv"]).parent
    out = root / f"prepared-v{prepare.PREPROCESS_VERSION}-{image_size[0]}x{image_size[1]}"
    expected = {role: out / f"{role}.parquet" for role in ("train", "valid", "test")}
    # prepare writes its summary last, so it marks a complete folder; no marker of our own goes in, as prepare refuses
    # an --out that holds files it did not write.
    if (out / prepare.SUMMARY).is_file() and all(p.is_file() for p in expected.values()):
        return {role: str(p) for role, p in expected.items()}
    (out / "complete").unlink(missing_ok=True)  # the marker this function wrote before
    table = importers.import_source("generic", [info["manifest_csv"]], root)
    paths = prepare.run(table, out, size=tuple(image_size), fractions=SYNTH_SPLIT, seed=seed, progress=False)
    return {role: str(p) for role, p in paths.items()}


def load_frames(paths: dict[str, str]) -> dict:
    """Validated manifests (with the cache columns) for the given paths."""
    from mammo_ray import manifest

    return manifest.load_manifests(paths, use_cache=True)
