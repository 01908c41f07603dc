"""ConvNeXt classifiers for mammograms: one factory over timm, local pretrained weights, freeze depth.

Every model is a timm ConvNeXt V1 (Liu et al. 2022, "A ConvNet for the 2020s", CVPR) or ConvNeXt V2 (Woo et al.
2023, "ConvNeXt V2: Co-designing and Scaling ConvNets with Masked Autoencoders", CVPR), built by
:func:`timm.create_model` and never re-implemented here. The model maps a grayscale image to one logit, or to two
outputs (μ, log σ²) for learned loss attenuation (Kendall & Gal 2017, see :mod:`mammo_ray.losses`).

The head is timm's own ConvNeXt head, ``pool → norm → dropout → linear`` (``NormMlpClassifierHead``; the ``_hnf``
variant normalises before pooling instead). ``dropout`` is timm's ``drop_rate``, the dropout right before the
linear layer; ``drop_path_rate`` is stochastic depth across the blocks.

**Freeze units** count the network in forward order, so that the reference's ``--upto_freeze`` numbers keep their
meaning:

1. ``stem`` (patchify conv + norm, or the deep stem),
2. for each stage, its ``stages.<i>.downsample`` when it has one (stage 0's is an ``nn.Identity`` in timm and is
   not a unit), then each ``stages.<i>.blocks.<j>``,
3. the **final norm**: the LayerNorm over the pooled features, which is FB's ``model.norm`` in the original
   ConvNeXt code and ``head.norm`` in timm (timm's checkpoint filter renames ``norm.`` to ``head.norm.``). timm's
   ``norm_pre`` is an ``nn.Identity`` for every ConvNeXt except ``convnext_tiny_hnf`` (``head_norm_first=True``),
   where the final norm is ``norm_pre`` (applied before pooling) and the head has no norm of its own,
4. ``head``: the rest of the head (pooling, optional pre-logits MLP, dropout, linear layer).

So ``convnext_small`` has 1 + 3 + 36 + 1 + 1 = 42 units. Freezing ``k`` units sets ``requires_grad=False`` on their
parameters and keeps them in eval mode through ``model.train()`` (no drop path, no dropout in frozen units), so that
a frozen unit computes exactly what it computed when it was pretrained.

**Stem and norm.** ``stem="patchify"`` and ``norm="layer"`` are timm's ConvNeXt as published, the network that
ImageNet checkpoints fit. For training from random initialisation on few images (the demo), ``norm="batch"`` has
timm build the same network with BatchNorm in place of every LayerNorm (``norm_layer="batchnorm2d"``, with 1×1
convolutions for the block MLPs, ``conv_mlp=True``), and ``stem="deep"`` replaces the 4×4 stride-4 patchify stem
by a ResNet-style deep stem with the same output width and stride (3×3 conv stride 2, BatchNorm, ReLU, 3×3 conv,
BatchNorm, ReLU, 3×3 max-pool stride 2; He et al. 2019, "Bag of Tricks", ResNet-C/D). Measured with
``benchmarks/learnability.py``: from random init, timm's convnext_atto reached validation AUC 0.56 on the synthetic
cancers (no benign look-alikes) in 250 steps where the BatchNorm, deep-stem variant reached 0.97, and neither change alone passed 0.58. No
ImageNet checkpoint fits these variants, so ``timm:<tag>`` weights are refused with them; a local file of the same
variant (e.g. an exported bundle's ``model.safetensors``) loads as usual.

Pretrained weights are loaded from a local ``.safetensors`` file or a torch state dict (``weights_only=True``, so a
checkpoint can never run code), with a key-by-key :class:`LoadReport`. ``timm:<tag>`` asks timm for hub weights.
"""

from __future__ import annotations

import functools
import logging
import pickle
from dataclasses import dataclass, field
from pathlib import Path

import timm
import torch
from timm.models import adapt_input_conv
from timm.models.convnext import ConvNeXt, checkpoint_filter_fn
from torch import nn

logger = logging.getLogger(__name__)

__all__ = [
    "LoadReport",
    "UnsafeCheckpointError",
    "apply_freeze",
    "available_backbones",
    "check_pretrained",
    "count_units",
    "create_model",
    "deep_stem",
    "freeze_units",
    "load_pretrained",
    "read_state_dict",
    "param_groups",
    "trainable_parameters",
]

# NormMlpClassifierHead normalises the pooled vector, so pooling must keep the feature width
# (timm asserts feat_mult() == 1); "catavgmax" would double it and "" would return a feature map.
POOL_TYPES = ("avg", "max", "avgmax")
STEMS = ("patchify", "deep")
NORMS = ("layer", "batch")
TIMM_PREFIX = "timm:"

# Wrappers that training scripts put around a state dict, tried in this order. timm's train.py writes
# "state_dict" (and "state_dict_ema"), FB's ConvNeXt and many others "model", plain loops "model_state_dict".
_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "module", "net")
# DistributedDataParallel and torch.compile prefix every key of the module they wrap.
_KEY_PREFIXES = ("module.", "_orig_mod.")


class UnsafeCheckpointError(ValueError):
    """A checkpoint holds pickled objects other than tensors and plain containers, so it is not loaded."""


@dataclass
class LoadReport:
    """What happened, key by key, when pretrained weights were loaded into a model.

    Attributes:
        source: The file path or ``timm:<tag>`` the weights came from.
        loaded: Model keys that received a tensor from the file.
        missing_keys: Model keys the file has no tensor for (they keep their random initialisation).
        unexpected_keys: File keys the model has no parameter or buffer for.
        shape_mismatches: ``(key, file shape, model shape)`` for keys present in both with different shapes; those
            tensors are not loaded.
        skipped_head: The classifier keys (``head.fc.*``) that were not loaded. Skipping them is the normal case
            when the file was trained for another number of classes, e.g. ImageNet's 1000.
        input_adaptation: How the first convolution was adapted to the model's input channels, if it was.
    """

    source: str
    loaded: list[str] = field(default_factory=list)
    missing_keys: list[str] = field(default_factory=list)
    unexpected_keys: list[str] = field(default_factory=list)
    shape_mismatches: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)
    skipped_head: list[str] = field(default_factory=list)
    input_adaptation: str | None = None

    @property
    def problems(self) -> list[str]:
        """Mismatches other than the skipped classifier head, one readable line each."""
        head = set(self.skipped_head)
        lines = [f"missing in file: {key}" for key in self.missing_keys if key not in head]
        lines += [f"not in model: {key}" for key in self.unexpected_keys]
        lines += [
            f"shape mismatch: {key} file {list(file_shape)} vs model {list(model_shape)}"
            for key, file_shape, model_shape in self.shape_mismatches
            if key not in head
        ]
        return lines


# --------------------------------------------------------------------------------------------------------------
# Backbones and the factory


@functools.cache
def available_backbones() -> tuple[str, ...]:
    """Names of the ConvNeXt V1 and V2 models that timm registers.

    Returns:
        Sorted model names such as ``convnext_atto``, ``convnext_small``, ``convnextv2_tiny``.
    """
    # module="convnext" keeps only models defined in timm's convnext.py; the "convnext*" filter drops its
    # test_convnext* debugging variants.
    return tuple(timm.list_models("convnext*", module="convnext"))


def _check_backbone(backbone: str) -> None:
    if backbone not in available_backbones():
        raise ValueError(
            f"Unknown backbone {backbone!r}. mammo_ray builds ConvNeXt V1/V2 models from timm; valid names: "
            f"{', '.join(available_backbones())}"
        )


def create_model(
    backbone: str = "convnext_atto",
    *,
    in_chans: int = 1,
    pretrained: str | None = None,
    drop_path_rate: float = 0.0,
    dropout: float = 0.0,
    pool: str = "avg",
    attenuation: bool = False,
    stem: str = "patchify",
    norm: str = "layer",
) -> nn.Module:
    """Build a ConvNeXt binary classifier through timm.

    Args:
        backbone: A ConvNeXt V1/V2 name from :func:`available_backbones`.
        in_chans: Input channels; 1 because mammograms are grayscale.
        pretrained: None for random initialisation, a local ``.safetensors`` or torch state-dict file, or
            ``timm:<tag>`` for timm's hub weights of that tag (e.g. ``timm:fb_in22k_ft_in1k``), tried only when
            asked and only where the hub is reachable.
        drop_path_rate: Stochastic-depth rate of the last block (timm scales it linearly over depth).
        dropout: Dropout before the final linear layer.
        pool: Global pooling of the head: ``avg``, ``max`` or ``avgmax``.
        attenuation: If True the head has two outputs (μ, log σ²) for learned loss attenuation, else one logit.
        stem: ``patchify`` (timm's 4×4 stride-4 convolution) or ``deep`` (:func:`deep_stem`).
        norm: ``layer`` (timm's LayerNorm) or ``batch`` (BatchNorm everywhere, 1×1-conv MLPs).

    Returns:
        The timm ConvNeXt. ``model(x)`` maps ``(B, in_chans, H, W)`` to ``(B, 1)`` logits or ``(B, 2)``
        ``[μ, log σ²]``. ``model.load_report`` holds the :class:`LoadReport` of the pretrained weights (None
        without them).

    Raises:
        ValueError: On an unknown backbone, pool type, stem or norm, an out-of-range rate, or ``timm:<tag>`` weights
            with a stem or norm that no ImageNet checkpoint fits.
        FileNotFoundError: If ``pretrained`` names a file that does not exist.
        UnsafeCheckpointError: If a torch file holds arbitrary pickled objects.
    """
    _check_backbone(backbone)
    if pool not in POOL_TYPES:
        raise ValueError(f"pool must be one of {', '.join(POOL_TYPES)}, got {pool!r}")
    for name, rate in (("drop_path_rate", drop_path_rate), ("dropout", dropout)):
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {rate}")
    if in_chans < 1:
        raise ValueError(f"in_chans must be at least 1, got {in_chans}")
    if stem not in STEMS:
        raise ValueError(f"stem must be one of {', '.join(STEMS)}, got {stem!r}")
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {', '.join(NORMS)}, got {norm!r}")
    published = stem == "patchify" and norm == "layer"

    # timm's ConvNeXt head already is pool → norm → dropout → linear; num_classes sets the linear layer's width
    # and drop_rate its dropout, so there is no head of our own to keep in sync with timm.
    kwargs = dict(
        in_chans=in_chans,
        num_classes=2 if attenuation else 1,
        global_pool=pool,
        drop_rate=dropout,
        drop_path_rate=drop_path_rate,
    )
    if norm == "batch":
        kwargs.update(norm_layer="batchnorm2d", conv_mlp=True)
    report: LoadReport | None = None
    if pretrained and pretrained.startswith(TIMM_PREFIX):
        tag = pretrained[len(TIMM_PREFIX) :]
        if not tag:
            raise ValueError(f"{pretrained!r} names no tag; write timm:<tag>, e.g. timm:fb_in22k_ft_in1k")
        if not published:
            raise ValueError(
                f"{pretrained!r}: timm's ImageNet weights fit only stem='patchify' and norm='layer' "
                f"(got stem={stem!r}, norm={norm!r}); train this variant from scratch or load a local file of it"
            )
        # timm downloads the tagged weights, sums the stem over RGB for in_chans=1 and drops the 1000-class
        # classifier itself; it logs its own mismatches, so the report only records the source.
        model = timm.create_model(f"{backbone}.{tag}", pretrained=True, **kwargs)
        report = LoadReport(source=pretrained)
    else:
        model = timm.create_model(backbone, pretrained=False, **kwargs)
        if stem == "deep":
            model.stem = deep_stem(in_chans, model.stem[0].out_channels)
        if pretrained:
            report = load_pretrained(model, pretrained)
    model.load_report = report
    return model


def deep_stem(in_chans: int, out_channels: int) -> nn.Sequential:
    """A ResNet-style deep stem with the output width and stride (4) of ConvNeXt's patchify stem.

    Args:
        in_chans: Input channels.
        out_channels: Width of the first stage (``model.stem[0].out_channels`` of the patchify stem).

    Returns:
        3×3 conv stride 2 → BatchNorm → ReLU → 3×3 conv → BatchNorm → ReLU → 3×3 max-pool stride 2. Its first
        module is the input convolution, as ``stem.0`` is in the patchify stem, so input-channel adaptation of
        pretrained files finds it under the same key.
    """
    width = max(24, out_channels // 2)
    return nn.Sequential(
        nn.Conv2d(in_chans, width, 3, 2, 1, bias=False),
        nn.BatchNorm2d(width),
        nn.ReLU(inplace=True),
        nn.Conv2d(width, out_channels, 3, 1, 1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(3, 2, 1),
    )


# --------------------------------------------------------------------------------------------------------------
# Local pretrained weights


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a local ``.safetensors`` or torch weights file, unwrapped and with DDP/compile prefixes removed.

    Raises:
        UnsafeCheckpointError, ValueError: as :func:`load_pretrained`.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    try:
        # weights_only=True: a torch checkpoint is a pickle, and unpickling an untrusted one can run any code.
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UnsafeCheckpointError(
            f"Refusing to load {path}: it holds pickled Python objects other than tensors and plain containers, "
            "and mammo_ray only loads torch checkpoints with weights_only=True so that a file cannot run code. "
            "Re-save just the weights (torch.save(model.state_dict(), ...)) or convert them to .safetensors. "
            f"torch said: {first_line}"
        ) from err
    return _unwrap_state_dict(obj, path)


def _unwrap_state_dict(obj: object, path: Path) -> dict[str, torch.Tensor]:
    while isinstance(obj, dict) and not any(isinstance(value, torch.Tensor) for value in obj.values()):
        inner = next((obj[key] for key in _WRAPPER_KEYS if isinstance(obj.get(key), dict)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, dict):
        raise ValueError(f"{path} holds a {type(obj).__name__}, not a state dict of tensors")
    state_dict = {}
    for key, value in obj.items():
        if not isinstance(value, torch.Tensor):
            continue  # metadata such as an epoch counter stored beside the weights
        for prefix in _KEY_PREFIXES:
            while key.startswith(prefix):
                key = key[len(prefix) :]
        state_dict[key] = value
    if not state_dict:
        raise ValueError(f"{path} holds no tensors (top-level keys: {sorted(map(str, obj))[:10]})")
    return state_dict


def load_pretrained(model: nn.Module, path: str | Path) -> LoadReport:
    """Load local weights into a timm ConvNeXt, key by key, and report what did not fit.

    The file may be ``.safetensors`` or a torch state dict, optionally wrapped as ``{"state_dict": ...}`` or
    ``{"model": ...}`` and with ``module.`` (DDP) or ``_orig_mod.`` (torch.compile) key prefixes. Facebook's original
    ConvNeXt checkpoints are renamed by timm's own checkpoint filter. When the file's first convolution has another
    number of input channels than the model (ImageNet RGB into a grayscale stem), it is adapted with timm's
    ``adapt_input_conv``, which sums over the RGB channels for a 1-channel model. Tensors whose shape does not fit
    are skipped. A skipped classifier (another number of classes) is logged at info level, anything else at
    warning level.

    Args:
        model: A model from :func:`create_model`.
        path: The weights file.

    Returns:
        The :class:`LoadReport`, also stored as ``model.load_report``.

    Raises:
        FileNotFoundError: If the file does not exist.
        UnsafeCheckpointError: If a torch file holds arbitrary pickled objects.
        ValueError: If no tensor of the file fits the model outside its classifier.
    """
    report, to_load = _match_pretrained(model, path)
    model.load_state_dict(to_load, strict=False)
    model.load_report = report
    _log_report(report)
    return report


def check_pretrained(
    model: nn.Module, path: str | Path, state_dict: dict[str, torch.Tensor] | None = None
) -> LoadReport:
    """What :func:`load_pretrained` would load into ``model``, without loading it.

    ``model`` may live on the meta device (``with torch.device("meta"): create_model(...)``): only its keys and
    shapes are read, so a driver can check a weights file against the architecture before any worker starts.
    ``state_dict`` (:func:`read_state_dict` of ``path``) saves reading the file again for each model checked.

    Raises:
        The errors of :func:`load_pretrained`.
    """
    return _match_pretrained(model, path, state_dict)[0]


def _match_pretrained(
    model: nn.Module, path: str | Path, state_dict: dict[str, torch.Tensor] | None = None
) -> tuple[LoadReport, dict[str, torch.Tensor]]:
    path = Path(path)
    if state_dict is None:
        if not path.is_file():
            raise FileNotFoundError(f"pretrained weights file not found: {path}")
        state_dict = read_state_dict(path)
    else:
        state_dict = dict(state_dict)  # the first convolution's adaptation below replaces one entry
    if "downsample_layers.0.0.weight" in state_dict or "visual.trunk.stem.0.weight" in state_dict:
        state_dict = checkpoint_filter_fn(state_dict, model)  # FB / OpenCLIP key names → timm's

    cfg = getattr(model, "pretrained_cfg", None) or {}
    classifier = cfg.get("classifier", "head.fc")
    first_conv_key = f"{cfg.get('first_conv', 'stem.0')}.weight"
    model_state = model.state_dict()
    report = LoadReport(source=str(path))

    file_conv = state_dict.get(first_conv_key)
    model_conv = model_state.get(first_conv_key)
    if file_conv is not None and model_conv is not None and file_conv.ndim == 4:
        file_chans, model_chans = file_conv.shape[1], model_conv.shape[1]
        if file_chans != model_chans:
            state_dict[first_conv_key] = adapt_input_conv(model_chans, file_conv, base_chans=file_chans)
            how = "summed over input channels" if model_chans == 1 else "repeated and rescaled"
            report.input_adaptation = f"{first_conv_key}: {file_chans} → {model_chans} channels ({how})"

    to_load = {}
    for key, target in model_state.items():
        if key not in state_dict:
            report.missing_keys.append(key)
        elif tuple(state_dict[key].shape) != tuple(target.shape):
            report.shape_mismatches.append((key, tuple(state_dict[key].shape), tuple(target.shape)))
        else:
            to_load[key] = state_dict[key]
    report.unexpected_keys = [key for key in state_dict if key not in model_state]
    report.loaded = list(to_load)
    not_loaded = set(report.missing_keys) | {key for key, _, _ in report.shape_mismatches}
    report.skipped_head = [key for key in model_state if key.startswith(f"{classifier}.") and key in not_loaded]
    if not any(not key.startswith(f"{classifier}.") for key in to_load):
        # A 1-logit head's bias fits any other 1-logit model: a file that gives nothing else is the wrong file.
        raise ValueError(
            f"No tensor in {path} fits {cfg.get('architecture', type(model).__name__)}'s backbone: "
            f"{len(report.missing_keys)} model keys missing, {len(report.unexpected_keys)} file keys unexpected "
            f"(first file keys: {list(state_dict)[:5]})"
        )
    return report, to_load


def _log_report(report: LoadReport, max_lines: int = 20) -> None:
    logger.info("Loaded %d tensors from %s", len(report.loaded), report.source)
    if report.input_adaptation:
        logger.info("Adapted the first convolution: %s", report.input_adaptation)
    if report.skipped_head:
        # The normal case for transfer learning: the file's classifier was trained for other classes.
        logger.info("Classifier left at its new initialisation (not loaded): %s", ", ".join(report.skipped_head))
    problems = report.problems
    for line in problems[:max_lines]:
        logger.warning("Pretrained weights %s: %s", report.source, line)
    if len(problems) > max_lines:
        logger.warning("... and %d more mismatches (see model.load_report)", len(problems) - max_lines)


# --------------------------------------------------------------------------------------------------------------
# Freeze units


def _as_convnext(model: nn.Module) -> ConvNeXt:
    if not isinstance(model, ConvNeXt):
        raise TypeError(f"expected a timm ConvNeXt from create_model, got {type(model).__name__}")
    return model


def freeze_units(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The model's freeze units in forward order, with readable names.

    Units are ``stem``, each stage's ``stages.<i>.downsample`` (stages 1–3; stage 0 has none) followed by its
    ``stages.<i>.blocks.<j>``, then the final norm (``head.norm``, or ``norm_pre`` for ``convnext_tiny_hnf``), then
    ``head`` (everything in the head but its norm). Every parameter belongs to exactly one unit.

    Args:
        model: A timm ConvNeXt, e.g. from :func:`create_model`.

    Returns:
        ``(name, module)`` pairs. The ``head`` module is a container that shares the head's submodules other than
        its norm; it is not registered in the model.
    """
    model = _as_convnext(model)
    units: list[tuple[str, nn.Module]] = [("stem", model.stem)]
    for i, stage in enumerate(model.stages):
        # Stage 0 keeps the stem's resolution and width, so timm gives it an nn.Identity downsample.
        if not isinstance(stage.downsample, nn.Identity):
            units.append((f"stages.{i}.downsample", stage.downsample))
        units.extend((f"stages.{i}.blocks.{j}", block) for j, block in enumerate(stage.blocks))
    if isinstance(model.norm_pre, nn.Identity):
        # Default ConvNeXt: pool → head.norm → fc. head.norm is the original final LayerNorm.
        units.append(("head.norm", model.head.norm))
        rest = {name: child for name, child in model.head.named_children() if name != "norm"}
        units.append(("head", nn.ModuleDict(rest)))
    else:
        # head_norm_first (convnext_tiny_hnf): norm_pre → pool → fc, and the head has no norm.
        units.append(("norm_pre", model.norm_pre))
        units.append(("head", model.head))
    return units


@functools.cache
def count_units(backbone: str) -> int:
    """Number of freeze units of a backbone, built on the meta device (no weights are allocated).

    Args:
        backbone: A name from :func:`available_backbones`.

    Returns:
        The unit count; ``apply_freeze`` accepts ``0 … count``.
    """
    _check_backbone(backbone)
    return len(freeze_units(timm.create_model(backbone, pretrained=False, num_classes=1, device="meta")))


class _TrainKeepingFrozenUnitsInEval:
    """Replaces ``model.train`` so that frozen units stay in eval mode.

    A callable object rather than a bound function, so that a frozen model still deep-copies (EMA) and pickles.
    Looking up ``train`` on the instance first is what makes ``DistributedDataParallel.train()`` and
    ``model.eval()`` (which calls ``self.train(False)``) go through it too.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __call__(self, mode: bool = True) -> nn.Module:
        model = self.model
        type(model).train(model, mode)
        if mode:
            for _, unit in freeze_units(model)[: model.frozen_units]:
                unit.eval()
        return model


def apply_freeze(model: nn.Module, k: int) -> None:
    """Freeze the first ``k`` units and keep them in eval mode, also after ``model.train()``.

    Frozen units get ``requires_grad=False``; every other unit gets ``requires_grad=True``, so calling this again
    with another ``k`` re-freezes from scratch. Eval mode matters as much as the gradients: in train mode a frozen
    block would still drop paths at random and the head would still apply dropout. ``k=0`` trains everything;
    ``k=count`` freezes everything.

    Args:
        model: A timm ConvNeXt from :func:`create_model`.
        k: Number of units to freeze, counted in forward order (see :func:`freeze_units`).

    Raises:
        ValueError: If ``k`` is outside ``0 … count_units(backbone)``.
    """
    units = freeze_units(model)
    if not 0 <= k <= len(units):
        name = (getattr(model, "pretrained_cfg", None) or {}).get("architecture", type(model).__name__)
        raise ValueError(f"freeze units must be in [0, {len(units)}] for {name}, got {k}")
    for index, (_, unit) in enumerate(units):
        unit.requires_grad_(index >= k)
    model.frozen_units = k
    if not isinstance(model.__dict__.get("train"), _TrainKeepingFrozenUnitsInEval):
        model.train = _TrainKeepingFrozenUnitsInEval(model)
    model.train(model.training)


def trainable_parameters(model: nn.Module) -> int:
    """Number of parameter elements that receive gradients.

    Args:
        model: Any module.

    Returns:
        The sum of ``numel`` over parameters with ``requires_grad``.
    """
    return sum(param.numel() for param in model.parameters() if param.requires_grad)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Optimizer parameter groups: weight decay on weight matrices and kernels only.

    Norm weights and biases, all biases and the layer-scale ``gamma`` (and V2's GRN parameters) are 1-D; decaying
    them pulls scales towards zero instead of regularising, so every parameter with ``ndim <= 1`` goes to the
    group without decay, as do names listed by a model's ``no_weight_decay()``. Frozen parameters are left out.

    Args:
        model: The model to optimise.
        weight_decay: Decay of the decayed group.

    Returns:
        Up to two groups, ``{"params", "weight_decay"}``, without empty ones.
    """
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim <= 1 or name in skip else decay).append(param)
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return [group for group in groups if group["params"]]
