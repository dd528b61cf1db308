"""Training config: defaults, YAML deltas, --set overrides, clear errors, versioning, and every preset."""

from __future__ import annotations

from pathlib import Path

import pytest

from training import config as config_module
from training.config import (
    CONFIG_VERSION,
    ConfigError,
    TrainConfig,
    config_from_dict,
    config_to_dict,
    config_to_yaml,
    diff_configs,
    load_config,
)

# Keys a preset may state although they equal the default, because they say what the preset is.
IDENTITY_KEYS = ("data.layout", "model.name", "model.spatial_dims")
PRESETS = sorted((Path(__file__).parents[2] / "training" / "configs").glob("*.yaml"))


def write(tmp_path: Path, text: str, name: str = "c.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_defaults_and_round_trip():
    cfg = load_config(None)
    assert cfg == TrainConfig()
    assert cfg.train.optimizer == "sgd" and cfg.train.lr == 0.01 and cfg.train.momentum == 0.99
    assert cfg.train.scheduler == "poly" and cfg.train.grad_clip == 12.0
    assert cfg.loss.ccdc.temperature == 0.5 and cfg.loss.ccdc.strong_threshold == 0.97
    assert config_from_dict(config_to_dict(cfg)) == cfg


def test_yaml_delta_and_overrides(tmp_path):
    path = write(
        tmp_path,
        "data: {root: /data/x, layout: acdc}\n"
        "model: {spatial_dims: 2, uafr: {enabled: true}}\n"
        "train: {epochs: 5, patch_size: [64, 64]}\n",
    )
    cfg = load_config(
        path,
        [
            "train.patch_size=[16,32]",
            "train.lr=1e-3",
            "loss.pdcr.enabled=true",
            "loss.pdcr.layers={encoder2: 16}",
            "data.augmentation.flip_prob=0.0",
            "model.features=[8,16,32]",
        ],
    )
    assert cfg.data.root == "/data/x" and cfg.data.layout == "acdc"
    assert cfg.model.spatial_dims == 2 and cfg.model.uafr.enabled
    assert cfg.train.epochs == 5 and cfg.train.patch_size == (16, 32)
    assert cfg.train.lr == pytest.approx(1e-3) and isinstance(cfg.train.lr, float)
    assert cfg.loss.pdcr.enabled and cfg.loss.pdcr.layers == {"encoder2": 16}
    assert cfg.data.augmentation.flip_prob == 0.0
    assert cfg.model.features == (8, 16, 32)
    # untouched keys keep their defaults
    assert cfg.train.batch_size == TrainConfig().train.batch_size
    assert set(diff_configs(TrainConfig(), cfg)) >= {"train.epochs", "model.features", "loss.pdcr.layers"}


def test_resolved_yaml_reads_back_equal(tmp_path):
    cfg = load_config(
        None, ["train.patch_size=[8,8,8]", "loss.ccdc.enabled=true", "data.target_spacing=[1,2,3]"]
    )
    path = write(tmp_path, config_to_yaml(cfg), "config.yaml")
    assert load_config(path) == cfg


@pytest.mark.parametrize(
    ("text", "overrides", "expected"),
    [
        ("trian: {epochs: 3}\n", [], r"unknown key 'trian'; valid keys under the top level: data, model"),
        ("train: {epoch: 3}\n", [], r"unknown key 'train.epoch'.*valid keys under train: epochs"),
        ("", ["loss.pdcr.tempreature=1"], r"unknown key 'loss.pdcr.tempreature'.*temperature"),
        ("", ["data.augmentation.flipp=1"], r"unknown key 'data.augmentation.flipp'"),
    ],
)
def test_unknown_keys_name_the_key_and_the_valid_ones(tmp_path, text, overrides, expected):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError, match=expected) as info:
        load_config(path, overrides)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["train.epochs=ten"], r"train.epochs must be an integer, got 'ten'"),
        (["train.epochs=true"], r"train.epochs must be an integer"),
        (["train.amp=1"], r"train.amp must be true or false"),
        (["train.optimizer=rmsprop"], r"train.optimizer must be one of sgd, adam, adamw, got 'rmsprop'"),
        (["model.spatial_dims=4"], r"model.spatial_dims must be one of 2, 3"),
        (["train.patch_size=[64,x]"], r"train.patch_size\[1\] must be an integer"),
        (["train.lr=.nan"], r"train.lr must be a number"),
        (["data.layout=nifti"], r"data.layout must be one of msd, folder2d, acdc"),
        (["data.fraction=2.0"], r"data: fraction must be in \(0, 1\]"),
        (["train.epochs=0"], r"train: epochs must be >= 1, got 0"),
        (["train.val_overlap=1.0"], r"train: val_overlap must be in \[0, 1\)"),
        (["train=3"], r"train must be a mapping"),
        (["train.epochs.x=3"], r"train.epochs must be an integer, got \{'x': 3\}"),
        (["train.lr=abc"], r"train.lr must be a number, got 'abc'"),
    ],
)
def test_bad_values_are_clear_errors(overrides, expected):
    with pytest.raises(ConfigError, match=expected):
        load_config(None, overrides)


@pytest.mark.parametrize("item", ["train.epochs", "=3", ""])
def test_malformed_set(item):
    with pytest.raises(ConfigError, match="expected key=value"):
        load_config(None, [item])


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match=r"not valid YAML \(line \d+\)"):
        load_config(write(tmp_path, "train:\n  epochs: [1,\n"))
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(write(tmp_path, "- 1\n- 2\n"))


def test_config_version(monkeypatch):
    with pytest.raises(ConfigError, match=f"config_version {CONFIG_VERSION + 1} is newer"):
        config_from_dict({"config_version": CONFIG_VERSION + 1})
    with pytest.raises(ConfigError, match="config_version 0 cannot be migrated"):
        config_from_dict({"config_version": 0})

    # a registered migration upgrades an old resolved config (here: a key renamed between versions)
    def rename(data):
        data = dict(data)
        data["train"] = {"epochs": data.pop("train_section")["n_epochs"]}
        return data

    monkeypatch.setitem(config_module._MIGRATIONS, 0, rename)
    cfg = config_from_dict({"config_version": 0, "train_section": {"n_epochs": 7}})
    assert cfg.train.epochs == 7 and cfg.config_version == CONFIG_VERSION


def _delta_leaves(delta: dict, defaults: dict, prefix: str = ""):
    for key, value in delta.items():
        default = defaults[key]
        # a config section recurses; a mapping setting (init.weight_mix_layers: {} by default) is one leaf
        if isinstance(value, dict) and isinstance(default, dict) and set(value) <= set(default):
            yield from _delta_leaves(value, default, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value, default


@pytest.mark.parametrize("path", PRESETS, ids=[p.stem for p in PRESETS])
def test_preset_loads_states_its_source_and_holds_only_deltas(path):
    import yaml

    cfg = load_config(path)
    text = path.read_text(encoding="utf-8")
    assert text.startswith("#")
    if not path.stem.startswith(
        ("quickstart", "default-", "finetune-", "brain-tissue-3d-prompts")
    ):  # recipes of ours, not paper settings
        assert "Source: paper" in text and "Table" in text
    defaults = config_to_dict(TrainConfig())
    delta = yaml.safe_load(text)
    for key, value, default in _delta_leaves(delta, defaults):
        if key in IDENTITY_KEYS:  # say what the preset is, even where that is the default
            continue
        assert value != default, f"{path.name}: {key} repeats the default {default!r}"
    assert cfg.output.dir.startswith("runs/")


def test_there_is_a_preset_for_every_paper_setting():
    names = {p.stem for p in PRESETS}
    assert names >= {
        "isic2016-deeplabv3plus-pdcr",
        "msd-task02-heart-unet3d-pdcr",
        "msd-task05-prostate-unet3d-pdcr",
        "acdc-unet2d-ccdc",
        "mscmrseg-unet2d-ccdc",
        "chaos-unet2d-ccdc",
        "quickstart-2d",
        "quickstart-3d",
    }
    ccdc = load_config(PRESETS[[p.stem for p in PRESETS].index("acdc-unet2d-ccdc")])
    assert (ccdc.train.batch_size, ccdc.train.patch_size) == (56, (256, 224))
    assert ccdc.loss.ccdc.enabled and (ccdc.loss.ce_weight, ccdc.loss.dice_weight, ccdc.loss.ccdc.weight) == (
        1,
        1,
        1,
    )


@pytest.mark.slow
@pytest.mark.parametrize("path", PRESETS, ids=[p.stem for p in PRESETS])
def test_preset_builds_its_model_and_losses(path):
    """Tap names, UAFR sites, strides and patch sizes of every preset fit the real network."""
    import torch

    from training.building import build_losses, build_model, resolve_patch_size

    cfg = load_config(path)
    torch.manual_seed(0)
    model = build_model(cfg, in_channels=2, num_classes=4)
    _, pdcr, ccdc = build_losses(cfg, model, num_classes=4)
    assert (pdcr is not None) == cfg.loss.pdcr.enabled and (ccdc is not None) == cfg.loss.ccdc.enabled
    assert bool(model.uncertainty_names) == cfg.model.uafr.enabled
    assert resolve_patch_size(cfg, None, model.divisor) == cfg.train.patch_size
