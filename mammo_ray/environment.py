"""What a training run ran on: the device, the CPU's kernel set and the library versions.

Each checkpoint's ``report.json`` carries it under ``environment`` and the bundle's MODEL_CARD.md states it,
because a seed fixes a run only on the same kind of machine: oneDNN and ATen pick their CPU kernels by
the instruction set (``cpu_capability``: AVX2, AVX512, ...), and kernels of different width round
differently. On a 2-core Intel Xeon, the BatchNorm ConvNeXt build at 256x208 under ``ONEDNN_MAX_CPU_ISA=AVX2``
ran a different curve from its first epoch (validation AUC 0.52 against 0.62 at epoch 15; docs/demo-log.md).
"""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

LIBRARIES = ("torch", "timm", "ray", "numpy", "pydicom", "albumentations")
# Variables that change which CPU kernels run (and so the rounding), recorded when set.
KERNEL_VARIABLES = (
    "ONEDNN_MAX_CPU_ISA",
    "DNNL_MAX_CPU_ISA",
    "ATEN_CPU_CAPABILITY",
    "MKL_CBWR",
    "MKL_ENABLE_INSTRUCTIONS",
)

# glibc malloc settings (train.CPU_WORKER_ENV sets them for CPU Train workers): they change speed, not results.
MALLOC_VARIABLES = ("MALLOC_ARENA_MAX", "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "GLIBC_TUNABLES")


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo, else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_capability() -> str | None:
    """The instruction set torch's CPU kernels use here (``AVX2``, ``AVX512``, ...), None without torch."""
    try:
        import torch
    except ImportError:
        return None
    return torch.backends.cpu.get_cpu_capability()


def library_versions() -> dict[str, str | None]:
    """Python's and the main libraries' versions; None for one that is not installed."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for module in LIBRARIES:
        try:
            versions[module] = __import__(module).__version__
        except Exception:  # a missing or broken library is a fact to record, not an error
            versions[module] = None
    return versions


def describe(device: Any = None, num_workers: int | None = None) -> dict[str, Any]:
    """The training environment of one worker, as JSON-ready values.

    Args:
        device: the worker's torch device; a CUDA device adds the GPU's name and the CUDA version.
        num_workers: the run's DDP workers, recorded as given.
    """
    import torch

    found: dict[str, Any] = {
        "device": getattr(device, "type", None) or "cpu",
        "cpu_model": cpu_model(),
        "cpu_capability": cpu_capability(),
        "torch_threads": torch.get_num_threads(),
    }
    kernel_settings = {name: os.environ[name] for name in KERNEL_VARIABLES if os.environ.get(name)}
    if kernel_settings:
        found["kernel_settings"] = kernel_settings
    malloc_settings = {name: os.environ[name] for name in MALLOC_VARIABLES if os.environ.get(name)}
    if malloc_settings:
        found["malloc_settings"] = malloc_settings
    if found["device"] == "cuda" and torch.cuda.is_available():
        found["gpu"] = torch.cuda.get_device_name(device)
        found["cuda"] = torch.version.cuda
    if num_workers is not None:
        found["num_workers"] = num_workers
    found["versions"] = library_versions()
    return found


def summary(environment: dict[str, Any]) -> str:
    """One line for the model card: hardware, kernel set, workers and versions."""
    if not environment:
        return "not recorded"
    hardware = environment.get("gpu") or environment.get("cpu_model") or "unknown hardware"
    if environment.get("device") == "cuda" and environment.get("cuda"):
        hardware += f" (CUDA {environment['cuda']})"
    elif environment.get("cpu_capability"):
        settings = "".join(f", {k}={v}" for k, v in (environment.get("kernel_settings") or {}).items())
        hardware += (
            f" (CPU kernels {environment['cpu_capability']}{settings}, {environment.get('torch_threads')} thread(s))"
        )
    workers = environment.get("num_workers")
    versions = environment.get("versions") or {}
    listed = ", ".join(f"{name} {version}" for name, version in versions.items() if version)
    return f"{hardware}" + (f", {workers} worker(s)" if workers else "") + (f"; {listed}" if listed else "")
