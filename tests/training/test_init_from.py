"""medcl-train --init-from: start from a checkpoint or a bundled model's weights and fine-tune.

Covers: a matching network loads every weight (the run's first step barely moves them at lr 1e-12) and the
run records where it started (config.yaml, train.log, the spec); a network of another shape is refused with
one line per layer that differs; a dataset with other classes is refused unless init.reinit_heads, which
restarts only the output heads; the bundled weights files load under their manifest SHA-256 and reproduce
their ONNX models in eval mode.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from napari_medcl.onnx_session import MODELS_DIR, bundled_models
from tests.dataset_factory import make_msd_dataset
from training.cli import train_main
from training.config import load_config

pytestmark = pytest.mark.torch

FAST = [
    "data.num_workers=0",
    "data.augmentation.enabled=false",
    "data.val_fraction=0.34",
    "data.crop_nonzero=false",
    "train.device=cpu",
    "train.epochs=1",
    "train.iterations_per_epoch=1",
    "train.batch_size=1",
    "train.patch_size=[8,16,16]",
    "model.features=[8,16,32]",
    "model.uafr.enabled=true",
]
# So small a step that every weight of a fine-tuned run stays where it started (to 1e-6).
FROZEN = ["train.optimizer=sgd", "train.lr=1e-12", "train.momentum=0.0"]


def train(root: Path, out: Path, *extra: str, init_from: str | None = None) -> int:
    argv = [str(root / "run.yaml")]
    for item in (*FAST, f"data.root={root}", f"output.dir={out}", *extra):
        argv += ["--set", item]
    if init_from is not None:
        argv += ["--init-from", init_from]
    return train_main(argv)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 3-class dataset, a 2-class one, and a finished tiny run on the first (its checkpoint_best.pt)."""
    base = tmp_path_factory.mktemp("init")
    three = make_msd_dataset(base / "three", n_cases=3, shape=(8, 16, 16), num_classes=3)
    two = make_msd_dataset(base / "two", n_cases=3, shape=(8, 16, 16), num_classes=2, seed=1)
    for root in (three, two):
        (root / "run.yaml").write_text("{}\n")
    assert train(three, base / "first") == 0
    return base, three, two, base / "first" / "checkpoint_best.pt"


def model_weights(path: Path) -> dict[str, torch.Tensor]:
    """The learned tensors of a checkpoint (BatchNorm statistics move with every training step)."""
    state = torch.load(path, map_location="cpu", weights_only=True)["model"]
    return {
        k: v
        for k, v in state.items()
        if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))
    }


def test_matching_network_starts_from_the_checkpoint_and_records_it(trained, one_torch_thread):
    base, three, _, checkpoint = trained
    out = base / "tuned"
    assert train(three, out, *FROZEN, init_from=str(checkpoint)) == 0
    start, tuned = model_weights(checkpoint), model_weights(out / "checkpoint_last.pt")
    assert start.keys() == tuned.keys()
    for key in start:
        assert torch.allclose(start[key].float(), tuned[key].float(), atol=1e-6), key
    assert load_config(out / "config.yaml").init.from_checkpoint == str(checkpoint)
    state = torch.load(out / "checkpoint_last.pt", map_location="cpu", weights_only=True)
    assert state["config"]["init"] == {
        "from_checkpoint": str(checkpoint),
        "reinit_heads": False,
        "replay": "auto",
        "replay_fraction": 0.5,
        "anchor_weight": 0.0,
        "weight_mix": 1.0,
        "weight_mix_layers": {},
        "train_only": [],
    }
    # auto replays the training data of bundled models only: a checkpoint file starts without replay
    assert "replay: off (auto replays only for bundled models" in (out / "train.log").read_text()
    import hashlib

    record = state["spec"]["training"]["init_from"]
    assert record["sha256"] == hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    assert record["file"] == "checkpoint_best.pt"
    log = (out / "train.log").read_text(encoding="utf-8")
    assert "init: weights from" in log and "tensors loaded" in log


def test_a_network_of_another_shape_names_each_layer_that_differs(trained, capsys):
    base, three, _, checkpoint = trained
    code = train(three, base / "wide", "model.features=[8,16,24]", init_from=str(checkpoint))
    assert code == 1
    err = capsys.readouterr().err
    assert "layer(s) differ from this config's network" in err
    # one plain line per layer, each with both shapes
    assert "encoder.2.0.0.weight: checkpoint [32, 16, 3, 3, 3], this network [24, 16, 3, 3, 3]" in err
    assert "Traceback" not in err
    assert not (base / "wide" / "checkpoint_last.pt").exists()


def test_other_classes_need_reinit_heads_which_restarts_only_the_heads(trained, capsys, one_torch_thread):
    base, _, two, checkpoint = trained
    assert train(two, base / "refused", init_from=str(checkpoint)) == 1
    err = capsys.readouterr().err
    assert "differ from the dataset's (background, class1)" in err and "init.reinit_heads: true" in err

    out = base / "new-classes"
    assert train(two, out, *FROZEN, "init.reinit_heads=true", init_from=str(checkpoint)) == 0
    start, tuned = model_weights(checkpoint), model_weights(out / "checkpoint_last.pt")
    heads = [k for k in tuned if k.startswith(("head.", "deep_supervision_heads."))]
    assert heads and all(tuned[k].shape[0] == 2 and start[k].shape[0] == 3 for k in heads)
    for key in tuned:
        if key not in heads:
            assert torch.allclose(start[key].float(), tuned[key].float(), atol=1e-6), key
    assert "output heads started afresh" in (out / "train.log").read_text(encoding="utf-8")


def test_unknown_name_and_foreign_file_are_one_line(trained, tmp_path, capsys):
    _, three, _, _ = trained
    assert train(three, tmp_path / "a", init_from="no-such-model") == 1
    assert "no bundled model named 'no-such-model'" in capsys.readouterr().err
    foreign = tmp_path / "other.pt"
    torch.save({"weights": [torch.zeros(2)]}, foreign)
    assert train(three, tmp_path / "b", init_from=str(foreign)) == 1
    err = capsys.readouterr().err
    assert (
        "not a napari-medcl checkpoint, weights file or network state dict" in err and "Traceback" not in err
    )


@pytest.mark.slow
@pytest.mark.parametrize("name", [m["name"] for m in bundled_models()])
def test_bundled_weights_load_by_name_and_reproduce_the_onnx_model(name, one_torch_thread):
    """The shipped weights are the shipped model: under the manifest's SHA-256, on the recipe's network, in
    eval mode they give the ONNX file's probabilities."""
    import onnxruntime as ort

    from training.building import build_model
    from training.config import config_from_dict
    from training.init_weights import apply_initial_weights, load_initial_weights
    from training.models.inference_wrapper import InferenceWrapper

    entry = next(m for m in bundled_models() if m["name"] == name)
    weights = load_initial_weights(name)
    assert weights.sha256 == entry["weights"]["sha256"]
    assert weights.path.stat().st_size == entry["weights"]["bytes"] < 8 * 1024 * 1024
    cfg = config_from_dict(weights.config)
    assert cfg.init.from_checkpoint is None
    torch.manual_seed(0)
    model = build_model(cfg, 1, len(weights.class_names))
    apply_initial_weights(model, weights, class_names=weights.class_names, reinit_heads=False)
    shape = (1, 1, 16, 48, 40) if cfg.model.spatial_dims == 3 else (2, 1, 64, 48)
    rng = np.random.default_rng(0)
    image = torch.from_numpy(rng.uniform(0, 1, shape).astype(np.float32))
    inputs = {"image": image}
    channels = len((weights.spec or {}).get("prompts", {}).get("channels", []))
    if channels:  # a prompt model: its prompt channels as the graph's second input (random clicks will do)
        inputs["prompts"] = torch.from_numpy(
            (rng.uniform(0, 1, (shape[0], channels, *shape[2:])) > 0.9).astype(np.float32)
        )
    with torch.no_grad():
        ours = InferenceWrapper(model.eval(), prompt_channels=channels)(*inputs.values())[0].numpy()
    session = ort.InferenceSession(str(MODELS_DIR / entry["file"]), providers=["CPUExecutionProvider"])
    theirs = session.run(["probabilities"], {k: v.numpy() for k, v in inputs.items()})[0]
    assert np.abs(ours - theirs).max() < 1e-4
    assert json.loads((MODELS_DIR / "manifest.json").read_text())["models"]


def test_finetune_preset_builds_the_network_the_bundled_weights_fit(one_torch_thread):
    from training.building import build_model
    from training.init_weights import apply_initial_weights, load_initial_weights

    cfg = load_config(Path(__file__).parents[2] / "training" / "configs" / "finetune-brain-tissue-3d.yaml")
    weights = load_initial_weights(cfg.init.from_checkpoint)
    model = build_model(cfg, 1, len(weights.class_names))
    lines = apply_initial_weights(model, weights, class_names=weights.class_names, reinit_heads=False)
    assert "brain-tissue-3d.pt" in lines[0]
    from training.start_weights import WeightMix

    # the preset's mix builds on this network (a layer named in weight_mix_layers must be one of it)
    mix = WeightMix(model, model.state_dict(), cfg.init.weight_mix, cfg.init.weight_mix_layers)
    assert mix.share == 0.75 and mix.layers == {}  # one share for every tensor (docs/benchmarks.md)


def _with_error_model(checkpoint: Path, path: Path, error_model: dict) -> Path:
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    state["spec"] = {**state["spec"], "name": "start-model", "error_model": error_model}
    torch.save(state, path)
    return path


def test_the_intensity_consensus_is_carried_with_its_figures_kept_as_the_start_models(
    trained, tmp_path, one_torch_thread
):
    """Nothing in the consensus is fitted, so the fine-tuned model keeps it; the figures it was measured at
    belong to the starting network and are said to."""
    from napari_medcl.error_model import ErrorModel
    from napari_medcl.spec import ModelSpec

    base, three, _, checkpoint = trained
    consensus = ErrorModel.consensus(
        {"auroc": 0.9, "ece": 0.04, "cases": ["a"]}, intensity_weight=0.5, verdict_weights={"caution": 0.125}
    ).to_dict()
    start = _with_error_model(checkpoint, tmp_path / "start.pt", consensus)
    out = tmp_path / "tuned"
    assert train(three, out, *FROZEN, init_from=str(start)) == 0
    spec = torch.load(out / "checkpoint_last.pt", map_location="cpu", weights_only=True)["spec"]
    carried = ModelSpec.from_dict(spec).error_map_model
    assert carried.is_consensus and carried.intensity_weight == 0.5
    assert carried.verdict_weights == {"caution": 0.125}
    assert carried.figures == {"start_model": {"name": "start-model", "auroc": 0.9, "ece": 0.04}}
    assert carried.summary().endswith(
        "not measured on this model; carried from start-model (there AUROC 0.900, ECE 0.040)"
    )
    log = (out / "train.log").read_text(encoding="utf-8")
    assert "error map: the intensity consensus carried from start-model" in log


def test_a_fitted_error_map_is_not_carried_and_the_log_says_why(trained, tmp_path, one_torch_thread):
    from napari_medcl.error_model import ErrorModel

    base, three, _, checkpoint = trained
    fitted = ErrorModel(features=("top_error", "border"), coefficients=(2.0, 1.0), intercept=-3.0).to_dict()
    start = _with_error_model(checkpoint, tmp_path / "start.pt", fitted)
    out = tmp_path / "tuned"
    assert train(three, out, *FROZEN, init_from=str(start)) == 0
    spec = torch.load(out / "checkpoint_last.pt", map_location="cpu", weights_only=True)["spec"]
    assert "error_model" not in spec or spec["error_model"] is None
    assert "start-model's is fitted to its own network's signals and is not carried" in (
        out / "train.log"
    ).read_text(encoding="utf-8")


def test_bundled_weights_describe_their_model_as_its_onnx_file_does():
    """``--init-from NAME`` reads the spec stored in the weights file: it must be the ONNX file's (the error
    map included), or a fine-tuned model would lose what the bundled one carries."""
    from napari_medcl.onnx_session import load_model

    for entry in bundled_models():
        stored = torch.load(MODELS_DIR / entry["weights"]["file"], map_location="cpu", weights_only=True)
        onnx_spec = load_model(entry["name"], device="cpu", backend="onnxruntime").spec.to_dict()
        assert json.dumps(stored["spec"], sort_keys=True) == json.dumps(onnx_spec, sort_keys=True), entry[
            "name"
        ]


def test_a_bare_state_dict_starts_a_run_too(trained, tmp_path, one_torch_thread):
    """training.pretrain writes network.pt, a plain state dict: a run fine-tunes from it the same way."""
    base, three, _, checkpoint = trained
    network = tmp_path / "network.pt"
    torch.save(torch.load(checkpoint, map_location="cpu", weights_only=True)["model"], network)
    out = tmp_path / "from-state-dict"
    assert train(three, out, *FROZEN, init_from=str(network)) == 0
    start, tuned = model_weights(checkpoint), model_weights(out / "checkpoint_last.pt")
    assert all(torch.allclose(start[k].float(), tuned[k].float(), atol=1e-6) for k in start)


def test_bundled_weights_are_checked_against_the_manifest(tmp_path):
    from training.init_weights import InitError, load_initial_weights

    manifest = json.loads((MODELS_DIR / "manifest.json").read_text())
    entry = next(m for m in manifest["models"] if m["name"] == "brain-tissue-2d")
    (tmp_path / entry["weights"]["file"]).write_bytes((MODELS_DIR / entry["weights"]["file"]).read_bytes())
    entry["weights"]["sha256"] = "0" * 64
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(InitError, match="does not match the manifest"):
        load_initial_weights("brain-tissue-2d", models_dir=tmp_path)
    del entry["weights"]
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(InitError, match="ships no training weights"):
        load_initial_weights("brain-tissue-2d", models_dir=tmp_path)


def test_finetune_preset_repeats_the_bundled_models_recipe():
    """The preset fine-tunes the bundled weights with the data handling they were last trained with (stage 2 of
    the recipe): a preset left on an older stage's augmentation would pull the model back towards it."""
    configs = Path(__file__).parents[2] / "training" / "configs"
    preset = load_config(configs / "finetune-brain-tissue-3d.yaml")
    recipe = load_config(configs / "default-brain-tissue-3d-stage2.yaml")
    assert preset.data.augmentation == recipe.data.augmentation
    assert preset.data.target_spacing == recipe.data.target_spacing
    assert preset.data.normalization == recipe.data.normalization
    assert preset.model == recipe.model
    assert preset.train.patch_size == recipe.train.patch_size
