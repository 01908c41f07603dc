"""GPU throughput: training images/s and model FLOP utilisation (MFU) of the configured backbone.

Ours: ``model.create_model(--backbone, in_chans=1)`` trained at ``--size H W`` with bf16 autocast,
channels_last and ``torch.compile`` (each switchable: ``--amp/--no-amp``, ``--channels-last/--no-channels-last``,
``--compile/--no-compile``). Baseline, in the same run: the same model in fp32, no channels_last, no compile.
Each step is what the Train worker does: forward, BCE-with-logits loss, backward, gradient clipping, AdamW
step with ``model.param_groups``. Inputs are one random batch kept on the GPU: this measures the model and
the GPU, not the data pipeline (``ingest.py`` measures that).

FLOPs of one training step (forward + backward) are counted with ``torch.utils.flop_counter.FlopCounterMode``
on the eager model, with a grouped-convolution fix for its backward formula (see ``_conv_backward_flops``); MFU =
FLOPs per image × images/s / the GPU's peak dense bf16 FLOP/s from a small table (``PEAK_BF16_FLOPS``: H100 SXM,
H200 and GH200 989 TFLOP/s, H100 NVL and H200 NVL 835, H100 PCIe 756, L40S 362, A100 312, L40 181, A10 and A10G
125, L4 121). The fp32 baseline's MFU is given against the same bf16 peak. Target for convnext_tiny at 1024×512 on one H100: at least 1,000 images/s.

Without a CUDA GPU the program prints why and exits with code 3 (``--allow-cpu`` runs the same code on the
CPU with tiny settings, only to check the program).

    python benchmarks/gpu_throughput.py --quick --out gpu_throughput.json
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

EXIT_NO_GPU = 3
# Peak dense (no sparsity) bf16 tensor-core FLOP/s: NVIDIA's data sheets give them "with sparsity", twice the dense
# figure, for Hopper and Ada (H100 SXM 1,979, H100 NVL and H200 NVL 1,671, L40S 733, L40 362.1, L4 242), and dense
# and sparse side by side for Ampere (A100 312/624, A10 125/250). A key matches whole words of the device name
# (``torch.cuda.get_device_name``: "NVIDIA H100 80GB HBM3", "NVIDIA H100 NVL", "NVIDIA GH200 480GB", "NVIDIA L40S"),
# so "L4" is not found in "L40S" nor "H200" in "GH200"; the first match wins, so the variants come before their
# family. AWS publishes no tensor figure for its A10G: 125 is the A10's and may be high.
PEAK_BF16_FLOPS = (
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),  # SXM ("NVIDIA H100 80GB HBM3")
    ("H200 NVL", 835e12),
    ("H200", 989e12),  # SXM
    ("GH200", 989e12),  # the Grace Hopper superchip's GPU, an H100/H200 SXM
    ("A100", 312e12),
    ("L40S", 362e12),
    ("L40", 181e12),
    ("L4", 121e12),
    ("A10G", 125e12),
    ("A10", 125e12),
)
TARGET_IMAGES_PER_S = {("convnext_tiny", (1024, 512), "H100"): 1000.0}


def names_gpu(device_name: str, key: str) -> bool:
    """Whether ``key`` ("H100", "L40S") appears in ``device_name`` as whole words, case aside."""
    return re.search(rf"(?<![a-z0-9]){re.escape(key.lower())}(?![a-z0-9])", device_name.lower()) is not None


def peak_flops(device_name: str) -> tuple[str | None, float | None]:
    """The table's key and peak dense bf16 FLOP/s for ``device_name``, or (None, None) when it is not in the table."""
    for key, flops in PEAK_BF16_FLOPS:
        if names_gpu(device_name, key):
            return key, flops
    return None, None


def build(backbone: str, device, channels_last: bool, **model_kwargs):
    """The model (``model.create_model``, 1 channel, ``model_kwargs`` such as stem/norm/pool), its AdamW, its
    trainable parameters and the BCE loss, as the Train worker builds them."""
    import torch

    from mammo_ray import losses, train
    from mammo_ray import model as model_mod

    net = model_mod.create_model(backbone, in_chans=1, **model_kwargs).to(device)
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    groups = model_mod.param_groups(net, 0.05)
    optimizer = train.build_optimizer("adamw", groups, 1e-4)
    params = [p for group in groups for p in group["params"]]
    return net, optimizer, params, losses.build_loss("bce").to(device)


def make_step(net, optimizer, params, loss_fn, amp: bool, device_type: str):
    import torch

    def step(images, labels):
        with torch.autocast(device_type=device_type, dtype=torch.bfloat16, enabled=amp):
            output = net(images)
        loss = loss_fn(output.float(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        return loss

    return step


def _conv_backward_flops(
    grad_out_shape,
    x_shape,
    w_shape,
    _bias,
    _stride,
    _padding,
    _dilation,
    transposed,
    _output_padding,
    _groups,
    output_mask,
    out_shape=None,
    **kwargs,
) -> int:
    """FLOPs of ``aten.convolution_backward`` that respect groups.

    torch 2.15's own formula treats a grouped convolution's backward as a dense one: a depthwise 7×7 conv
    (ConvNeXt's token mixer) is counted ``channels`` times over, which inflates a training step's count by a
    factor that depends on the model's share of grouped convolutions (for convnext_tiny 2.9×, the same at
    128×64 and 1024×512). Each of grad_input and grad_weight costs what the forward convolution costs.
    """
    from torch.utils.flop_counter import conv_flop_count

    forward = conv_flop_count(list(x_shape), list(w_shape), list(grad_out_shape), transposed=transposed)
    return forward * (int(bool(output_mask[0])) + int(bool(output_mask[1])))


def count_flops(backbone: str, size: tuple[int, int], batch: int, device) -> float:
    """FLOPs of one eager fp32 training step (forward + backward), per image."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    net, optimizer, params, loss_fn = build(backbone, device, channels_last=False)
    images = torch.randn(batch, 1, *size, device=device)
    labels = torch.randint(0, 2, (batch,), device=device).float()
    with FlopCounterMode(
        display=False, custom_mapping={torch.ops.aten.convolution_backward: _conv_backward_flops}
    ) as counter:
        output = net(images)
        loss = loss_fn(output.float(), labels)
        loss.backward()
    total = counter.get_total_flops()
    del net, optimizer, params, images, labels, output, loss
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return total / batch


def measure(args, variant: dict, batch: int, device) -> dict:
    """images/s of one variant over ``args.steps`` timed steps after ``args.warmup`` untimed ones."""
    import torch

    torch.manual_seed(0)
    net, optimizer, params, loss_fn = build(args.backbone, device, variant["channels_last"])
    if variant["compile"]:
        net = torch.compile(net)
    step = make_step(net, optimizer, params, loss_fn, variant["amp"], device.type)
    images = torch.randn(batch, 1, *args.size, device=device)
    if variant["channels_last"]:
        images = images.contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, 2, (batch,), device=device).float()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    warm_start = time.perf_counter()
    for _ in range(args.warmup):
        step(images, labels)
    sync()
    warmup_s = time.perf_counter() - warm_start
    start = time.perf_counter()
    for _ in range(args.steps):
        loss = step(images, labels)
    sync()
    elapsed = time.perf_counter() - start
    if not torch.isfinite(loss):
        raise RuntimeError(f"non-finite loss in variant {variant}")
    out = {
        **variant,
        "batch_size": batch,
        "images_per_s": batch * args.steps / elapsed,
        "step_ms": 1000 * elapsed / args.steps,
        "warmup_s": warmup_s,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
    }
    del net, optimizer, params, images, labels, step
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def measure_fitting(args, variant: dict, device, log) -> dict:
    """``measure`` at ``--batch-size``, halving the batch on out-of-memory (fp32 needs about twice bf16's memory)."""
    import torch

    batch = args.batch_size
    while True:
        try:
            return measure(args, variant, batch, device)
        except torch.OutOfMemoryError:
            if batch == 1:
                raise
            torch.cuda.empty_cache()
            log(f"out of memory at batch {batch}; retrying with {batch // 2}")
            batch //= 2


def main(argv: list[str] | None = None) -> int:
    parser = common.base_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default="convnext_tiny")
    positive = common.int_at_least(1)
    parser.add_argument("--size", type=positive, nargs=2, default=[1024, 512], metavar=("H", "W"))
    parser.add_argument("--batch-size", type=positive, default=32)
    parser.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True, help="bf16 autocast (ours)")
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True, help="(ours)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True, help="torch.compile (ours)")
    parser.add_argument("--steps", type=positive, help="timed steps per variant (quick 15, full 60)")
    parser.add_argument(
        "--warmup",
        type=common.int_at_least(0),
        help="untimed steps first, compilation included (quick 5, full 15)",
    )
    parser.add_argument("--allow-cpu", action="store_true", help="run on the CPU to check the program (tiny sizes)")
    args = parser.parse_args(argv)
    started = time.perf_counter()

    def log(text: str) -> None:
        print(f"[{time.perf_counter() - started:6.1f} s] {text}", file=sys.stderr, flush=True)

    import torch

    if torch.cuda.is_available():
        device = torch.device("cuda")
        torch.backends.cudnn.benchmark = True
        # TF32 stays at PyTorch's defaults (convolutions may use it, matmuls not): the baseline is what a user's
        # fp32 run gets; the flags are recorded in params.
        device_name = torch.cuda.get_device_name(0)
    elif args.allow_cpu:
        device, device_name = torch.device("cpu"), "cpu"
        args.size, args.batch_size = [64, 32], min(args.batch_size, 2)
        log("no GPU: --allow-cpu runs tiny sizes on the CPU; the figures mean nothing")
    else:
        print(
            "gpu_throughput: no CUDA GPU visible to torch (torch.cuda.is_available() is False); this benchmark "
            "needs one. Run it on a GPU machine; the CPU benchmarks are ingest, preprocess, train_overhead and "
            "sweep_efficiency.",
            file=sys.stderr,
        )
        return EXIT_NO_GPU
    args.size = tuple(args.size)
    args.steps = (15 if args.quick else 60) if args.steps is None else args.steps
    args.warmup = (5 if args.quick else 15) if args.warmup is None else args.warmup
    peak_name, peak = peak_flops(device_name)
    log(
        f"device {device_name}; peak bf16 {peak / 1e12:.0f} TFLOP/s ({peak_name})"
        if peak
        else f"device {device_name}; no peak FLOP/s in the table, MFU not computed"
    )

    flops_per_image = count_flops(args.backbone, args.size, min(args.batch_size, 2), device)
    log(f"{flops_per_image / 1e9:.1f} GFLOP per image per training step (forward + backward)")
    ours_variant = {"amp": args.amp, "channels_last": args.channels_last, "compile": args.compile}
    base_variant = {"amp": False, "channels_last": False, "compile": False}
    log(f"baseline {base_variant} ...")
    baseline = measure_fitting(args, base_variant, device, log)
    log(f"baseline: {baseline['images_per_s']:.1f} images/s")
    log(f"ours {ours_variant} ...")
    ours = measure_fitting(args, ours_variant, device, log)
    log(f"ours: {ours['images_per_s']:.1f} images/s")
    for result in (ours, baseline):
        result["tflops_per_s"] = flops_per_image * result["images_per_s"] / 1e12
        result["mfu"] = flops_per_image * result["images_per_s"] / peak if peak else None

    target = next(
        (
            value
            for (backbone, size, gpu), value in TARGET_IMAGES_PER_S.items()
            if backbone == args.backbone and size == args.size and names_gpu(device_name, gpu)
        ),
        None,
    )
    params = {
        "mode": "quick" if args.quick else "full",
        "backbone": args.backbone,
        "size": list(args.size),
        "in_chans": 1,
        "batch_size": args.batch_size,
        "timed_steps": args.steps,
        "warmup_steps": args.warmup,
        "ours": ours_variant,
        "baseline": base_variant,
        "tf32": {
            "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
            "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        },
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "step": "forward, BCE-with-logits, backward, clip_grad_norm 1.0, AdamW (model.param_groups)",
        "inputs": "one random batch resident on the device (data loading not measured)",
        "flops": "FlopCounterMode on one eager fp32 step, forward + backward, per image; conv backward counted with groups",
        "peak_bf16_flops": peak,
        "peak_source": peak_name,
        "device": device_name,
    }
    extra = {
        "flops_per_image": flops_per_image,
        "ours_mfu": ours["mfu"],
        "baseline_mfu": baseline["mfu"],
        "target_images_per_s": target,
        "meets_images_per_s_target": None if target is None else bool(ours["images_per_s"] >= target),
        "ours_detail": ours,
        "baseline_detail": baseline,
    }
    common.finish(
        "gpu_throughput",
        ours=ours["images_per_s"],
        baseline=baseline["images_per_s"],
        unit="images/s",
        params=params,
        out=args.out,
        extra=extra,
        started=started,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
