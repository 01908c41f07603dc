"""The benchmark programs' own logic: peak-FLOP lookup, when a ratio counts, JSON output, argument checks, RSS peaks.

No benchmark is run here (STYLE.md point 13: benchmarks are programs, and tests never assert timings).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import common  # noqa: E402
import cpu_step  # noqa: E402
import gpu_throughput  # noqa: E402
import ingest  # noqa: E402
import learnability  # noqa: E402
import preprocess  # noqa: E402
import sweep_efficiency  # noqa: E402
import train_overhead  # noqa: E402


@pytest.mark.parametrize(
    ("device_name", "key", "tflops"),
    [
        ("NVIDIA H100 80GB HBM3", "H100", 989),
        ("NVIDIA H100 PCIe", "H100 PCIe", 756),
        ("NVIDIA H100 NVL", "H100 NVL", 835),
        ("NVIDIA H200", "H200", 989),
        ("NVIDIA H200 NVL", "H200 NVL", 835),
        ("NVIDIA GH200 480GB", "GH200", 989),
        ("NVIDIA A100-SXM4-80GB", "A100", 312),
        ("NVIDIA L40S", "L40S", 362),
        ("NVIDIA L40", "L40", 181),
        ("NVIDIA L4", "L4", 121),
        ("NVIDIA A10G", "A10G", 125),
        ("NVIDIA A10", "A10", 125),
        ("NVIDIA GeForce RTX 4090", None, None),
        ("cpu", None, None),
    ],
)
def test_peak_flops_matches_whole_names(device_name, key, tflops):
    found, flops = gpu_throughput.peak_flops(device_name)
    assert found == key
    assert (None if flops is None else round(flops / 1e12)) == tflops


@pytest.mark.parametrize(
    ("ours", "baseline", "within", "invalid"),
    [
        ({"best_val_auc": 0.80, "errored_trials": 0}, {"best_val_auc": 0.805, "errored_trials": 0}, True, []),
        ({"best_val_auc": 0.56, "errored_trials": 0}, {"best_val_auc": 0.66, "errored_trials": 0}, False, ["below"]),
        ({"best_val_auc": None, "errored_trials": 0}, {"best_val_auc": 0.66, "errored_trials": 0}, None, ["no best"]),
        ({"best_val_auc": 0.8, "errored_trials": 2}, {"best_val_auc": 0.8, "errored_trials": 0}, True, ["2 of ours'"]),
        (
            {"best_val_auc": 0.5, "errored_trials": 0},
            {"best_val_auc": 0.8, "errored_trials": 1},
            False,
            ["below", "1 of random's"],
        ),
    ],
)
def test_sweep_ratio_counts_only_with_the_auc_condition_and_no_errors(ours, baseline, within, invalid):
    ours, baseline = {**ours, "trials": 4}, {**baseline, "trials": 4}
    reason = sweep_efficiency.ratio_invalid_reason(ours, baseline, within)
    if not invalid:
        assert reason is None
    else:
        assert all(part in reason for part in invalid)


def test_finish_invalid_ratio_fails_the_target(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(common, "machine_info", lambda: {})
    out = tmp_path / "deep" / "result.json"
    result = common.finish(
        "sweep_efficiency",
        ours=0.3,
        baseline=0.1,
        unit="trials per trial-epoch",
        params={},
        out=str(out),
        target_ratio=2.0,
        invalid_reason="ours' best validation AUC is more than 0.01 below random's",
    )
    assert result["ratio"] == pytest.approx(3.0)
    assert result["ratio_valid"] is False and "below" in result["ratio_invalid_reason"]
    assert result["meets_target"] is False
    assert json.loads(out.read_text())["meets_target"] is False
    assert "does not count" in capsys.readouterr().err


@pytest.mark.parametrize(("baseline", "valid"), [(float("nan"), False), (0.0, False), (0.1, True)])
def test_finish_ratio_and_target(monkeypatch, baseline, valid):
    monkeypatch.setattr(common, "machine_info", lambda: {})
    result = common.finish("x", ours=0.3, baseline=baseline, unit="u", params={}, out=None, target_ratio=2.0)
    assert result["ratio_valid"] is True and result["ratio_invalid_reason"] is None
    assert result["meets_target"] is (True if valid else None)
    assert (result["ratio"] is not None) is valid


def test_write_result_is_valid_json_with_null_for_non_finite(tmp_path):
    import numpy as np

    out = tmp_path / "r.json"
    result = {"a": float("nan"), "b": [float("inf"), np.float32("nan"), np.float64(1.5)], "c": {"d": -math.inf}}
    common.write_result(result, out)
    text = out.read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text) == {"a": None, "b": [None, None, 1.5], "c": {"d": None}}
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]  # no temporary file left behind


@pytest.mark.parametrize(
    ("ours", "baseline", "ratio", "invalid"),
    [
        (0.9, 0.9, 1.0, False),
        (0.6, 0.7, 0.5, False),
        (0.4, 0.9, -0.25, False),
        (0.9, 0.5, None, True),  # max(1e-6, 0) made this 4e5
        (0.9, 0.45, None, True),  # and this 4e5 too, or a flipped sign without the max
        (0.9, float("nan"), None, True),
        (0.9, None, None, True),  # --no-baseline
    ],
)
def test_learnability_auc_ratio(ours, baseline, ratio, invalid):
    value, reason = learnability.auc_ratio(ours, baseline)
    assert value == (None if ratio is None else pytest.approx(ratio))
    assert (reason is not None) is invalid


@pytest.mark.parametrize(
    ("module", "argv"),
    [
        (gpu_throughput, ["--allow-cpu", "--batch-size", "0"]),
        (gpu_throughput, ["--steps", "0"]),
        (gpu_throughput, ["--size", "64", "-1"]),
        (cpu_step, ["--steps", "0"]),
        (cpu_step, ["--threads", "0"]),
        (ingest, ["--repeats", "0"]),
        (ingest, ["--workers", "0"]),
        (ingest, ["--epochs", "-1"]),
        (ingest, ["--warmup-s", "-1"]),
        (preprocess, ["--images", "0"]),
        (preprocess, ["--num-cpus", "0"]),
        (sweep_efficiency, ["--trials", "0"]),
        (sweep_efficiency, ["--timeout", "0"]),
        (sweep_efficiency, ["--reduction-factor", "1"]),
        (train_overhead, ["--epochs", "1"]),
        (train_overhead, ["--cpus-per-worker", "0"]),
        (learnability, ["--steps", "0"]),
        (learnability, ["--patients", "1"]),
        (learnability, ["--eval-every", "x"]),
    ],
)
def test_arguments_below_their_minimum_exit_2(module, argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        module.main(argv)
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert "error: argument --" in error
    assert "must be" in error or "expected an integer" in error


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads /proc (Linux)")
def test_tree_sampler_keeps_the_peak_of_an_exited_process():
    code = "import time; block = bytearray(64 * 2**20); block[::4096] = b'x' * len(block[::4096]); time.sleep(1.0)"
    with preprocess.TreeSampler(interval=0.05) as sampler:
        child = subprocess.Popen([sys.executable, "-c", code])
        started = None
        deadline = time.monotonic() + 30
        while started is None and time.monotonic() < deadline:
            started = common.start_ticks(child.pid)
        child.wait(timeout=30)
    assert child.returncode == 0
    assert common.peak_rss_mib(child.pid) == 0  # gone: a reading at the end would miss it
    assert sampler.process_peaks_mib[(child.pid, started)] >= 64


class _Batches:
    """A stand-in for a Ray Data pass: numpy batches of 2 rows, and whether it was closed."""

    def __init__(self, fail_after: int | None = None):
        self.served, self.fail_after, self.closed = 0, fail_after, False

    def __iter__(self):
        return self

    def __next__(self):
        import numpy as np

        if self.fail_after is not None and self.served >= self.fail_after:
            raise RuntimeError("pipeline failed")
        self.served += 1
        return {"image": np.zeros((2, 4, 4), dtype=np.uint16), "label": np.zeros(2, dtype=np.float32)}

    def close(self):
        self.closed = True


@pytest.mark.parametrize("fail_after", [None, 3])
def test_ingest_closes_its_stream(fail_after):
    passes = []

    class Dataset:
        def iter_batches(self, **_kwargs):
            passes.append(_Batches(fail_after))
            return passes[-1]

    if fail_after is None:
        result = ingest.run_ours(Dataset(), n_rows=8, batch_size=2, epochs=1, warmup_s=0.0)
        assert result["images"] == 8
    else:
        with pytest.raises(RuntimeError, match="pipeline failed"):
            ingest.run_ours(Dataset(), n_rows=8, batch_size=2, epochs=1, warmup_s=0.0)
    assert passes and passes[-1].closed


def test_benchmark_ray_gets_the_products_local_system_config(monkeypatch):
    """The benchmarks' cluster keeps idle workers as long as the one ``tune`` starts, so trial start-up is alike."""
    import ray

    from mammo_ray import cli

    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: calls.append(kwargs))
    monkeypatch.setattr(common, "_pin_address", lambda: None)
    monkeypatch.setattr(common, "set_quiet_env", lambda: None)
    for key in (*common.QUIET_ENV, "RAY_DATA_LOGGING_CONFIG"):
        monkeypatch.setenv(key, "x")
    assert common.start_ray(2) == 2
    assert calls[0]["_system_config"] == cli.LOCAL_SYSTEM_CONFIG
    assert calls[0]["address"] == "local"
