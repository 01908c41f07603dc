"""Tests for mammo_ray.model: the timm factory, freeze units, parameter groups and local pretrained weights.

Forward passes use convnext_atto at 64×64 on CPU. Larger backbones are only counted, on the meta device.
"""

from __future__ import annotations

import argparse
import copy
import logging
import pickle

import pytest
import timm
import torch
from safetensors.torch import save_file
from torch import nn

from mammo_ray.model import (
    UnsafeCheckpointError,
    apply_freeze,
    available_backbones,
    count_units,
    create_model,
    freeze_units,
    load_pretrained,
    param_groups,
    trainable_parameters,
)

SIZE = 64


@pytest.fixture
def atto() -> nn.Module:
    torch.manual_seed(0)
    return create_model("convnext_atto")


def _image(batch: int = 2, chans: int = 1) -> torch.Tensor:
    return torch.randn(batch, chans, SIZE, SIZE, generator=torch.Generator().manual_seed(1))


def _param_ids(modules) -> set[int]:
    return {id(param) for module in modules for param in module.parameters()}


# --------------------------------------------------------------------------------------------------------------
# Factory


def test_available_backbones_are_convnext_v1_and_v2_only() -> None:
    names = available_backbones()
    assert {"convnext_atto", "convnext_tiny", "convnext_small", "convnextv2_atto", "convnextv2_huge"} <= set(names)
    assert all(name.startswith(("convnext_", "convnextv2_")) for name in names)


@pytest.mark.parametrize(("attenuation", "columns"), [(False, 1), (True, 2)])
def test_output_shape(attenuation: bool, columns: int) -> None:
    model = create_model("convnext_atto", attenuation=attenuation).eval()
    with torch.no_grad():
        assert model(_image(3)).shape == (3, columns)


@pytest.mark.parametrize("pool", ["max", "avgmax"])
def test_pool_options(pool: str) -> None:
    model = create_model("convnext_atto", pool=pool, dropout=0.3).eval()
    assert model.head.drop.p == 0.3
    with torch.no_grad():
        assert model(_image()).shape == (2, 1)


def test_grayscale_stem_by_default(atto: nn.Module) -> None:
    assert atto.stem[0].in_channels == 1
    assert create_model("convnext_atto", in_chans=3).stem[0].in_channels == 3


@pytest.mark.parametrize("backbone", ["resnet50", "convnext", "convnext_tiny.fb_in1k", "test_convnext", ""])
def test_unknown_backbone_lists_valid_names(backbone: str) -> None:
    with pytest.raises(ValueError, match="valid names: .*convnext_atto.*convnextv2_tiny"):
        create_model(backbone)
    with pytest.raises(ValueError, match="valid names"):
        count_units(backbone)


@pytest.mark.parametrize(
    "kwargs", [{"pool": "catavgmax"}, {"pool": ""}, {"dropout": 1.0}, {"drop_path_rate": -0.1}, {"in_chans": 0}]
)
def test_bad_options(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        create_model("convnext_atto", **kwargs)


@pytest.mark.parametrize(("stem", "norm"), [("deep", "layer"), ("patchify", "batch"), ("deep", "batch")])
def test_stem_and_norm_variants(stem: str, norm: str, tmp_path) -> None:
    torch.manual_seed(0)
    model = create_model("convnext_atto", stem=stem, norm=norm, attenuation=True)
    norms = (nn.BatchNorm2d,) if norm == "batch" else (nn.LayerNorm, timm.layers.LayerNorm2d)
    blocks = [m for m in model.stages.modules() if isinstance(m, norms)]
    assert blocks, f"no {norm} norm in the stages"
    if norm == "batch":
        assert not any(isinstance(m, (nn.LayerNorm, timm.layers.LayerNorm2d)) for m in model.modules())
    if stem == "deep":
        assert isinstance(model.stem[0], nn.Conv2d) and model.stem[0].stride == (2, 2)
        assert isinstance(model.stem[-1], nn.MaxPool2d)
    # Same stride and width as the patchify stem, so the stages see what they were built for.
    features = model.stem(_image())
    assert features.shape == (2, 40, SIZE // 4, SIZE // 4)
    model.train()
    output = model(_image(3))
    output.sum().backward()
    assert output.shape == (3, 2)
    assert all(param.grad is not None for param in model.parameters())
    # A file of the same variant (an exported bundle) loads back completely.
    path = tmp_path / "variant.safetensors"
    save_file(model.state_dict(), str(path))
    again = create_model("convnext_atto", stem=stem, norm=norm, attenuation=True, pretrained=str(path))
    assert again.load_report.problems == []
    model.eval(), again.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(_image()), again(_image()))


def test_freeze_units_of_the_deep_stem() -> None:
    model = create_model("convnext_atto", stem="deep", norm="batch")
    assert len(freeze_units(model)) == count_units("convnext_atto")
    apply_freeze(model, 1)
    model.train()
    assert not model.stem.training and not model.stem[1].training  # BatchNorm statistics stay as they were
    assert not any(param.requires_grad for param in model.stem.parameters())
    assert all(param.requires_grad for param in model.stages.parameters())


@pytest.mark.parametrize("kwargs", [{"stem": "overlap"}, {"norm": "group"}])
def test_unknown_stem_or_norm(kwargs: dict) -> None:
    with pytest.raises(ValueError, match="must be one of"):
        create_model("convnext_atto", **kwargs)


@pytest.mark.parametrize("kwargs", [{"stem": "deep"}, {"norm": "batch"}])
def test_imagenet_tags_refused_for_variants(kwargs: dict) -> None:
    with pytest.raises(ValueError, match="fit only stem='patchify' and norm='layer'"):
        create_model("convnext_atto", pretrained="timm:fb_in1k", **kwargs)


def test_timm_prefix_without_tag_is_refused_before_any_download() -> None:
    with pytest.raises(ValueError, match="no tag"):
        create_model("convnext_atto", pretrained="timm:")


# --------------------------------------------------------------------------------------------------------------
# Freeze units


@pytest.mark.parametrize(
    ("backbone", "expected"),
    [
        ("convnext_atto", 1 + 3 + 12 + 1 + 1),  # depths 2, 2, 6, 2
        ("convnext_tiny", 1 + 3 + 18 + 1 + 1),  # depths 3, 3, 9, 3
        ("convnext_small", 1 + 3 + 36 + 1 + 1),  # depths 3, 3, 27, 3: the reference's 42
        ("convnext_tiny_hnf", 1 + 3 + 18 + 1 + 1),  # final norm is norm_pre
        ("convnextv2_atto", 1 + 3 + 12 + 1 + 1),
        ("convnextv2_nano", 1 + 3 + 14 + 1 + 1),  # depths 2, 2, 8, 2
        ("convnext_xxlarge", 1 + 3 + 40 + 1 + 1),  # depths 3, 4, 30, 3
    ],
)
def test_unit_counts(backbone: str, expected: int) -> None:
    assert count_units(backbone) == expected


def test_convnext_small_has_42_units() -> None:
    assert count_units("convnext_small") == 42


def test_unit_names_in_forward_order(atto: nn.Module) -> None:
    names = [name for name, _ in freeze_units(atto)]
    assert len(names) == count_units("convnext_atto")
    assert names[:4] == ["stem", "stages.0.blocks.0", "stages.0.blocks.1", "stages.1.downsample"]
    assert "stages.0.downsample" not in names  # an nn.Identity in timm, not a unit
    assert [name for name in names if name.endswith("downsample")] == [f"stages.{i}.downsample" for i in (1, 2, 3)]
    assert names[-2:] == ["head.norm", "head"]


def test_hnf_final_norm_is_norm_pre() -> None:
    model = timm.create_model("convnext_tiny_hnf", num_classes=1, device="meta")
    units = dict(freeze_units(model))
    assert list(units)[-2:] == ["norm_pre", "head"]
    assert units["norm_pre"] is model.norm_pre and units["head"] is model.head


def test_units_partition_the_parameters(atto: nn.Module) -> None:
    modules = [module for _, module in freeze_units(atto)]
    counted = [id(param) for module in modules for param in module.parameters()]
    assert len(counted) == len(set(counted))  # no parameter in two units
    assert set(counted) == {id(param) for param in atto.parameters()}


def test_freeze_units_needs_a_convnext() -> None:
    with pytest.raises(TypeError, match="ConvNeXt"):
        freeze_units(nn.Linear(2, 2))


@pytest.mark.parametrize("k", [0, 1, 5, 16, 17, 18])
def test_freezing_removes_exactly_those_parameters(atto: nn.Module, k: int) -> None:
    units = [module for _, module in freeze_units(atto)]
    frozen = _param_ids(units[:k])
    apply_freeze(atto, k)

    expected = sum(param.numel() for param in atto.parameters() if id(param) not in frozen)
    assert trainable_parameters(atto) == expected
    grouped = [id(param) for group in param_groups(atto, 0.05) for param in group["params"]]
    assert len(grouped) == len(set(grouped))
    assert set(grouped) == {id(param) for param in atto.parameters()} - frozen


def test_refreezing_with_smaller_k_unfreezes(atto: nn.Module) -> None:
    total = trainable_parameters(atto)
    apply_freeze(atto, 10)
    assert trainable_parameters(atto) < total
    apply_freeze(atto, 0)
    assert trainable_parameters(atto) == total
    assert all(module.training for module in atto.modules())


@pytest.mark.parametrize("k", [-1, 19])
def test_freeze_out_of_range_names_the_range(atto: nn.Module, k: int) -> None:
    with pytest.raises(ValueError, match=r"\[0, 18\] for convnext_atto"):
        apply_freeze(atto, k)


def test_frozen_units_stay_in_eval_after_train(atto: nn.Module) -> None:
    apply_freeze(atto, 7)
    units = freeze_units(atto)
    for call in (lambda: atto.train(), lambda: atto.eval().train(True), lambda: copy.deepcopy(atto).train()):
        model = call()
        units = freeze_units(model)
        assert all(not module.training for _, unit in units[:7] for module in unit.modules())
        assert all(module.training for _, unit in units[7:] for module in unit.modules())
    atto.eval()
    assert not any(module.training for module in atto.modules())


def test_frozen_model_survives_pickling(atto: nn.Module) -> None:
    apply_freeze(atto, 7)
    restored = pickle.loads(pickle.dumps(atto)).train()
    assert restored.frozen_units == 7
    assert not freeze_units(restored)[6][1].training and freeze_units(restored)[7][1].training


def test_drop_path_and_dropout_inactive_in_frozen_units() -> None:
    torch.manual_seed(0)
    model = create_model("convnext_atto", drop_path_rate=0.5, dropout=0.5)
    x = _image()
    n = count_units("convnext_atto")

    model.train()
    with torch.no_grad():
        assert not torch.equal(model.forward_features(x), model.forward_features(x))  # drop path is live

    apply_freeze(model, n - 2)  # every block frozen; head.norm and head train
    model.train()
    with torch.no_grad():
        assert torch.equal(model.forward_features(x), model.forward_features(x))
        assert not torch.equal(model(x), model(x))  # the trainable head still applies dropout

    apply_freeze(model, n)
    model.train()
    with torch.no_grad():
        assert torch.equal(model(x), model(x))


def test_param_groups_decay_only_matrices_and_kernels(atto: nn.Module) -> None:
    decay, no_decay = param_groups(atto, 0.05)
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.05, 0.0)
    assert all(param.ndim >= 2 for param in decay["params"])
    assert all(param.ndim <= 1 for param in no_decay["params"])
    no_decay_ids = {id(param) for param in no_decay["params"]}
    named = dict(atto.named_parameters())
    for name in ("stem.1.weight", "stem.1.bias", "stages.0.blocks.0.gamma", "head.norm.weight", "head.fc.bias"):
        assert id(named[name]) in no_decay_ids, name
    assert id(named["head.fc.weight"]) not in no_decay_ids
    torch.optim.AdamW(param_groups(atto, 0.05), lr=1e-3)  # the groups are what an optimizer accepts


def test_param_groups_drop_empty_groups(atto: nn.Module) -> None:
    apply_freeze(atto, count_units("convnext_atto"))
    assert param_groups(atto, 0.05) == []
    assert trainable_parameters(atto) == 0


# --------------------------------------------------------------------------------------------------------------
# Pretrained weights from local files


@pytest.fixture
def rgb_state_dict() -> dict[str, torch.Tensor]:
    """Stands in for ImageNet weights: a 3-channel convnext_atto with a 1000-class head."""
    torch.manual_seed(42)
    return timm.create_model("convnext_atto", in_chans=3).state_dict()


def _check_loaded(model: nn.Module, source: dict[str, torch.Tensor]) -> None:
    target = model.state_dict()
    assert torch.allclose(target["stem.0.weight"], source["stem.0.weight"].sum(dim=1, keepdim=True))
    for key, value in source.items():
        if key.startswith("head.fc.") or key == "stem.0.weight":
            continue
        assert torch.equal(target[key], value), key


@pytest.mark.parametrize(
    ("suffix", "wrap"),
    [
        (".safetensors", lambda sd: sd),
        (".pt", lambda sd: sd),
        (".pth", lambda sd: {"state_dict": {f"module.{k}": v for k, v in sd.items()}, "epoch": 3}),
        (".pt", lambda sd: {"model": sd, "optimizer_lr": 0.1}),
    ],
)
def test_rgb_weights_into_grayscale_model(tmp_path, caplog, rgb_state_dict, suffix, wrap) -> None:
    path = tmp_path / f"weights{suffix}"
    if suffix == ".safetensors":
        save_file(wrap(rgb_state_dict), str(path))
    else:
        torch.save(wrap(rgb_state_dict), path)

    with caplog.at_level(logging.INFO, logger="mammo_ray.model"):
        model = create_model("convnext_atto", pretrained=str(path))
    _check_loaded(model, rgb_state_dict)

    report = model.load_report
    assert report.skipped_head == ["head.fc.weight", "head.fc.bias"]
    assert [key for key, _, _ in report.shape_mismatches] == ["head.fc.weight", "head.fc.bias"]
    assert report.missing_keys == [] and report.unexpected_keys == [] and report.problems == []
    assert report.input_adaptation == "stem.0.weight: 3 → 1 channels (summed over input channels)"
    assert not [record for record in caplog.records if record.levelno >= logging.WARNING]
    assert any("head.fc.weight" in record.getMessage() for record in caplog.records if record.levelno == logging.INFO)


def test_attenuation_model_skips_one_logit_head(tmp_path) -> None:
    path = tmp_path / "one_logit.safetensors"
    save_file(create_model("convnext_atto").state_dict(), str(path))
    model = create_model("convnext_atto", attenuation=True, pretrained=str(path))
    assert model.load_report.skipped_head == ["head.fc.weight", "head.fc.bias"]
    assert model.load_report.problems == []


def test_same_architecture_reloads_everything(tmp_path, atto) -> None:
    path = tmp_path / "model.safetensors"
    save_file(atto.state_dict(), str(path))
    report = load_pretrained(create_model("convnext_atto"), path)
    assert report.skipped_head == [] and report.problems == [] and report.input_adaptation is None
    assert len(report.loaded) == len(atto.state_dict())


def test_other_mismatches_are_warnings(tmp_path, caplog, rgb_state_dict) -> None:
    state = dict(rgb_state_dict)
    del state["stages.1.blocks.0.gamma"]
    state["extra.weight"] = torch.zeros(2)
    state["stages.3.blocks.1.mlp.fc1.weight"] = torch.zeros(7, 7)
    path = tmp_path / "odd.pt"
    torch.save(state, path)
    with caplog.at_level(logging.INFO, logger="mammo_ray.model"):
        report = create_model("convnext_atto", pretrained=str(path)).load_report
    assert report.missing_keys == ["stages.1.blocks.0.gamma"]
    assert report.unexpected_keys == ["extra.weight"]
    assert ("stages.3.blocks.1.mlp.fc1.weight", (7, 7), (1280, 320, 1, 1)) in report.shape_mismatches
    warnings = " ".join(record.getMessage() for record in caplog.records if record.levelno == logging.WARNING)
    for key in ("stages.1.blocks.0.gamma", "extra.weight", "stages.3.blocks.1.mlp.fc1.weight"):
        assert key in warnings
    assert "head.fc" not in warnings


def test_pickled_objects_are_refused(tmp_path, rgb_state_dict) -> None:
    path = tmp_path / "with_args.pth"
    # Old training scripts store their argparse namespace beside the weights; unpickling it could run code.
    torch.save({"model": rgb_state_dict, "args": argparse.Namespace(lr=0.1)}, path)
    with pytest.raises(UnsafeCheckpointError, match="weights_only=True"):
        create_model("convnext_atto", pretrained=str(path))


def test_missing_file(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="not found"):
        create_model("convnext_atto", pretrained=str(tmp_path / "nope.safetensors"))


@pytest.mark.parametrize(
    "content",
    [{"epoch": 3}, {"weights": {"linear.weight": torch.zeros(2, 2)}}, [torch.zeros(1)]],
)
def test_files_without_usable_tensors(tmp_path, content) -> None:
    path = tmp_path / "bad.pt"
    torch.save(content, path)
    with pytest.raises(ValueError, match="no tensors|not a state dict|No tensor"):
        create_model("convnext_atto", pretrained=str(path))


def test_unrelated_weights_are_an_error(tmp_path) -> None:
    path = tmp_path / "linear.safetensors"
    save_file({"linear.weight": torch.zeros(2, 2)}, str(path))
    with pytest.raises(ValueError, match="No tensor .* fits convnext_atto"):
        create_model("convnext_atto", pretrained=str(path))


def test_weights_of_another_backbone_that_fit_only_the_head_bias_are_an_error(tmp_path) -> None:
    """Every 1-logit model has a head.fc.bias of shape [1]: that alone fitting passed as a load before."""
    path = tmp_path / "atto.safetensors"
    save_file({key: value.contiguous() for key, value in create_model("convnext_atto").state_dict().items()}, str(path))
    with pytest.raises(ValueError, match="No tensor .* fits convnext_femto's backbone"):
        create_model("convnext_femto", pretrained=str(path))
    assert create_model("convnext_atto", pretrained=str(path)).load_report.problems == []


@pytest.mark.parametrize("stem", ["patchify", "deep"])
def test_the_smallest_image_size_the_config_accepts_runs_through_both_stems(stem: str) -> None:
    """config refuses a side under 32 (data.image_size): ConvNeXt shrinks its input 32-fold. 32 must run; 31 leaves
    the patchify stem's last downsampling less than its 2×2 kernel."""
    from mammo_ray import config

    with pytest.raises(config.ConfigError, match=">= 32"):
        config.load("demo", {"data.image_size": [31, 32]})
    model = create_model("convnext_atto", stem=stem).eval()
    assert model(torch.zeros(1, 1, 32, 32)).shape == (1, 1)
    if stem == "patchify":
        with pytest.raises(RuntimeError):
            model(torch.zeros(1, 1, 31, 31))
