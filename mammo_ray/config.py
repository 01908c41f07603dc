"""Typed configuration: one YAML space file holds the fixed config and the search space.

The file has the sections ``data``, ``model``, ``train``, ``resources``, ``search`` and ``space``
(DESIGN.md, "The space file"). Each section is a dataclass; loading checks every key and value
against the fields, so a typo or a bad range is an error that names the key before anything
starts. ``--set a.b=c`` overrides go through the same checks.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

SPACES_DIR = Path(__file__).resolve().parent.parent / "search_spaces"


class ConfigError(ValueError):
    """A space file or override that cannot be used; the message names the file and key."""


@dataclass
class SyntheticConfig:
    """Generate the built-in synthetic data set when no manifests are given (the demo)."""

    enabled: bool = False
    out: str = "results/demo-data"
    patients: int = 600
    prevalence: float = 0.05
    size: list[int] = field(default_factory=lambda: [512, 416])
    seed: int = 0
    split: list[float] = field(default_factory=lambda: [0.6, 0.2, 0.2])


@dataclass
class DataConfig:
    train: str | None = None
    valid: str | None = None
    test: str | None = None
    image_size: list[int] = field(default_factory=lambda: [128, 96])
    # Use the prepared pixel cache when the manifest has one; otherwise decode files on the fly.
    use_cache: bool = True
    # Rows per map_batches call that loads pixels; small enough to keep blocks well under 100 MiB.
    load_batch_size: int = 32
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)


@dataclass
class ModelConfig:
    backbone: str = "convnext_atto"
    pretrained: str | None = None
    drop_path_rate: float = 0.0
    dropout: float = 0.0
    pool: str = "avg"
    stem: str = "patchify"
    norm: str = "layer"
    freeze_units: int = 0
    attenuation: bool = False
    in_chans: int = 1


@dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 32
    optimizer: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.05
    momentum: float = 0.9
    schedule: str = "cosine"
    warmup_epochs: float = 0.0
    decay_every: int = 0
    decay_multiplier: float = 0.5
    loss: str = "bce"
    pos_weight: float | None = None
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    t_samples: int = 20
    sampler: str = "weighted"
    positive_fraction: float = 0.5
    epoch_length: int | None = None
    augment: bool = True
    augment_positive_strength: float = 1.0
    amp: bool = True
    channels_last: bool = True
    grad_clip: float | None = 1.0
    ema: bool = False
    ema_decay: float = 0.999
    seed: int = 0
    threshold: float = 0.3
    mc_dropout_samples: int = 0
    tta: bool = False


@dataclass
class ResourcesConfig:
    num_workers: int = 1
    cpus_per_worker: float = 0.5
    gpus_per_worker: float = 0.0
    # The trial actor only builds and waits on a TorchTrainer; a whole CPU for it would starve Ray Data.
    trial_cpus: float = 0.1
    max_concurrent_trials: int = 1
    max_failures: int = 1
    backend: str = "auto"
    # Intra-op threads of each Train worker's torch (0: as Ray sets them, the worker's whole CPUs, at least 1).
    # Threads are not a Ray reservation: a CPU worker holding 0.5 CPU can still compute on 2 cores.
    torch_threads: int = 0


@dataclass
class SearchConfig:
    metric: str = "val_auc"
    mode: str = "max"
    num_samples: int = 8
    searcher: str = "optuna"
    scheduler: str = "asha"
    grace_period: int = 1
    reduction_factor: int = 2
    seed: int = 0
    checkpoints_to_keep: int = 2


@dataclass
class Config:
    name: str = "sweep"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    space: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def get(self, key: str) -> Any:
        node: Any = self
        for part in key.split("."):
            node = getattr(node, part)
        return node


# Allowed values and ranges, checked after the types. Keys are dotted config keys.
CHOICES: dict[str, tuple[str, ...]] = {
    "model.pool": ("avg", "max", "avgmax"),
    "model.stem": ("patchify", "deep"),
    "model.norm": ("layer", "batch"),
    "train.optimizer": ("adamw", "adam", "sgd"),
    "train.schedule": ("cosine", "step", "constant"),
    "train.loss": ("bce", "focal"),
    "train.sampler": ("weighted", "balanced", "simple"),
    "resources.backend": ("auto", "gloo", "nccl"),
    "search.mode": ("max", "min"),
    "search.searcher": ("optuna", "random"),
    "search.scheduler": ("asha", "fifo"),
}
# synth.MIN_SIZE, the smallest [height, width] synth draws (kept here so that config needs no imaging imports).
SYNTH_MIN_SIZE = (64, 48)
# ConvNeXt's total stride: data.image_size (and prepare --size) sides must be at least this.
MIN_IMAGE_SIDE = 32
# The per-epoch validation metrics every run reports, each with the direction that makes it better: the choices
# of search.metric, whose search.mode must agree (ASHA, Optuna, checkpoint retention and export all follow it).
SELECTION_METRICS: dict[str, str] = {
    "val_auc": "max",
    "val_pr_auc": "max",
    "val_auc_breast": "max",
    "val_sensitivity@0.3": "max",
    "val_specificity@0.3": "max",
    "val_loss": "min",
    "val_ece": "min",
    "val_brier": "min",
}
RANGES: dict[str, tuple[float | None, float | None]] = {
    "data.synthetic.patients": (4, None),
    "data.synthetic.prevalence": (0.0, 1.0),
    "data.load_batch_size": (1, None),
    "model.drop_path_rate": (0.0, 1.0),
    "model.dropout": (0.0, 1.0),
    "model.freeze_units": (0, None),
    "model.in_chans": (1, 3),
    "train.epochs": (1, None),
    "train.batch_size": (2, None),
    "train.lr": (0.0, None),
    "train.weight_decay": (0.0, None),
    "train.momentum": (0.0, 1.0),
    "train.warmup_epochs": (0.0, None),
    "train.decay_every": (0, None),
    "train.decay_multiplier": (0.0, 1.0),
    "train.pos_weight": (0.0, None),
    "train.focal_alpha": (0.0, 1.0),
    "train.focal_gamma": (0.0, None),
    "train.t_samples": (1, None),
    "train.positive_fraction": (0.0, 1.0),
    "train.epoch_length": (1, None),
    "train.augment_positive_strength": (0.0, 3.0),
    "train.grad_clip": (0.0, None),
    "train.ema_decay": (0.0, 1.0),
    "train.threshold": (0.0, 1.0),
    "train.mc_dropout_samples": (0, None),
    "resources.num_workers": (1, None),
    "resources.cpus_per_worker": (0.0, None),
    "resources.gpus_per_worker": (0.0, None),
    "resources.trial_cpus": (0.0, None),
    "resources.max_concurrent_trials": (1, None),
    "resources.max_failures": (0, None),
    "resources.torch_threads": (0, None),
    "search.num_samples": (1, None),
    "search.grace_period": (1, None),
    "search.reduction_factor": (2, None),
    "search.checkpoints_to_keep": (1, None),
}
DISTRIBUTIONS = ("loguniform", "uniform", "int", "choice", "grid")


def resolve_space_path(space: str | Path) -> Path:
    """Find a space file: the path itself, else its file name looked up in ``search_spaces/``.

    ``spaces/adamw.yaml``, ``adamw.yaml`` and ``adamw`` all resolve to ``search_spaces/adamw.yaml``.

    Raises:
        ConfigError: when nothing matches; the message lists the shipped space files.
    """
    path = Path(space)
    if path.is_file():
        return path
    name = path.name if path.suffix in (".yaml", ".yml") else f"{path.name}.yaml"
    candidate = SPACES_DIR / name
    if candidate.is_file():
        return candidate
    available = ", ".join(sorted(p.stem for p in SPACES_DIR.glob("*.yaml"))) or "(none)"
    raise ConfigError(f"space file {str(space)!r} not found, and no {name!r} in {SPACES_DIR}. Available: {available}")


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    """Check ``value`` against the annotation ``tp``; return it converted (int → float where allowed)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key, source)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if errors else f"{source}: {key}: bad value {value!r}")
    if tp is Any:
        return value
    if origin is list:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{source}: {key} must be a list, got {value!r}")
        return [_coerce(v, args[0], f"{key}[{i}]", source) for i, v in enumerate(value)] if args else list(value)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: {key} must be a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{source}: {key} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{source}: {key} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):
            # YAML 1.1 reads 3e-4 (no dot) as a string; accept any plain number written that way.
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(f"{source}: {key} must be a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{source}: {key} must be a number, got {value!r}")
        if not math.isfinite(float(value)):
            raise ConfigError(f"{source}: {key} must be finite, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{source}: {key} must be a string, got {value!r}")
        return value
    raise ConfigError(f"{source}: {key}: unsupported type {tp}")


# Keys earlier versions wrote into every saved config (trial folders, checkpoints, bundles) and that no longer
# exist: they are read and dropped, so that an earlier bundle still loads in predict and an earlier sweep resumes.
RETIRED_KEYS = {
    "train.log_every_n_steps": "removed 2026-12-07: no code read it",
}


def _build(cls: type, data: Any, prefix: str, source: str) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: section {prefix or 'top level'!r} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if dotted in RETIRED_KEYS:
            continue
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean {prefix + close[0]!r}?)" if close else ""
            raise ConfigError(f"{source}: unknown key {dotted!r}{hint}. Known keys in this section: {', '.join(names)}")
        tp = hints[key]
        if _is_dataclass_type(tp):
            kwargs[key] = _build(tp, value, f"{dotted}.", source)
        else:
            kwargs[key] = _coerce(value, tp, dotted, source)
    return cls(**kwargs)


def _check_value(key: str, value: Any, source: str) -> None:
    if key in CHOICES and value not in CHOICES[key]:
        raise ConfigError(f"{source}: {key} must be one of {', '.join(CHOICES[key])}, got {value!r}")
    if key in RANGES and value is not None:
        low, high = RANGES[key]
        if (low is not None and value < low) or (high is not None and value > high):
            bounds = f"[{low if low is not None else '-inf'}, {high if high is not None else 'inf'}]"
            raise ConfigError(f"{source}: {key} = {value!r} is outside the allowed range {bounds}")


def _walk(obj: Any, prefix: str = ""):
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            yield from _walk(value, f"{key}.")
        else:
            yield key, value


def _field_type(key: str) -> Any:
    cls: Any = Config
    parts = key.split(".")
    for i, part in enumerate(parts):
        if not _is_dataclass_type(cls):
            raise KeyError(key)
        hints = typing.get_type_hints(cls)
        if part not in hints:
            raise KeyError(key)
        cls = hints[part]
        if i < len(parts) - 1 and not _is_dataclass_type(cls):
            raise KeyError(key)
    return cls


def config_keys() -> list[str]:
    """All dotted keys that a space file or ``--set`` may name."""
    return [key for key, _ in _walk(Config()) if key != "space"]


def _check_space(space: dict[str, Any], source: str) -> None:
    keys = config_keys()
    for key, spec in space.items():
        where = f"space.{key}"
        if key in keys and (key.startswith(("search.", "resources.")) or key == "name"):
            raise ConfigError(
                f"{source}: {where}: {key!r} cannot be searched: search.*, resources.* and name shape the sweep "
                "itself; set it in the config instead"
            )
        if key not in keys:
            searchable = [k for k in keys if not k.startswith(("search.", "resources.")) and k != "name"]
            close = difflib.get_close_matches(key, searchable, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{source}: {where}: {key!r} is not a searchable config key{hint}")
        if not isinstance(spec, dict) or "type" not in spec:
            raise ConfigError(f"{source}: {where} must be a mapping with a 'type' ({', '.join(DISTRIBUTIONS)})")
        kind = spec["type"]
        if kind not in DISTRIBUTIONS:
            raise ConfigError(
                f"{source}: {where}: unknown distribution {kind!r}; use one of {', '.join(DISTRIBUTIONS)}"
            )
        allowed = {"type", "low", "high", "step"} if kind in ("uniform", "loguniform", "int") else {"type", "values"}
        extra = set(spec) - allowed
        if extra:
            raise ConfigError(f"{source}: {where}: unknown field(s) {sorted(extra)} for a {kind} distribution")
        tp = _field_type(key)
        if kind in ("uniform", "loguniform", "int"):
            if "low" not in spec or "high" not in spec:
                raise ConfigError(f"{source}: {where}: a {kind} distribution needs 'low' and 'high'")
            low, high = spec["low"], spec["high"]
            try:
                low, high = (float(b) if isinstance(b, str) else b for b in (low, high))
            except ValueError:
                raise ConfigError(
                    f"{source}: {where}: bounds must be numbers, got {spec['low']!r}, {spec['high']!r}"
                ) from None
            spec["low"], spec["high"] = low, high
            for bound in (low, high):
                if isinstance(bound, bool) or not isinstance(bound, int | float):
                    raise ConfigError(f"{source}: {where}: bounds must be numbers, got {bound!r}")
            if not low < high:
                raise ConfigError(f"{source}: {where}: low ({low}) must be below high ({high})")
            if kind == "loguniform" and low <= 0:
                raise ConfigError(f"{source}: {where}: loguniform needs low > 0, got {low}")
            if kind == "int" and not (float(low).is_integer() and float(high).is_integer()):
                raise ConfigError(f"{source}: {where}: int bounds must be integers, got {low}, {high}")
            if "step" in spec:
                spec["step"] = _check_step(spec, kind, low, high, f"{source}: {where}")
            for bound in (low, high):
                _check_value(key, _coerce(bound, tp, where, source), source)
        else:
            values = spec.get("values")
            if not isinstance(values, list) or not values:
                raise ConfigError(f"{source}: {where}: a {kind} distribution needs a non-empty 'values' list")
            for value in values:
                _check_value(key, _coerce(value, tp, where, source), source)


def _on_grid(value: float, step: float) -> bool:
    ratio = value / step
    return abs(ratio - round(ratio)) <= 1e-9 * max(1.0, abs(ratio))


def _check_step(spec: dict[str, Any], kind: str, low: float, high: float, where: str) -> float | int:
    """A ``step`` the sweep samples with, as given: positive, and ``low`` and ``high`` multiples of it.

    Optuna counts steps from ``low`` and Tune's random search rounds to multiples of the step, so both agree only
    when the bounds lie on the grid. Optuna cannot quantise a log scale (Ray drops the step with a warning).
    """
    step = spec["step"]
    if isinstance(step, str):
        try:
            step = float(step)
        except ValueError:
            raise ConfigError(f"{where}: step must be a number, got {spec['step']!r}") from None
    if isinstance(step, bool) or not isinstance(step, int | float) or not step > 0:
        raise ConfigError(f"{where}: step must be a positive number, got {spec['step']!r}")
    if kind == "loguniform":
        raise ConfigError(
            f"{where}: a loguniform distribution cannot take a step (Optuna samples a log scale unquantised)"
        )
    if kind == "int" and not float(step).is_integer():
        raise ConfigError(f"{where}: an int distribution's step must be an integer, got {step}")
    if not (_on_grid(low, step) and _on_grid(high, step)):
        raise ConfigError(
            f"{where}: low ({low}) and high ({high}) must be multiples of step ({step}), so that every searcher draws "
            "the same values"
        )
    return int(step) if kind == "int" else float(step)


def validate(config: Config, source: str = "config") -> Config:
    """Check ranges, choices and the search space; return the config unchanged."""
    for key, value in _walk(config):
        if key != "space":
            _check_value(key, value, source)
    # The name becomes a folder (results/<name>, <storage>/<name>) that --overwrite deletes: one plain folder name.
    name = config.name
    if not name or name in {".", ".."} or any(sep in name for sep in "/\\") or name != name.strip():
        raise ConfigError(f"{source}: name must be a single folder name (no '/', not '.' or '..'), got {name!r}")
    # ConvNeXt shrinks its input 32-fold (stem 4, three 2× downsamplings); a smaller side leaves its last stage no
    # pixel and every Train worker failed at its first step.
    if len(config.data.image_size) != 2 or min(config.data.image_size) < MIN_IMAGE_SIDE:
        raise ConfigError(
            f"{source}: data.image_size must be [height, width], each >= 32 (ConvNeXt's total stride), "
            f"got {config.data.image_size}"
        )
    synthetic = config.data.synthetic
    if synthetic.enabled and (
        len(synthetic.size) != 2 or synthetic.size[0] < SYNTH_MIN_SIZE[0] or synthetic.size[1] < SYNTH_MIN_SIZE[1]
    ):
        # synth refused it only once Ray was up and the sweep was generating its data.
        raise ConfigError(
            f"{source}: data.synthetic.size must be [height, width] of at least {list(SYNTH_MIN_SIZE)} (synth's "
            f"smallest breast), got {synthetic.size}"
        )
    fractions = config.data.synthetic.split
    if len(fractions) != 3 or abs(sum(fractions) - 1.0) > 1e-6 or min(fractions) < 0:
        raise ConfigError(f"{source}: data.synthetic.split must be three fractions summing to 1, got {fractions}")
    if config.model.attenuation and config.train.loss == "focal":
        raise ConfigError(f"{source}: model.attenuation uses its own loss; set train.loss to bce")
    searched_loss = config.space.get("train.loss")
    losses = searched_loss.get("values") if isinstance(searched_loss, dict) else None
    losses = losses if isinstance(losses, list) else [config.train.loss]
    if config.train.pos_weight is not None and "focal" in losses:
        raise ConfigError(
            f"{source}: train.pos_weight weights BCE only; the focal loss weights classes by train.focal_alpha "
            "(it was dropped without a word)"
        )
    if config.train.warmup_epochs > config.train.epochs and "train.epochs" not in config.space:
        raise ConfigError(
            f"{source}: train.warmup_epochs ({config.train.warmup_epochs:g}) exceeds train.epochs "
            f"({config.train.epochs}): the learning rate would never reach train.lr"
        )
    if config.train.mc_dropout_samples and config.model.dropout == 0 and "model.dropout" not in config.space:
        raise ConfigError(
            f"{source}: train.mc_dropout_samples {config.train.mc_dropout_samples} needs model.dropout > 0: without "
            "dropout every pass is the same and the epistemic uncertainty reads 0"
        )
    gpus, workers = config.resources.gpus_per_worker, config.resources.num_workers
    if 0 < gpus < 1 and workers > 1 and config.resources.backend in ("auto", "nccl"):
        raise ConfigError(
            f"{source}: resources.gpus_per_worker {gpus:g} with {workers} workers would put two NCCL ranks on one GPU, "
            "which NCCL refuses; give each worker a whole GPU, or use one worker"
        )
    if (config.model.pretrained or "").startswith("timm:") and (config.model.stem, config.model.norm) != (
        "patchify",
        "layer",
    ):
        raise ConfigError(
            f"{source}: model.pretrained {config.model.pretrained!r} is an ImageNet ConvNeXt, which fits only "
            f"model.stem=patchify and model.norm=layer (got {config.model.stem}, {config.model.norm})"
        )
    metric, mode = config.search.metric, config.search.mode
    if metric not in SELECTION_METRICS:
        raise ConfigError(
            f"{source}: search.metric {metric!r} is not a metric that runs report; choose one of "
            f"{', '.join(SELECTION_METRICS)}"
        )
    if mode != SELECTION_METRICS[metric]:
        better = "higher" if SELECTION_METRICS[metric] == "max" else "lower"
        raise ConfigError(
            f"{source}: search.mode {mode} would select the worst {metric}; {metric} is better when {better}"
        )
    _check_space(config.space, source)
    if config.search.searcher == "optuna" and any(spec["type"] == "grid" for spec in config.space.values()):
        grid = [k for k, spec in config.space.items() if spec["type"] == "grid"]
        raise ConfigError(
            f"{source}: space.{grid[0]}: 'grid' needs search.searcher: random (Optuna samples; use 'choice' with optuna)"
        )
    return config


class DuplicateKeyError(yaml.YAMLError):
    """A key given twice in one YAML mapping (plain YAML keeps the last one without a word)."""


class UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping, e.g. two ``train:`` sections: the first
    section's settings would be dropped without a word."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # ``<<: *anchor``: its keys may be overridden
                    continue
                key, line = self.construct_object(key_node, deep=deep), key_node.start_mark.line + 1
                try:
                    first = seen.get(key)
                except TypeError:  # an unhashable key: the base class names it
                    continue
                if first is not None:
                    raise DuplicateKeyError(
                        f"key {key!r} appears twice in one mapping (lines {first} and {line}); YAML would keep the "
                        "second and drop the first without a word. Merge them into one"
                    )
                seen[key] = line
        return super().construct_mapping(node, deep=deep)


def parse_override(text: str) -> tuple[str, Any]:
    """Parse ``key=value`` with a YAML value (``train.lr=3e-4``, ``data.image_size=[256,192]``)."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    try:
        value = yaml.load(raw, Loader=UniqueKeyLoader) if raw.strip() else None  # a SafeLoader
    except yaml.YAMLError as err:
        raise ConfigError(f"--set {key}: cannot parse value {raw!r}: {err}") from err
    return key, value


def _nest(key: str, value: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    node = out
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return out


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict) and key != "space":
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def from_dict(data: dict[str, Any], source: str = "config", overrides: dict[str, Any] | None = None) -> Config:
    """Build and validate a Config from nested dicts plus dotted-key overrides."""
    merged = copy.deepcopy(data or {})
    for key, value in (overrides or {}).items():
        if key.startswith("space."):
            # Space keys are dotted config keys themselves: space.train.lr is the entry "train.lr".
            space = dict(merged.get("space") or {})
            entry = key[len("space.") :]
            if value is None:  # --set space.train.lr=null: train.lr is no longer searched
                if entry not in space:
                    raise ConfigError(f"--set {key}=null: the space does not search {entry}")
                del space[entry]
            else:
                space[entry] = value
            merged["space"] = space
            continue
        if key in RETIRED_KEYS:
            raise ConfigError(f"--set: {key} no longer exists ({RETIRED_KEYS[key]})")
        if key not in config_keys() and key != "space":
            close = difflib.get_close_matches(key, config_keys(), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"--set: unknown key {key!r}{hint}")
        merged = _merge(merged, _nest(key, value))
    config = _build(Config, merged, "", source)
    return validate(config, source)


def check_searched_overrides(config: Config, overrides: dict[str, Any], source: str) -> None:
    """Refuse ``--set key=value`` on a key that the space searches: each trial's sampled value would replace it.

    Only a sweep searches; ``train`` ignores the space, so there ``--set`` always applies.

    Raises:
        ConfigError: naming the key and the file, and how to fix the key at the value or search another range.
    """
    searched = [key for key in overrides if key in config.space]
    if searched:
        key = searched[0]
        raise ConfigError(
            f"--set {key}={overrides[key]} would have no effect: {source} searches {key} (space.{key}), and each "
            f"trial replaces the value with its own. To fix it at this value, remove space.{key} from the file or add "
            f"--set space.{key}=null; to search another range, edit space.{key} or pass --set 'space.{key}={{...}}'"
        )


def load(space: str | Path, overrides: list[str] | dict[str, Any] | None = None) -> Config:
    """Load a space file (resolved like ``--space``) and apply ``--set`` overrides."""
    path = resolve_space_path(space)
    try:
        data = yaml.load(path.read_text(), Loader=UniqueKeyLoader)  # a SafeLoader
    except DuplicateKeyError as err:
        raise ConfigError(f"{path}: {err}") from err
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from err
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    if not data:
        # Every default under the file's name, nothing searched: a truncated copy or the wrong file, not a choice.
        raise ConfigError(
            f"{path}: the file holds no settings (it is empty or only comments); start from a shipped space such as "
            f"{SPACES_DIR / 'demo.yaml'}"
        )
    if isinstance(overrides, list):
        overrides = dict(parse_override(item) for item in overrides)
    config = from_dict(data or {}, source=str(path), overrides=overrides)
    if "name" not in (data or {}) and not (overrides or {}).get("name"):
        config.name = path.stem
    return config


def with_params(config: Config, params: dict[str, Any]) -> Config:
    """Return a copy of ``config`` with sampled search parameters (dotted keys) applied and checked."""
    data = config.to_dict()
    return from_dict(data, source="trial parameters", overrides=params)


def dump(config: Config) -> str:
    """The fully resolved config as YAML, saved with every trial and inside every checkpoint."""
    return yaml.safe_dump(config.to_dict(), sort_keys=False)


def save(config: Config, path: str | Path) -> None:
    """Write the resolved config atomically."""
    from mammo_ray.io import atomic_write_text

    atomic_write_text(Path(path), dump(config))
