"""CPU training step: images/s of one training step on the CPU, channels_last (ours) against NCHW (baseline).

Why this exists: the demo and the CI machine train on CPU, and the Train worker now lays the model and its
batches out channels_last on the CPU as well as on a GPU (``train.channels_last``, default true). This program
measures what that buys for a given build, in one run: the same model, the same random batch, the same step as
the Train worker (forward, BCE-with-logits, backward, gradient clipping, AdamW with ``model.param_groups``; the
step of ``gpu_throughput.py``), once in channels_last and once in torch's default NCHW layout. Inputs are one
random batch in memory: this measures the model on the CPU, not the data pipeline.

The build is ``--backbone`` with ``--stem``, ``--norm`` and ``--pool`` as the product's ``model.*`` keys, at
``--size H W``, with ``--threads`` torch threads (the demo's ``resources.torch_threads`` is 2).

    python benchmarks/cpu_step.py --quick --out cpu_step.json
    python benchmarks/cpu_step.py --quick --stem deep --norm batch --pool max --size 256 208
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from gpu_throughput import build, make_step  # noqa: E402  (the same model and step as the GPU benchmark)


def measure(args, channels_last: bool) -> dict:
    """images/s over ``args.steps`` timed steps after ``args.warmup`` untimed ones."""
    import torch

    torch.manual_seed(0)
    net, optimizer, params, loss_fn = build(
        args.backbone, torch.device("cpu"), channels_last, stem=args.stem, norm=args.norm, pool=args.pool
    )
    step = make_step(net, optimizer, params, loss_fn, amp=False, device_type="cpu")
    images = torch.randn(args.batch_size, 1, *args.size)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, 2, (args.batch_size,)).float()
    for _ in range(args.warmup):
        step(images, labels)
    start = time.perf_counter()
    for _ in range(args.steps):
        loss = step(images, labels)
    elapsed = time.perf_counter() - start
    if not torch.isfinite(loss):
        raise RuntimeError(f"non-finite loss (channels_last={channels_last})")
    return {
        "channels_last": channels_last,
        "images_per_s": args.batch_size * args.steps / elapsed,
        "step_ms": 1000 * elapsed / args.steps,
    }


def main(argv: list[str] | None = None) -> int:
    parser = common.base_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default="convnext_atto")
    parser.add_argument("--stem", default="patchify", help="model.stem: patchify or deep")
    parser.add_argument("--norm", default="layer", help="model.norm: layer or batch")
    parser.add_argument("--pool", default="avg", help="model.pool: avg, max or avgmax")
    positive = common.int_at_least(1)
    parser.add_argument("--size", type=positive, nargs=2, default=[128, 96], metavar=("H", "W"))
    parser.add_argument("--batch-size", type=positive, default=32)
    parser.add_argument(
        "--threads", type=positive, default=2, help="torch threads (the demo's resources.torch_threads)"
    )
    parser.add_argument("--steps", type=positive, help="timed steps per layout (quick 4, full 12)")
    parser.add_argument("--warmup", type=common.int_at_least(0), default=2, help="untimed steps first")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    args.size = tuple(args.size)
    args.steps = (4 if args.quick else 12) if args.steps is None else args.steps

    import torch

    torch.set_num_threads(args.threads)
    # Alternate the layouts so that a change in the machine's load during the run hits both alike.
    rounds = 1 if args.quick else 2
    runs = {True: [], False: []}
    for _ in range(rounds):
        for channels_last in (False, True):
            runs[channels_last].append(measure(args, channels_last))
            print(
                f"[{time.perf_counter() - started:6.1f} s] channels_last={channels_last}: "
                f"{runs[channels_last][-1]['images_per_s']:.1f} images/s",
                file=sys.stderr,
                flush=True,
            )
    ours = max(run["images_per_s"] for run in runs[True])
    baseline = max(run["images_per_s"] for run in runs[False])
    params = {
        "mode": "quick" if args.quick else "full",
        "backbone": args.backbone,
        "stem": args.stem,
        "norm": args.norm,
        "pool": args.pool,
        "size": list(args.size),
        "in_chans": 1,
        "batch_size": args.batch_size,
        "torch_threads": args.threads,
        "timed_steps": args.steps,
        "warmup_steps": args.warmup,
        "rounds": rounds,
        "figure": "best round of each layout",
        "step": "forward, BCE-with-logits, backward, clip_grad_norm 1.0, AdamW (model.param_groups), fp32",
        "inputs": "one random batch in memory (data loading not measured)",
    }
    common.finish(
        "cpu_step",
        ours=ours,
        baseline=baseline,
        unit="images/s",
        params=params,
        out=args.out,
        extra={"ours_runs": runs[True], "baseline_runs": runs[False]},
        started=started,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
