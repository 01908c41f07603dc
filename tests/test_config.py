"""Tests for mammo_ray.config: space-file lookup, loading, ``--set`` overrides, validation errors that name the key."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from mammo_ray import config
from mammo_ray.config import SPACES_DIR, ConfigError

SHIPPED = ("demo", "adamw", "sgd", "focal", "uncertainty")

# A small valid space file used as the base of the error cases.
BASE: dict[str, Any] = {
    "name": "base",
    "data": {"image_size": [64, 48]},
    "model": {"backbone": "convnext_atto", "dropout": 0.1},
    "train": {"epochs": 2, "batch_size": 8, "lr": 0.001, "sampler": "weighted"},
    "resources": {"num_workers": 1},
    "search": {"metric": "val_auc", "mode": "max", "num_samples": 2, "searcher": "optuna"},
    "space": {
        "train.lr": {"type": "loguniform", "low": 0.0001, "high": 0.01},
        "model.dropout": {"type": "uniform", "low": 0.0, "high": 0.3},
        "train.sampler": {"type": "choice", "values": ["weighted", "balanced"]},
        "model.freeze_units": {"type": "int", "low": 0, "high": 2},
    },
}


def _write(tmp_path: Path, data: Any, name: str = "space.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _with(section: str, key: str, value: Any) -> dict[str, Any]:
    data = copy.deepcopy(BASE)
    data.setdefault(section, {})[key] = value
    return data


# --------------------------------------------------------------------------------------------------
# resolve_space_path


@pytest.mark.parametrize("given", ["spaces/adamw.yaml", "adamw.yaml", "adamw", "search_spaces/adamw.yaml"])
def test_resolve_space_path_finds_shipped_file(given: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # nothing named like the argument exists here, so the lookup must be used
    assert config.resolve_space_path(given) == SPACES_DIR / "adamw.yaml"


def test_resolve_space_path_returns_an_existing_path_itself(tmp_path: Path) -> None:
    path = _write(tmp_path, BASE, "adamw.yaml")  # same file name as a shipped one: the real path wins
    assert config.resolve_space_path(path) == path
    assert config.resolve_space_path(str(path)) == path


@pytest.mark.parametrize("given", ["nosuch", "nosuch.yaml", "spaces/nosuch.yaml"])
def test_resolve_space_path_unknown_lists_available(
    given: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as err:
        config.resolve_space_path(given)
    message = str(err.value)
    assert "nosuch" in message
    for name in SHIPPED:
        assert name in message, f"the error should list the shipped space {name!r}: {message}"


# --------------------------------------------------------------------------------------------------
# load of the shipped files


@pytest.mark.parametrize("name", SHIPPED)
def test_load_every_shipped_space(name: str) -> None:
    cfg = config.load(name)
    assert cfg.name == name
    assert cfg.space, f"{name}.yaml should search something"
    # The core four dimensions of the card are searched by every shipped file.
    for key in ("train.lr", "model.dropout", "train.sampler", "model.freeze_units"):
        assert key in cfg.space, f"{name}.yaml does not search {key}"


def test_shipped_files_are_all_tested() -> None:
    assert sorted(p.stem for p in SPACES_DIR.glob("*.yaml")) == sorted(SHIPPED)


def test_load_without_name_uses_the_file_stem(tmp_path: Path) -> None:
    data = copy.deepcopy(BASE)
    del data["name"]
    assert config.load(_write(tmp_path, data, "my-sweep.yaml")).name == "my-sweep"


@pytest.mark.parametrize("text", ["", "# only a comment\n", "{}\n"])
def test_load_empty_file_is_refused(tmp_path: Path, text: str) -> None:
    """An empty file ran every default under its name, nothing searched, without a word."""
    path = tmp_path / "empty.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}: the file holds no settings"):
        config.load(path)


@pytest.mark.parametrize("text", ["- a\n- b\n", "just a string\n", "train: [unclosed\n"])
def test_load_rejects_non_mapping_or_bad_yaml(tmp_path: Path, text: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match="bad.yaml"):
        config.load(path)


@pytest.mark.parametrize(
    ("text", "key", "lines"),
    [
        # Two train sections: the first one's lr, epochs and sampler were dropped without a word.
        ("name: dup\ntrain:\n  lr: 0.001\n  epochs: 3\nmodel:\n  dropout: 0.1\ntrain:\n  batch_size: 8\n", "train", (2, 7)),
        ("train:\n  lr: 0.001\n  lr: 0.1\n", "lr", (2, 3)),
        ("space:\n  train.lr: {type: uniform, low: 0.1, high: 0.2}\n  train.lr: {type: choice, values: [1]}\n",
         "train.lr", (2, 3)),
        ("data: {image_size: [64, 48], image_size: [128, 96]}\n", "image_size", (1, 1)),
    ],
    ids=["two-train-sections", "lr-twice", "space-entry-twice", "flow-mapping"],
)  # fmt: skip
def test_a_key_given_twice_is_refused_naming_it_and_the_file(tmp_path: Path, text: str, key: str, lines) -> None:
    path = tmp_path / "dup.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        config.load(path)
    message = str(err.value)
    assert message.startswith(f"{path}: key {key!r} appears twice in one mapping (lines {lines[0]} and {lines[1]})")


def test_a_yaml_merge_key_may_still_be_overridden() -> None:
    """``<<: *anchor`` then a key of the anchor is YAML's way to override it, not a duplicate."""
    text = "base: &base {lr: 0.001, epochs: 3}\ntrain:\n  <<: *base\n  lr: 0.1\n"
    assert yaml.load(text, Loader=config.UniqueKeyLoader)["train"] == {"lr": 0.1, "epochs": 3}


def test_an_override_value_with_a_key_given_twice_is_refused() -> None:
    with pytest.raises(ConfigError, match="'low' appears twice"):
        config.parse_override("space.train.lr={type: uniform, low: 0.1, low: 0.2, high: 0.3}")


# --------------------------------------------------------------------------------------------------
# --set overrides


@pytest.mark.parametrize(
    ("text", "key", "value"),
    [
        ("train.lr=0.0003", "train.lr", 0.0003),
        ("train.lr=3.0e-4", "train.lr", 0.0003),
        ("train.epochs=5", "train.epochs", 5),
        ("data.image_size=[256,192]", "data.image_size", [256, 192]),
        ("data.image_size=[256, 192]", "data.image_size", [256, 192]),
        ("train.amp=false", "train.amp", False),
        ("train.amp=true", "train.amp", True),
        ("train.pos_weight=null", "train.pos_weight", None),
        ("train.pos_weight=", "train.pos_weight", None),
        ("train.sampler=balanced", "train.sampler", "balanced"),
        (" name = my run", "name", "my run"),
        ("data.train=a=b.parquet", "data.train", "a=b.parquet"),  # only the first '=' splits
    ],
)
def test_parse_override(text: str, key: str, value: Any) -> None:
    assert config.parse_override(text) == (key, value)


@pytest.mark.parametrize("text", ["train.lr", "", "train.lr=[1, 2"])
def test_parse_override_rejects(text: str) -> None:
    with pytest.raises(ConfigError):
        config.parse_override(text)


@pytest.mark.parametrize(
    ("overrides", "key", "value"),
    [
        (["train.lr=0.0003"], "train.lr", 0.0003),
        (["train.epochs=3"], "train.epochs", 3),
        (["train.lr=1"], "train.lr", 1.0),  # an int where a float is expected
        (["data.image_size=[256,192]"], "data.image_size", [256, 192]),
        (["train.amp=true"], "train.amp", True),
        (["train.pos_weight=3"], "train.pos_weight", 3.0),
        (["train.pos_weight=null"], "train.pos_weight", None),
        (["data.synthetic.patients=40"], "data.synthetic.patients", 40),
        (["name=other"], "name", "other"),
        ({"train.lr": 0.0003}, "train.lr", 0.0003),
    ],
)
def test_load_applies_overrides(tmp_path: Path, overrides: Any, key: str, value: Any) -> None:
    cfg = config.load(_write(tmp_path, BASE), overrides)
    assert cfg.get(key) == value
    assert type(cfg.get(key)) is type(value)


def test_later_override_wins(tmp_path: Path) -> None:
    assert config.load(_write(tmp_path, BASE), ["train.lr=0.1", "train.lr=0.2"]).train.lr == 0.2


def test_override_replaces_whole_space(tmp_path: Path) -> None:
    cfg = config.load(_write(tmp_path, BASE), ["space={train.lr: {type: uniform, low: 0.001, high: 0.002}}"])
    assert cfg.space == {"train.lr": {"type": "uniform", "low": 0.001, "high": 0.002}}


def test_override_one_space_entry(tmp_path: Path) -> None:
    # from_dict accepts keys starting with "space." on purpose, but _nest splits the dotted config key inside the
    # space ("space.train.lr" -> space -> train -> lr), and _merge then replaces the whole space with {"train": ...}.
    spec = {"type": "uniform", "low": 0.001, "high": 0.002}
    try:
        cfg = config.load(_write(tmp_path, BASE), {"space.train.lr": spec})
    except ConfigError as err:
        pytest.fail(f"BUG config.from_dict: '--set space.train.lr=...' should replace one space entry, got: {err}")
    assert cfg.space["train.lr"] == spec
    assert cfg.space["model.dropout"] == BASE["space"]["model.dropout"], "the other space entries must stay"


def test_space_entry_null_stops_searching_it(tmp_path: Path) -> None:
    cfg = config.load(_write(tmp_path, BASE), ["space.train.lr=null", "train.lr=0.02"])
    assert "train.lr" not in cfg.space and cfg.train.lr == 0.02
    assert cfg.space["model.dropout"] == BASE["space"]["model.dropout"]
    with pytest.raises(ConfigError, match="--set space.train.momentum=null: the space does not search train.momentum"):
        config.load(_write(tmp_path, BASE), ["space.train.momentum=null"])


@pytest.mark.parametrize(
    ("overrides", "refused"),
    [
        ({"train.lr": 0.02}, "train.lr"),
        ({"train.epochs": 3, "model.freeze_units": 1}, "model.freeze_units"),
        ({"train.epochs": 3}, None),  # not searched: it applies
        ({"space.train.lr": None, "train.lr": 0.02}, None),  # no longer searched
    ],
)
def test_a_set_on_a_searched_key_is_refused_naming_it_and_the_file(
    tmp_path: Path, overrides: dict[str, Any], refused: str | None
) -> None:
    path = _write(tmp_path, BASE)
    cfg = config.load(path, overrides)
    if refused is None:
        config.check_searched_overrides(cfg, overrides, str(path))
        return
    with pytest.raises(ConfigError) as err:
        config.check_searched_overrides(cfg, overrides, str(path))
    message = str(err.value)
    assert message.startswith(f"--set {refused}={overrides[refused]} would have no effect: {path} searches {refused}")
    assert f"remove space.{refused} from the file or add --set space.{refused}=null" in message


def test_override_scientific_notation(tmp_path: Path) -> None:
    # The brief's and parse_override's own docstring example. PyYAML follows YAML 1.1, which reads "3e-4" (no dot)
    # as a string, so the float field refuses it.
    try:
        cfg = config.load(_write(tmp_path, BASE), ["train.lr=3e-4"])
    except ConfigError as err:
        pytest.fail(f"BUG config.parse_override: '--set train.lr=3e-4' must give 0.0003, got: {err}")
    assert cfg.train.lr == pytest.approx(3e-4)


def test_space_file_scientific_notation(tmp_path: Path) -> None:
    text = yaml.safe_dump(BASE, sort_keys=False) + "\n"
    text = text.replace("lr: 0.001", "lr: 1e-3")
    path = tmp_path / "sci.yaml"
    path.write_text(text)
    try:
        cfg = config.load(path)
    except ConfigError as err:
        pytest.fail(f"BUG config.load: 'lr: 1e-3' in a space file must be a number, got: {err}")
    assert cfg.train.lr == pytest.approx(1e-3)


# --------------------------------------------------------------------------------------------------
# Errors that name the key


@pytest.mark.parametrize(
    ("data", "overrides", "names"),
    [
        # Unknown keys, with a did-you-mean.
        (_with("train", "learning_rate", 0.1), None, ["train.learning_rate", "Known keys", "lr"]),
        (_with("model", "dropuot", 0.1), None, ["model.dropuot", "did you mean", "dropout"]),
        (_with("data", "synthetic", {"patiens": 10}), None, ["data.synthetic.patiens", "did you mean", "patients"]),
        (BASE, ["train.lrr=0.1"], ["train.lrr", "train.lr"]),
        (BASE, ["model.dropot=0.1"], ["model.dropot", "model.dropout"]),
        # Unknown section.
        ({**BASE, "trian": {"lr": 0.1}}, None, ["trian", "train"]),
        ({**BASE, "optimizer": {"lr": 0.1}}, None, ["optimizer"]),
        ({**BASE, "train": 5}, None, ["train"]),
        # Wrong types.
        (_with("train", "lr", "fast"), None, ["train.lr", "number"]),
        (BASE, ["train.lr=fast"], ["train.lr", "number"]),
        (BASE, ["train.lr=null"], ["train.lr"]),
        (BASE, ["train.lr=.nan"], ["train.lr", "finite"]),
        (BASE, ["train.epochs=2.5"], ["train.epochs", "integer"]),
        (BASE, ["train.epochs=true"], ["train.epochs", "integer"]),
        (BASE, ["train.amp=yes please"], ["train.amp", "true or false"]),
        (BASE, ["train.sampler=1"], ["train.sampler", "string"]),
        (BASE, ["data.image_size=256"], ["data.image_size", "list"]),
        (BASE, ["data.image_size=[256, x]"], ["data.image_size[1]"]),
        # Out of range or not one of the choices.
        (BASE, ["model.dropout=1.5"], ["model.dropout", "1.5"]),
        (BASE, ["model.dropout=-0.1"], ["model.dropout"]),
        (BASE, ["train.sampler=foo"], ["train.sampler", "foo", "weighted"]),
        (BASE, ["train.optimizer=lamb"], ["train.optimizer", "lamb"]),
        (BASE, ["model.stem=overlap"], ["model.stem", "overlap", "deep"]),
        (BASE, ["model.norm=group"], ["model.norm", "group", "batch"]),
        (BASE, ["model.norm=batch", "model.pretrained=timm:fb_in1k"], ["model.pretrained", "model.norm=layer"]),
        (BASE, ["train.epochs=0"], ["train.epochs"]),
        (BASE, ["train.batch_size=1"], ["train.batch_size"]),
        (BASE, ["train.lr=-0.001"], ["train.lr"]),
        (BASE, ["train.positive_fraction=1.2"], ["train.positive_fraction"]),
        (BASE, ["resources.num_workers=0"], ["resources.num_workers"]),
        (BASE, ["resources.torch_threads=-1"], ["resources.torch_threads"]),
        (BASE, ["data.image_size=[8, 8]"], ["data.image_size"]),
        (BASE, ["data.image_size=[40, 30]"], ["data.image_size", ">= 32", "[40, 30]"]),
        (BASE, ["data.image_size=[64, 48, 3]"], ["data.image_size"]),
        (BASE, ["data.synthetic.split=[0.5, 0.5, 0.5]"], ["data.synthetic.split"]),
        # synth refused these only once Ray was up and the sweep was generating its data.
        (BASE, ["data.synthetic.enabled=true", "data.synthetic.size=[32, 32]"], ["data.synthetic.size", "[64, 48]"]),
        (BASE, ["data.synthetic.enabled=true", "data.synthetic.size=[512]"], ["data.synthetic.size", "[512]"]),
        (BASE, ["model.attenuation=true", "train.loss=focal"], ["model.attenuation", "train.loss"]),
    ],
)
def test_errors_name_the_key(tmp_path: Path, data: dict, overrides: list[str] | None, names: list[str]) -> None:
    with pytest.raises(ConfigError) as err:
        config.load(_write(tmp_path, data), overrides)
    for name in names:
        assert name in str(err.value), f"{name!r} missing from the error: {err.value}"


@pytest.mark.parametrize(
    ("section", "key", "suggestion"),
    [
        ("model", "dropuot", "model.dropout"),
        ("train", "optimiser", "train.optimizer"),
        ("data", "use_cach", "data.use_cache"),
    ],
)
def test_unknown_key_did_you_mean_names_the_dotted_key(tmp_path: Path, section: str, key: str, suggestion: str) -> None:
    with pytest.raises(ConfigError) as err:
        config.load(_write(tmp_path, _with(section, key, 1)))
    assert f"did you mean {suggestion!r}" in str(err.value), (
        f"BUG config._build: the did-you-mean should quote the whole dotted key {suggestion!r}; got: {err.value}"
    )


def _space(key: str, spec: Any) -> dict[str, Any]:
    data = copy.deepcopy(BASE)
    data["space"] = {key: spec}
    return data


@pytest.mark.parametrize(
    ("data", "names"),
    [
        (_space("train.lr", {"type": "gaussian", "low": 0.1, "high": 0.2}), ["space.train.lr", "gaussian"]),
        (_space("train.lr", {"low": 0.1, "high": 0.2}), ["space.train.lr", "type"]),
        (_space("train.lr", [0.1, 0.2]), ["space.train.lr"]),
        (_space("train.lr", {"type": "uniform", "low": 0.2, "high": 0.1}), ["space.train.lr", "low"]),
        (_space("train.lr", {"type": "uniform", "low": 0.1, "high": 0.1}), ["space.train.lr", "low"]),
        (_space("train.lr", {"type": "uniform", "low": 0.1}), ["space.train.lr", "high"]),
        (_space("train.lr", {"type": "uniform", "low": "a", "high": 0.1}), ["space.train.lr", "numbers"]),
        (_space("train.lr", {"type": "loguniform", "low": 0.0, "high": 0.1}), ["space.train.lr", "loguniform"]),
        (_space("train.lr", {"type": "loguniform", "low": -1.0, "high": 0.1}), ["space.train.lr", "loguniform"]),
        (_space("train.lr", {"type": "uniform", "low": 0.1, "high": 0.2, "log": True}), ["space.train.lr", "log"]),
        (_space("model.freeze_units", {"type": "int", "low": 0.5, "high": 3}), ["space.model.freeze_units", "int"]),
        (_space("model.freeze_units", {"type": "int", "low": 0, "high": 2.5}), ["space.model.freeze_units", "int"]),
        (_space("train.sampler", {"type": "choice", "values": []}), ["space.train.sampler", "values"]),
        (_space("train.sampler", {"type": "choice"}), ["space.train.sampler", "values"]),
        (_space("train.sampler", {"type": "choice", "values": "weighted"}), ["space.train.sampler", "values"]),
        (_space("train.sampler", {"type": "choice", "values": ["weighted", "foo"]}), ["train.sampler", "foo"]),
        (_space("model.dropout", {"type": "uniform", "low": 0.0, "high": 1.5}), ["model.dropout", "1.5"]),
        (_space("train.learning_rate", {"type": "loguniform", "low": 0.1, "high": 1}), ["train.learning_rate"]),
        (_space("train", {"type": "choice", "values": [1]}), ["space.train"]),
        (_space("search.num_samples", {"type": "int", "low": 1, "high": 4}), ["search.num_samples"]),
        (_space("resources.num_workers", {"type": "int", "low": 1, "high": 4}), ["resources.num_workers"]),
        (_space("name", {"type": "choice", "values": ["a", "b"]}), ["name"]),
        (_space("train.sampler", {"type": "grid", "values": ["weighted", "simple"]}), ["space.train.sampler", "grid"]),
        # step: positive, bounds on its grid, integral for int, none on a log scale (Optuna would drop it)
        (_space("train.lr", {"type": "loguniform", "low": 1e-4, "high": 1e-2, "step": 1e-4}), ["train.lr", "step"]),
        (_space("model.dropout", {"type": "uniform", "low": 0.0, "high": 0.5, "step": 0}), ["model.dropout", "step"]),
        (_space("model.dropout", {"type": "uniform", "low": 0.0, "high": 0.5, "step": "x"}), ["dropout", "step"]),
        (_space("model.dropout", {"type": "uniform", "low": 0.05, "high": 0.5, "step": 0.1}), ["multiples", "0.05"]),
        (_space("model.freeze_units", {"type": "int", "low": 0, "high": 6, "step": 1.5}), ["freeze_units", "step"]),
        (_space("model.freeze_units", {"type": "int", "low": 1, "high": 6, "step": 2}), ["freeze_units", "multiples"]),
    ],
)
def test_bad_space_names_the_key(tmp_path: Path, data: dict, names: list[str]) -> None:
    with pytest.raises(ConfigError) as err:
        config.load(_write(tmp_path, data))
    for name in names:
        assert name in str(err.value), f"{name!r} missing from the error: {err.value}"


@pytest.mark.parametrize("key", ["search.num_samples", "resources.num_workers", "name"])
def test_space_key_that_shapes_the_sweep_says_so(tmp_path: Path, key: str) -> None:
    # It said "not a searchable config key (did you mean 'resources.num_workers'?)" of resources.num_workers.
    with pytest.raises(ConfigError, match="cannot be searched") as err:
        config.load(_write(tmp_path, _space(key, {"type": "choice", "values": [1, 2]})))
    assert "did you mean" not in str(err.value)


@pytest.mark.parametrize(
    ("key", "spec", "allowed"),
    [
        ("model.dropout", {"type": "uniform", "low": 0.0, "high": 0.5, "step": 0.1}, {0.0, 0.1, 0.2, 0.3, 0.4, 0.5}),
        ("model.freeze_units", {"type": "int", "low": 0, "high": 6, "step": 2}, {0, 2, 4, 6}),
        ("model.freeze_units", {"type": "int", "low": 0, "high": 3, "step": 1}, {0, 1, 2, 3}),
    ],
)
@pytest.mark.parametrize("searcher", ["optuna", "random"])
def test_space_step_is_sampled_on_its_grid(key: str, spec: dict, allowed: set, searcher: str) -> None:
    # A space file's step passed validation and was then dropped: int draws with step 5 gave 8, 1, 7, ...
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    from mammo_ray import tune

    domain = tune.tune_space({key: dict(spec)})[key]
    if searcher == "random":
        drawn = {domain.sample() for _ in range(300)}
    else:
        search = OptunaSearch(
            space={key: domain}, metric="m", mode="max", sampler=optuna.samplers.RandomSampler(seed=0)
        )
        drawn = set()
        for i in range(150):
            drawn.add(search.suggest(f"t{i}")[key])
            search.on_trial_complete(f"t{i}", {"m": 0.0})
    drawn = {round(v, 9) for v in drawn}
    assert drawn == {round(v, 9) for v in allowed}


def test_a_misspelt_space_key_is_not_pointed_at_a_key_that_cannot_be_searched(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        config.load(_write(tmp_path, _space("resources.num_worker", {"type": "int", "low": 1, "high": 2})))
    assert "resources.num_workers" not in str(err.value)


def test_setting_a_retired_key_says_it_is_gone() -> None:
    with pytest.raises(ConfigError, match="train.log_every_n_steps no longer exists"):
        config.load("demo", {"train.log_every_n_steps": 5})


def test_space_unknown_key_suggests(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="did you mean 'train.lr'"):
        config.load(_write(tmp_path, _space("train.lrr", {"type": "loguniform", "low": 0.001, "high": 0.1})))


@pytest.mark.parametrize(
    "spec",
    [
        {"type": "grid", "values": ["weighted", "simple"]},
        {"type": "choice", "values": ["balanced"]},  # a one-value choice is degenerate but legal
    ],
)
def test_space_accepted_with_random_searcher(tmp_path: Path, spec: dict) -> None:
    data = _space("train.sampler", spec)
    data["search"]["searcher"] = "random"
    assert config.load(_write(tmp_path, data)).space["train.sampler"] == spec


@pytest.mark.parametrize(
    "spec",
    [
        {"type": "loguniform", "low": 1, "high": 10},  # ints as float bounds
        {"type": "uniform", "low": 0.0, "high": 0.5, "step": 0.1},
        {"type": "int", "low": 0.0, "high": 4.0},  # integral floats are fine for int
    ],
)
def test_space_accepted_bounds(tmp_path: Path, spec: dict) -> None:
    key = "model.freeze_units" if spec["type"] == "int" else "train.lr"
    assert config.load(_write(tmp_path, _space(key, spec))).space[key] == spec


# --------------------------------------------------------------------------------------------------
# with_params


@pytest.mark.parametrize(
    "params",
    [
        {"train.lr": 0.005},
        {"train.lr": 0.005, "model.dropout": 0.25, "train.sampler": "balanced", "model.freeze_units": 2},
        {"model.freeze_units": 2.0},  # an integral float from a sampler becomes an int
        {"data.synthetic.patients": 10},
        {},
    ],
)
def test_with_params_applies_dotted_keys(tmp_path: Path, params: dict) -> None:
    cfg = config.load(_write(tmp_path, BASE))
    before = cfg.to_dict()
    trial = config.with_params(cfg, params)
    for key, value in params.items():
        assert trial.get(key) == value
    assert cfg.to_dict() == before, "with_params must not change the config it was given"
    assert trial.name == cfg.name
    assert trial.space == cfg.space
    assert type(trial.model.freeze_units) is int


@pytest.mark.parametrize(
    ("params", "names"),
    [
        ({"model.dropout": 1.5}, ["model.dropout"]),
        ({"train.sampler": "foo"}, ["train.sampler"]),
        ({"train.lrr": 0.1}, ["train.lrr", "train.lr"]),
        ({"model.freeze_units": 2.5}, ["model.freeze_units"]),
        ({"train.lr": "fast"}, ["train.lr"]),
    ],
)
def test_with_params_validates(tmp_path: Path, params: dict, names: list[str]) -> None:
    cfg = config.load(_write(tmp_path, BASE))
    with pytest.raises(ConfigError) as err:
        config.with_params(cfg, params)
    for name in names:
        assert name in str(err.value), f"{name!r} missing from the error: {err.value}"


# --------------------------------------------------------------------------------------------------
# dump / save


@pytest.mark.parametrize("name", SHIPPED)
def test_save_then_load_round_trips(tmp_path: Path, name: str) -> None:
    cfg = config.load(name, ["train.grad_clip=2.5", "data.train=manifests/train.parquet"])
    path = tmp_path / "out" / "config.yaml"  # the folder does not exist yet
    config.save(cfg, path)
    assert config.load(path).to_dict() == cfg.to_dict()
    assert yaml.safe_load(config.dump(cfg)) == cfg.to_dict()


def test_save_is_atomic_and_overwrites(tmp_path: Path) -> None:
    cfg = config.load(_write(tmp_path, BASE))
    target = tmp_path / "saved" / "config.yaml"
    config.save(cfg, target)
    config.save(config.with_params(cfg, {"train.lr": 0.002}), target)
    assert [p.name for p in target.parent.iterdir()] == ["config.yaml"], "a temporary file was left behind"
    assert config.load(target).train.lr == 0.002


def test_save_leaves_no_temp_file_when_writing_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = config.load(_write(tmp_path, BASE))
    target = tmp_path / "saved" / "config.yaml"
    config.save(cfg, target)
    old = target.read_text()

    def broken_dump(_: config.Config) -> str:
        return 42  # type: ignore[return-value]  # write_text refuses a non-string half-way through the write

    monkeypatch.setattr(config, "dump", broken_dump)
    with pytest.raises(TypeError):
        config.save(cfg, target)
    assert [p.name for p in target.parent.iterdir()] == ["config.yaml"]
    assert target.read_text() == old, "a failed save must leave the previous file intact"


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (
            {"search.metric": "val_acc"},
            "search.metric 'val_acc' is not a metric that runs report; choose one of val_auc",
        ),
        ({"search.mode": "min"}, "search.mode min would select the worst val_auc; val_auc is better when higher"),
        ({"search.metric": "val_loss"}, "search.mode max would select the worst val_loss"),
        ({"search.metric": "val_ece", "search.mode": "max"}, "val_ece is better when lower"),
    ],
)
def test_search_metric_must_be_reported_and_its_mode_must_pick_the_best(overrides: dict, needle: str) -> None:
    """Before, an unknown metric crashed the sweep at the first report (Tune's ValueError, after Ray started), and
    mode: min on val_auc would have exported the worst model."""
    with pytest.raises(ConfigError, match=re.escape(needle)):
        config.load("demo", overrides)


@pytest.mark.parametrize(("metric", "mode"), list(config.SELECTION_METRICS.items()))
def test_every_selection_metric_loads_with_its_direction(metric: str, mode: str) -> None:
    assert config.load("demo", {"search.metric": metric, "search.mode": mode}).search.metric == metric


def test_a_config_saved_by_an_earlier_version_still_loads(tmp_path: Path) -> None:
    # Every bundle and trial folder written before 2026-12-07 holds train.log_every_n_steps; removing the key made
    # predict refuse those bundles and a resumed sweep's trials fail.
    import yaml

    saved = yaml.safe_load(config.dump(config.load("demo")))
    saved["train"]["log_every_n_steps"] = 0
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(saved))
    assert config.load(path) == config.load("demo")
    assert "log_every_n_steps" not in config.dump(config.load(path))


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        ({"train.loss": "focal", "train.pos_weight": 5.0}, "pos_weight weights BCE only"),
        ({"train.pos_weight": 5.0, "space.train.loss": {"type": "choice", "values": ["bce", "focal"]}}, "focal"),
        ({"train.warmup_epochs": 12, "train.epochs": 8}, "never reach train.lr"),
        ({"train.mc_dropout_samples": 5, "model.dropout": 0.0, "space.model.dropout": None}, "needs model.dropout"),
        ({"resources.gpus_per_worker": 0.5, "resources.num_workers": 2}, "NCCL"),
    ],
)
def test_settings_that_would_be_ignored_or_meaningless_are_refused(overrides: dict, needle: str) -> None:
    data = yaml.safe_load(config.dump(config.load("demo")))
    data["space"].pop("model.dropout")
    for key, value in overrides.items():
        if value is None:
            continue
        if key.startswith("space."):
            data["space"][key.removeprefix("space.")] = value
            continue
        section, name = key.split(".")
        data[section][name] = value
    with pytest.raises(ConfigError, match=needle):
        config.from_dict(data)


def test_a_searched_dropout_may_reach_zero_with_mc_dropout() -> None:
    cfg = config.load("demo", {"train.mc_dropout_samples": 3, "model.dropout": 0.0})  # the space searches dropout
    assert cfg.train.mc_dropout_samples == 3


def test_the_smallest_synthetic_size_is_synths():
    from mammo_ray import synth

    assert config.SYNTH_MIN_SIZE == synth.MIN_SIZE
    config.load("demo", ["data.synthetic.size=[64, 48]"])  # synth's smallest is accepted
