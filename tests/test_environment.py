"""Tests for mammo_ray.environment: what a run records about the machine it ran on."""

from __future__ import annotations

import json

import torch

from mammo_ray import environment


def test_describe_records_hardware_kernels_threads_and_versions(monkeypatch) -> None:
    for name in environment.KERNEL_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    found = environment.describe(torch.device("cpu"), num_workers=2)
    assert found["device"] == "cpu"
    assert found["cpu_model"] == environment.cpu_model() and found["cpu_model"]
    assert found["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert found["torch_threads"] == torch.get_num_threads()
    assert found["num_workers"] == 2
    assert found["versions"]["torch"] == torch.__version__
    assert "gpu" not in found and "kernel_settings" not in found
    json.dumps(found)  # stored in report.json as it is
    # A variable that limits oneDNN's kernels changes the rounding, so it is recorded and shown.
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    limited = environment.describe(torch.device("cpu"))
    assert limited["kernel_settings"] == {"ONEDNN_MAX_CPU_ISA": "AVX2"}
    assert "ONEDNN_MAX_CPU_ISA=AVX2" in environment.summary(limited)
    # glibc's malloc settings change the speed, not the rounding: recorded, not on the card's line.
    for name in environment.MALLOC_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    assert "malloc_settings" not in environment.describe(torch.device("cpu"))
    monkeypatch.setenv("MALLOC_ARENA_MAX", "1")
    tuned = environment.describe(torch.device("cpu"))
    assert tuned["malloc_settings"] == {"MALLOC_ARENA_MAX": "1"}
    assert "MALLOC" not in environment.summary(tuned)


def test_summary_reads_a_cpu_and_a_gpu_record() -> None:
    cpu = {
        "device": "cpu",
        "cpu_model": "Some CPU",
        "cpu_capability": "AVX2",
        "torch_threads": 2,
        "num_workers": 1,
        "versions": {"python": "3.11.9", "torch": "2.15.0", "timm": None},
    }
    assert (
        environment.summary(cpu) == "Some CPU (CPU kernels AVX2, 2 thread(s)), 1 worker(s); python 3.11.9, torch 2.15.0"
    )
    gpu = {**cpu, "device": "cuda", "gpu": "NVIDIA H100", "cuda": "13.2", "num_workers": 8}
    assert environment.summary(gpu).startswith("NVIDIA H100 (CUDA 13.2), 8 worker(s); ")
    # A checkpoint written before the environment was recorded.
    assert environment.summary({}) == "not recorded"


def test_library_versions_name_a_missing_library_as_none(monkeypatch) -> None:
    monkeypatch.setattr(environment, "LIBRARIES", ("torch", "no_such_module_here"))
    versions = environment.library_versions()
    assert versions["no_such_module_here"] is None and versions["torch"] == torch.__version__
