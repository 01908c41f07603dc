"""Preprocess: full-field mammograms (3328×4096, 16-bit DICOM) through ``prepare``, images/s per core.

Ours: ``prepare.prepare_table`` on Ray (``num_cpus`` = the machine's cores, prepare's automatic shard size):
decode (pydicom; JPEG 2000 through OpenJPEG at the coarsest resolution level that still leaves the resize at
least 1.5 source pixels per output pixel), modality LUT, VOI window, MONOCHROME1 inversion, breast crop, flip,
aspect-preserving resize and pad, uint16, zstd into the cache, Parquet manifests.

Baseline: a naive per-file loop in one process pinned to one core: ``pydicom.dcmread`` + ``pixel_array``
(pydicom's default plugin order), float32 conversion with min-max scaling, PIL bilinear resize to H×W, 16-bit
PNG write. It does less than ours (no LUTs, no crop, no flip, no aspect ratio). The pin matters because
pydicom's default JPEG 2000 plugin (GDCM) decodes with several threads, which the per-core figure would
otherwise count as one core.

Both read the same files: uncompressed (Explicit VR Little Endian) and JPEG 2000 lossless DICOMs written
here with pydicom (pylibjpeg-openjpeg encoder) from synthetic mammograms (``synth`` at 1024×832, cubic
upsampled ×4, the headers of a multi-vendor archive kept: 12–16 bits stored, windows, MONOCHROME1). They
are generated once into the bench folder. Each side runs in its own subprocess, so the peak memory of
each is its own. Both sides are warmed up before timing: for ours, Ray workers process one image per core and
format (imports, first decode); the baseline processes one image per format (its first JPEG 2000 file pays
pydicom's plugin import). Ray's start-up is not timed.

Figures: images/s per core = images / wall seconds / cores used (Ray's CPUs for ours, 1 for the
baseline). Also reported: images per CPU-second (CPU time of every process involved, from /proc; less
sensitive to a busy machine), per-format figures, and peak RSS (VmHWM). The headline memory figures are
``ours_peak_rss_total_mib``, the driver's peak plus every Ray worker's own peak (a sum of peaks reached at
different times, so an upper bound on what ours held at once; Ray's daemons excluded), and
``baseline_peak_rss_mib``, the baseline's one process. ``peak_rss_mib`` details ours: the largest Ray worker, the
driver and the sum over the whole process tree (which includes Ray's own daemons). A background sampler reads
every process's VmHWM every 0.25 s during the timed run and keeps it after the process exits.

    python benchmarks/preprocess.py --quick --out preprocess.json
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

FULL_FIELD = (4096, 3328)  # rows, columns
FORMATS = ("uncompressed", "jpeg2000")
SOURCE_SIZE = (1024, 832)
GENERATOR_VERSION = 2


# --------------------------------------------------------------------------------------------------
# The data: full-field DICOMs, uncompressed and JPEG 2000, generated once.


def full_field_set(n_base: int, seed: int = 7) -> dict[str, list[dict]]:
    """``n_base`` distinct full-field images per format under the bench folder; rows with path and tags."""
    import cv2
    import numpy as np
    import pandas as pd
    import pydicom
    from pydicom.uid import JPEG2000Lossless

    from mammo_ray import synth

    root = common.bench_dir() / f"fullfield-n{n_base}-seed{seed}-v{GENERATOR_VERSION}-synth{synth.GENERATOR_VERSION}"
    marker = root / "set.json"
    if marker.is_file():
        return json.loads(marker.read_text())["rows"]
    source = synth.generate(
        common.bench_dir() / f"fullfield-source-v{synth.GENERATOR_VERSION}-n{n_base}-seed{seed}",
        patients=n_base,
        prevalence=0.15,
        size=SOURCE_SIZE,
        seed=seed,
        progress=False,
    )
    # One image per exam, cycling through the four views, so that vendors, bit depths, MONOCHROME1/2 and
    # laterality vary across the set as in an archive.
    everything = pd.read_csv(source["manifest_csv"])
    picks = [exam.iloc[k % len(exam)] for k, (_, exam) in enumerate(everything.groupby("exam_id", sort=True))]
    table = pd.DataFrame(picks).head(n_base)
    if len(table) < n_base:
        raise RuntimeError(f"synthetic source has {len(table)} exams, fewer than {n_base}")
    source_root = Path(source["manifest_csv"]).parent
    rows: dict[str, list[dict]] = {fmt: [] for fmt in FORMATS}
    for fmt in FORMATS:
        (root / fmt).mkdir(parents=True, exist_ok=True)
    scale = FULL_FIELD[0] / SOURCE_SIZE[0]
    for record in table.itertuples(index=False):
        ds = pydicom.dcmread(source_root / record.path)
        top = (1 << int(ds.BitsStored)) - 1
        pixels = cv2.resize(ds.pixel_array.astype(np.float32), FULL_FIELD[::-1], interpolation=cv2.INTER_CUBIC)
        pixels = np.clip(pixels + 0.5, 0, top).astype(np.uint16)
        ds.Rows, ds.Columns = pixels.shape
        spacing = [f"{float(v) / scale:.6g}" for v in ds.PixelSpacing]
        ds.PixelSpacing = ds.ImagerPixelSpacing = spacing
        ds.PixelData = pixels.tobytes()
        raw_path = root / "uncompressed" / f"{record.image_id}.dcm"
        ds.save_as(raw_path, enforce_file_format=True)
        ds.compress(JPEG2000Lossless, encoding_plugin="pylibjpeg")
        j2k_path = root / "jpeg2000" / f"{record.image_id}.dcm"
        ds.save_as(j2k_path, enforce_file_format=True)
        for fmt, path in (("uncompressed", raw_path), ("jpeg2000", j2k_path)):
            rows[fmt].append(
                {
                    "image_id": str(record.image_id),
                    "path": str(path),
                    "laterality": str(record.laterality),
                    "view": str(record.view),
                    "patient_id": str(record.patient_id),
                    "exam_id": str(record.exam_id),
                    "label": int(record.label),
                    "bytes": path.stat().st_size,
                    "bits_stored": int(ds.BitsStored),
                    "photometric": str(ds.PhotometricInterpretation),
                }
            )
    marker.write_text(json.dumps({"rows": rows, "created": common.now_iso()}, indent=2))
    return rows


def work_table(base_rows: list[dict], n: int, fmt: str) -> list[dict]:
    """``n`` rows cycling over the base files, each with its own image id (files are read, never written)."""
    out = []
    for i in range(n):
        row = dict(base_rows[i % len(base_rows)])
        row["image_id"] = f"{fmt}-{i:05d}-{row['image_id']}"
        out.append(row)
    return out


# --------------------------------------------------------------------------------------------------
# The two sides, each run as a child process.


def _manifest_table(rows: list[dict]):
    import pandas as pd

    frame = pd.DataFrame(rows)
    frame["dataset"] = "SYNTH-FULLFIELD"
    frame["split"] = "train"  # one split: prepare's patient split is not what is measured
    columns = ["image_id", "path", "label", "patient_id", "exam_id", "laterality", "view", "dataset", "split"]
    return frame[columns]


class TreeSampler:
    """Samples this process tree every ``interval`` seconds in a background thread: the peak of its summed RSS,
    and each process's own peak (VmHWM), kept after the process exits.

    A Ray worker that exits before the run ends (Ray ends idle workers) would otherwise drop out of the peaks
    read at the end. Its last sample is up to ``interval`` old, so growth just before it exits can be missed.
    """

    def __init__(self, interval: float = 0.25):
        self.interval = interval
        self.peak_mib = 0.0
        # (pid, start time) -> peak MiB; the start time tells a reused pid from the process it replaced.
        self.process_peaks_mib: dict[tuple[int, int], float] = {}
        self.ray_workers: set[tuple[int, int]] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> None:
        """One sample of every process in the tree (the thread calls it; call it once more at the end)."""
        pids = common.process_tree()
        self.peak_mib = max(self.peak_mib, sum(common.rss_mib(pid) for pid in pids))
        workers = set(common.ray_worker_pids(pids))
        for pid in pids:
            started = common.start_ticks(pid)
            if started is None:  # exited since the tree was read
                continue
            key = (pid, started)
            self.process_peaks_mib[key] = max(self.process_peaks_mib.get(key, 0.0), common.peak_rss_mib(pid))
            if pid in workers:
                self.ray_workers.add(key)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def __enter__(self) -> TreeSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


def child_ours(tables: dict[str, list[dict]], size: tuple[int, int], work: Path, num_cpus: int) -> dict:
    import pandas as pd
    import ray

    from mammo_ray import prepare

    num_cpus = common.start_ray(num_cpus)
    # Warm-up: one image per core and format, one shard each, so every Ray worker has imported and decoded once.
    warm = [
        dict(tables[fmt][i % len(tables[fmt])], image_id=f"warm-{fmt}-{i}") for fmt in FORMATS for i in range(num_cpus)
    ]
    prepare.run(_manifest_table(warm), work / "warmup", size=size, shard_size=1, progress=False)
    tree_before = {pid: common.cpu_seconds(pid) for pid in common.process_tree()}
    per_format = {}
    with TreeSampler() as sampler:
        for fmt, rows in tables.items():
            cpu_before = {pid: common.cpu_seconds(pid) for pid in common.process_tree()}
            start = time.perf_counter()
            # prepare's own shard size (what a user gets): small enough on a medium set that every core has work.
            result = prepare.prepare_table(_manifest_table(rows), work / fmt, size=size, progress=False)
            elapsed = time.perf_counter() - start
            cpu_after = {pid: common.cpu_seconds(pid) for pid in common.process_tree()}
            cpu = sum(cpu_after[pid] - cpu_before.get(pid, 0.0) for pid in cpu_after)
            frame = pd.read_parquet(result.paths["train"])
            per_format[fmt] = {
                "images": len(rows),
                "cached": len(frame),
                "seconds": elapsed,
                "cpu_seconds": cpu,
                "shard_size": result.shard_size,
                "shards": result.shards_total,
                "decode_reduction": frame["prep_decode_reduction"].value_counts().sort_index().to_dict(),
            }
    tree_after = {pid: common.cpu_seconds(pid) for pid in common.process_tree()}
    driver = common.peak_rss_mib(os.getpid())
    worker_peaks = [peak for key, peak in sampler.process_peaks_mib.items() if key in sampler.ray_workers]
    result = {
        "per_format": per_format,
        "num_cpus": num_cpus,
        # Every process seen during the timed run, those that exited before its end included.
        "peak_rss_mib": {
            "largest_ray_worker": max(worker_peaks, default=None),
            "driver": driver,
            "ray_workers_sum_of_peaks": sum(worker_peaks),
            "driver_and_ray_workers": driver + sum(worker_peaks),
            "process_tree_sum_of_peaks": sum(sampler.process_peaks_mib.values()),
            "process_tree_sampled_peak": sampler.peak_mib,
            "ray_workers": len(worker_peaks),
        },
        "cpu_seconds_tree_total": sum(tree_after[pid] - tree_before.get(pid, 0.0) for pid in tree_after),
    }
    ray.shutdown()
    return result


def _pin_to_one_core() -> list[int] | None:
    """Restrict this process (and the threads its libraries start) to one core; the cores it got, or None.

    The baseline's figure is per core with 1 core counted, but pydicom's default JPEG 2000 plugin (GDCM) decodes
    with several threads: unpinned it used 1.5 cores of this 2-core machine (13.1 CPU-s in 8.5 s), so its "per
    core" figure was really per 1.5 cores.
    """
    try:
        first = min(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {first})
        return sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux: the CPU-second figures stay comparable
        return None


def naive_one(path: str, size: tuple[int, int], out_path: Path) -> None:
    """The baseline's work for one file: dcmread + pixel_array, float32 min-max, PIL bilinear, 16-bit PNG."""
    import numpy as np
    import pydicom
    from PIL import Image

    height, width = size
    pixels = pydicom.dcmread(path).pixel_array.astype(np.float32)
    low, high = float(pixels.min()), float(pixels.max())
    pixels = (pixels - low) / max(high - low, 1e-6)
    resized = Image.fromarray(pixels).resize((width, height), Image.BILINEAR)
    out = (np.clip(np.asarray(resized), 0.0, 1.0) * 65535.0 + 0.5).astype(np.uint16)
    Image.fromarray(out).save(out_path)


def child_baseline(tables: dict[str, list[dict]], size: tuple[int, int], work: Path) -> dict:
    pinned = _pin_to_one_core()
    # Warm-up, as ours gets one: one untimed image per format, so that the first JPEG 2000 file's plugin import
    # (pydicom loads its decoders on first use) is not timed.
    warm_dir = work / "warmup"
    warm_dir.mkdir(parents=True, exist_ok=True)
    for fmt, rows in tables.items():
        naive_one(rows[0]["path"], size, warm_dir / f"{fmt}.png")
    per_format = {}
    for fmt, rows in tables.items():
        out_dir = work / fmt
        out_dir.mkdir(parents=True, exist_ok=True)
        with common.Timer() as timer:
            for row in rows:
                naive_one(row["path"], size, out_dir / f"{row['image_id']}.png")
        per_format[fmt] = {"images": len(rows), "seconds": timer.elapsed, "cpu_seconds": timer.cpu, "cached": len(rows)}
    return {
        "per_format": per_format,
        "num_cpus": 1,
        "affinity": pinned,
        "peak_rss_mib": {"process": common.self_peak_rss_mib()},
    }


def run_child(side: str, tables: dict[str, list[dict]], size: tuple[int, int], num_cpus: int, log) -> dict:
    """Run one side in a fresh interpreter; its JSON result comes back through a file."""
    with tempfile.TemporaryDirectory(prefix=f"mammo-bench-{side}-") as tmp:
        tmp_path = Path(tmp)
        spec = {"side": side, "tables": tables, "size": list(size), "num_cpus": num_cpus, "work": str(tmp_path / "w")}
        (tmp_path / "spec.json").write_text(json.dumps(spec))
        start = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, __file__, "--child", str(tmp_path / "spec.json")],
            capture_output=True,
            text=True,
            check=False,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"{side} child failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
        result = json.loads((tmp_path / "result.json").read_text())
        result["child_wall_s"] = time.perf_counter() - start
        log(f"{side}: child finished in {result['child_wall_s']:.1f} s")
        return result


def child_main(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    common.set_quiet_env()
    size = tuple(spec["size"])
    work = Path(spec["work"])
    work.mkdir(parents=True, exist_ok=True)
    if spec["side"] == "ours":
        result = child_ours(spec["tables"], size, work, spec["num_cpus"])
    else:
        result = child_baseline(spec["tables"], size, work)
    Path(spec_path).with_name("result.json").write_text(json.dumps(result))
    shutil.rmtree(work, ignore_errors=True)
    return 0


def _summary(result: dict) -> dict:
    images = sum(f["images"] for f in result["per_format"].values())
    seconds = sum(f["seconds"] for f in result["per_format"].values())
    cpu = sum(f["cpu_seconds"] for f in result["per_format"].values())
    cores_used = result["num_cpus"]
    return {
        "images": images,
        "seconds": seconds,
        "images_per_s": images / seconds,
        "images_per_s_per_core": images / seconds / cores_used,
        "images_per_cpu_second": images / cpu if cpu > 0 else None,
        "per_format": {
            fmt: {
                **f,
                "images_per_s_per_core": f["images"] / f["seconds"] / cores_used,
                "images_per_cpu_second": f["images"] / f["cpu_seconds"] if f["cpu_seconds"] > 0 else None,
            }
            for fmt, f in result["per_format"].items()
        },
    }


def main(argv: list[str] | None = None) -> int:
    if argv is None and len(sys.argv) == 3 and sys.argv[1] == "--child":
        return child_main(sys.argv[2])
    parser = common.base_parser(__doc__.split("\n\n")[0])
    positive = common.int_at_least(1)
    parser.add_argument("--images", type=positive, help="images per format (quick 6, full 48)")
    parser.add_argument("--distinct", type=positive, help="distinct files per format, cycled (quick 3, full 16)")
    parser.add_argument("--size", type=positive, nargs=2, default=[1024, 512], metavar=("H", "W"), help="output size")
    parser.add_argument("--num-cpus", type=positive, help="Ray CPUs for ours (default: the cores)")
    args = parser.parse_args(argv)
    started = time.perf_counter()

    def log(text: str) -> None:
        print(f"[{time.perf_counter() - started:6.1f} s] {text}", file=sys.stderr, flush=True)

    common.set_quiet_env()
    n_images = (6 if args.quick else 48) if args.images is None else args.images
    n_base = (3 if args.quick else 16) if args.distinct is None else args.distinct
    num_cpus = common.cores() if args.num_cpus is None else args.num_cpus
    log(f"full-field set: {n_base} distinct images per format (generated once)")
    base = full_field_set(n_base)
    tables = {fmt: work_table(base[fmt], n_images, fmt) for fmt in FORMATS}
    log("baseline (naive loop) ...")
    baseline_raw = run_child("baseline", tables, tuple(args.size), 1, log)
    log("ours (prepare.prepare_table on Ray) ...")
    ours_raw = run_child("ours", tables, tuple(args.size), num_cpus, log)
    ours, baseline = _summary(ours_raw), _summary(baseline_raw)
    for fmt in FORMATS:
        if ours_raw["per_format"][fmt]["cached"] != n_images:
            raise RuntimeError(f"prepare cached {ours_raw['per_format'][fmt]['cached']} of {n_images} {fmt} images")
    mean_bytes = {fmt: round(sum(r["bytes"] for r in base[fmt]) / len(base[fmt]) / 2**20, 2) for fmt in FORMATS}
    params = {
        "mode": "quick" if args.quick else "full",
        "images_per_format": n_images,
        "distinct_files_per_format": n_base,
        "input_size": list(FULL_FIELD),
        "output_size": list(args.size),
        "mean_file_mib": mean_bytes,
        "bits_stored": sorted({r["bits_stored"] for r in base["uncompressed"]}),
        "photometric": sorted({r["photometric"] for r in base["uncompressed"]}),
        "ours_ray_num_cpus": ours_raw["num_cpus"],
        "ours_shard_size": {fmt: f["shard_size"] for fmt, f in ours_raw["per_format"].items()},
        "ours_decode_reduction": {fmt: f["decode_reduction"] for fmt, f in ours_raw["per_format"].items()},
        "ours_warmup": "one image per core and format through prepare before timing; Ray start-up not timed",
        "baseline_warmup": "one image per format through the same loop before timing",
        "peak_rss": (
            "ours_peak_rss_total_mib: driver + every Ray worker's own VmHWM (sum of peaks, Ray daemons excluded); "
            "baseline_peak_rss_mib: the one baseline process"
        ),
        "baseline": "one process: dcmread + pixel_array (default plugin order) -> float32 min-max -> PIL bilinear -> 16-bit PNG",
        "baseline_affinity": baseline_raw.get("affinity"),
        "per_core": "images / wall s / cores used (ours: Ray CPUs, baseline: 1)",
        "source": f"synth at {SOURCE_SIZE[0]}x{SOURCE_SIZE[1]}, cubic x4; JPEG 2000 lossless via pylibjpeg-openjpeg",
    }
    extra = {
        "ours_detail": ours,
        "baseline_detail": baseline,
        "ratio_cpu_time": (
            ours["images_per_cpu_second"] / baseline["images_per_cpu_second"]
            if ours["images_per_cpu_second"] and baseline["images_per_cpu_second"]
            else None
        ),
        "ours_peak_rss_total_mib": ours_raw["peak_rss_mib"]["driver_and_ray_workers"],
        "baseline_peak_rss_mib": baseline_raw["peak_rss_mib"]["process"],
        "peak_rss_mib": {"ours": ours_raw["peak_rss_mib"], "baseline": baseline_raw["peak_rss_mib"]},
    }
    common.finish(
        "preprocess",
        ours=ours["images_per_s_per_core"],
        baseline=baseline["images_per_s_per_core"],
        unit="images/s per core",
        params=params,
        out=args.out,
        target_ratio=2.0,
        extra=extra,
        started=started,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
