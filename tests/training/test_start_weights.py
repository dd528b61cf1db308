"""init.anchor_weight (L2-SP) and init.weight_mix (WiSE-FT): the penalty and its gradient, which weights
take part, a fine-tune that the anchor holds near its start, a run whose saved model is the mix, and resumed
runs that refer to where the run began."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.dataset_factory import make_msd_dataset
from training.building import build_model
from training.config import config_from_dict, config_notices, load_config
from training.errors import RunError
from training.init_weights import HEAD_PREFIXES, initial_state, load_initial_weights
from training.run import train
from training.start_weights import WeightAnchor, WeightMix, anchor_penalty, train_only

pytestmark = pytest.mark.torch

TINY = {"model": {"features": [8, 16, 32], "uafr": {"enabled": True}}}


class Crash(Exception):
    """Stands for the process dying right after epoch 1's checkpoint was written."""


def test_penalty_is_half_the_weight_times_the_squared_distance_and_pulls_back():
    start = [torch.tensor([1.0, -2.0]), torch.tensor([[0.5]])]
    now = [torch.tensor([1.5, -2.0], requires_grad=True), torch.tensor([[0.0]], requires_grad=True)]
    penalty = anchor_penalty(now, start, 4.0)
    assert penalty.item() == pytest.approx(2.0 * (0.25 + 0.25))
    penalty.backward()
    assert torch.allclose(now[0].grad, torch.tensor([2.0, 0.0]))  # weight * (w - w0)
    assert torch.allclose(now[1].grad, torch.tensor([[-2.0]]))
    with pytest.raises(ValueError, match=r"\(3,\).*\(2,\)"):
        anchor_penalty([torch.zeros(3)], [torch.zeros(2)], 1.0)


def test_heads_started_afresh_are_not_anchored_and_the_rest_is_at_its_loaded_value(tmp_path):
    cfg = config_from_dict(TINY)
    source = build_model(cfg, 1, 3)
    path = tmp_path / "three.pt"
    torch.save(source.state_dict(), path)
    weights = load_initial_weights(str(path))
    model = build_model(cfg, 1, 2)  # another set of classes: the heads start afresh
    start = initial_state(model, weights, class_names=["background", "a"], reinit_heads=True)
    anchor = WeightAnchor(model, start, 1.0)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(anchor.names) == {n for n in trained if not n.startswith(HEAD_PREFIXES)}
    assert anchor.names and not any(n.startswith(HEAD_PREFIXES) for n in anchor.names)
    model.load_state_dict(start, strict=False)
    assert anchor.penalty().item() == 0.0 and anchor.distance() == 0.0
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if n == anchor.names[0]).add_(1.0)
    assert anchor.penalty().item() > 0.0


def test_anchor_weight_without_a_checkpoint_is_reported_as_having_no_effect():
    notes = config_notices(config_from_dict({"init": {"anchor_weight": 0.1}}))
    assert any(n.startswith("init.anchor_weight has no effect") for n in notes)
    assert not any("anchor" in n for n in config_notices(config_from_dict({})))
    notes = config_notices(config_from_dict({"init": {"weight_mix": 0.5}}))
    assert any(n.startswith("init.weight_mix has no effect") for n in notes)
    with pytest.raises(ValueError, match="anchor_weight"):
        config_from_dict({"init": {"anchor_weight": -1.0}})


@pytest.fixture(scope="module")
def start(tmp_path_factory):
    """A tiny dataset and a finished one-step run on it (its last checkpoint)."""
    base = tmp_path_factory.mktemp("anchor")
    root = make_msd_dataset(base / "Task98_Anchor", n_cases=3, shape=(8, 16, 16))
    assert train(load_config(None, settings(root, base / "first"))).epochs == 1
    return root, base / "first" / "checkpoint_last.pt"


def settings(root: Path, out: Path, *extra: str) -> list[str]:
    return [
        f"data.root={root}",
        "data.num_workers=0",
        "data.augmentation.enabled=false",
        "data.val_fraction=0.34",
        "data.crop_nonzero=false",
        "model.features=[8,16,32]",
        "model.uafr.enabled=true",
        "train.device=cpu",
        "train.epochs=1",
        "train.iterations_per_epoch=1",
        "train.batch_size=1",
        "train.patch_size=[8,16,16]",
        f"output.dir={out}",
        *extra,
    ]


def distance_from(checkpoint: Path, run: Path) -> float:
    a = torch.load(checkpoint, map_location="cpu", weights_only=True)["model"]
    b = torch.load(run / "checkpoint_last.pt", map_location="cpu", weights_only=True)["model"]
    learned = [k for k in a if a[k].is_floating_point() and not k.endswith(("running_mean", "running_var"))]
    return (
        sum(float((a[k] - b[k]).pow(2).sum()) for k in learned) ** 0.5
    )  # BatchNorm statistics are not trained


def test_a_strong_anchor_keeps_a_fine_tune_near_its_start_and_the_run_reports_it(
    start, tmp_path, one_torch_thread
):
    root, checkpoint = start
    # Plain SGD: each step pulls lr * anchor_weight = 0.5 of the way back to the start.
    tune = ["train.optimizer=sgd", "train.momentum=0.0", "train.lr=0.05", "train.iterations_per_epoch=6",
            "train.scheduler=constant",
            "train.weight_decay=0.0", f"init.from_checkpoint={checkpoint}"]  # fmt: skip
    free = train(load_config(None, settings(root, tmp_path / "free", *tune)))
    held = train(load_config(None, settings(root, tmp_path / "held", *tune, "init.anchor_weight=10")))
    assert distance_from(checkpoint, held.output_dir) < 0.6 * distance_from(checkpoint, free.output_dir)

    record = json.loads((held.output_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()[-1])
    assert record["train"]["anchor"] > 0.0
    assert (
        record["train"]["loss"] > record["train"]["ce"] + record["train"]["dice"]
    )  # the term is in the loss
    assert (
        "anchor" not in json.loads((free.output_dir / "metrics.jsonl").read_text().splitlines()[-1])["train"]
    )
    log = (held.output_dir / "train.log").read_text(encoding="utf-8")
    assert "init.anchor_weight 10: L2-SP pulls" in log and "anchor " in log


def test_train_only_updates_the_named_parameters_and_keeps_the_rest_as_loaded(
    start, tmp_path, one_torch_thread
):
    root, checkpoint = start
    tune = ["train.lr=0.01", "train.iterations_per_epoch=3", f"init.from_checkpoint={checkpoint}"]
    run = train(
        load_config(None, settings(root, tmp_path / "first-stage", *tune, "init.train_only=[encoder.0]"))
    )
    before = torch.load(checkpoint, map_location="cpu", weights_only=True)["model"]
    after = torch.load(run.output_dir / "checkpoint_last.pt", map_location="cpu", weights_only=True)["model"]
    statistics = ("running_mean", "running_var", "num_batches_tracked")
    moved = {k for k in before if not k.endswith(statistics) and not torch.equal(before[k], after[k])}
    assert moved and all(k.startswith("encoder.0.") for k in moved)
    log = (run.output_dir / "train.log").read_text(encoding="utf-8")
    assert "init.train_only encoder.0:" in log and "parameters train" in log

    with pytest.raises(RunError, match=r"encoder\.9 match no parameter.*encoder\.0"):
        train(load_config(None, settings(root, tmp_path / "typo", *tune, "init.train_only=[encoder.9]")))
    # A prefix stops at a dot: "encoder.0" is not "encoder.0x"; a bare string is not a list.
    model = build_model(config_from_dict(TINY), 1, 2)
    train_only(model, ["encoder.0"])
    assert all(p.requires_grad == n.startswith("encoder.0.") for n, p in model.named_parameters())
    with pytest.raises(ValueError, match="train_only"):
        config_from_dict({"init": {"train_only": "encoder.0"}})
    notes = config_notices(config_from_dict({"init": {"train_only": ["encoder.0"]}}))
    assert any(n.startswith("init.train_only has no effect") for n in notes)


def test_the_mix_moves_only_started_tensors_and_gives_the_trained_weights_back():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    start = {k: torch.zeros_like(v) for k, v in model.state_dict().items() if k.startswith("0.")}
    trained = {k: v.clone() for k, v in model.state_dict().items()}
    mix = WeightMix(model, start, 0.25)
    mixed = mix.mixed_state(trained)
    assert torch.allclose(mixed["0.weight"], 0.25 * trained["0.weight"])
    assert torch.equal(mixed["1.running_var"], trained["1.running_var"])  # not started: as trained
    with mix.applied(model) as kept:
        assert torch.allclose(model[0].bias, 0.25 * trained["0.bias"])
        assert all(torch.equal(kept[k], trained[k]) for k in trained)
    assert all(torch.equal(model.state_dict()[k], trained[k]) for k in trained)
    with pytest.raises(ValueError, match="share"):
        WeightMix(model, start, 0.0)


def test_a_mixed_run_saves_the_mix_and_keeps_the_trained_weights_for_a_resume(
    start, tmp_path, one_torch_thread
):
    root, checkpoint = start
    tune = ["train.lr=0.01", "train.iterations_per_epoch=2", f"init.from_checkpoint={checkpoint}",
            "init.weight_mix=0.5"]  # fmt: skip
    run = train(load_config(None, settings(root, tmp_path / "mixed", *tune)))
    first = torch.load(checkpoint, map_location="cpu", weights_only=True)["model"]
    saved = torch.load(run.last_checkpoint, map_location="cpu", weights_only=True)
    model, trained = saved["model"], saved["trained_model"]
    floats = [k for k in first if first[k].is_floating_point()]
    assert any(not torch.equal(trained[k], first[k]) for k in floats)
    for k in floats:
        assert torch.allclose(model[k], first[k] + 0.5 * (trained[k] - first[k]), atol=1e-6), k
    log = (run.output_dir / "train.log").read_text(encoding="utf-8")
    assert "init.weight_mix 0.5: the model validated and saved is the start plus 0.5" in log


def test_named_layers_keep_their_own_share_of_the_trained_change():
    model = torch.nn.ModuleDict({"encoder": torch.nn.Linear(2, 2), "decoder": torch.nn.Linear(2, 2)})
    start = {k: torch.zeros_like(v) for k, v in model.state_dict().items()}
    trained = {k: torch.ones_like(v) for k, v in model.state_dict().items()}
    mix = WeightMix(model, start, 0.5, {"decoder": 1.0, "decoder.bias": 0.0})
    mixed = mix.mixed_state(trained)
    assert torch.all(mixed["encoder.weight"] == 0.5) and torch.all(mixed["encoder.bias"] == 0.5)
    assert torch.all(mixed["decoder.weight"] == 1.0)
    assert torch.all(mixed["decoder.bias"] == 0.0)  # the longest prefix wins
    assert "decoder 1; decoder.bias 0" in mix.describe()
    with pytest.raises(ValueError, match=r"decod match no tensor.*decoder"):
        WeightMix(model, start, 0.5, {"decod": 1.0})  # a prefix stops at a dot boundary
    with pytest.raises(ValueError, match="weight_mix_layers"):
        config_from_dict({"init": {"weight_mix_layers": {"decoder": 1.5}}})
    notes = config_notices(config_from_dict({"init": {"weight_mix_layers": {"decoder": 1.0}}}))
    assert any(n.startswith("init.weight_mix_layers has no effect") for n in notes)


def test_a_run_with_layer_shares_saves_each_layer_mixed_at_its_share(start, tmp_path, one_torch_thread):
    root, checkpoint = start
    tune = ["train.lr=0.01", "train.iterations_per_epoch=2", f"init.from_checkpoint={checkpoint}",
            "init.weight_mix=0.5", "init.weight_mix_layers={decoder: 1.0, head: 0.0}"]  # fmt: skip
    run = train(load_config(None, settings(root, tmp_path / "by-layer", *tune)))
    first = torch.load(checkpoint, map_location="cpu", weights_only=True)["model"]
    saved = torch.load(run.last_checkpoint, map_location="cpu", weights_only=True)
    model, trained = saved["model"], saved["trained_model"]
    floats = [k for k in first if first[k].is_floating_point()]
    for k in floats:
        share = 1.0 if k.startswith("decoder.") else 0.0 if k.startswith("head.") else 0.5
        assert torch.allclose(model[k], first[k] + share * (trained[k] - first[k]), atol=1e-6), k
    assert any(not torch.equal(trained[k], first[k]) for k in floats if k.startswith("decoder."))
    assert saved["config"]["init"]["weight_mix_layers"] == {"decoder": 1.0, "head": 0.0}
    log = (run.output_dir / "train.log").read_text(encoding="utf-8")
    assert "WiSE-FT; decoder 1; head 0)" in log


def test_the_mix_does_not_change_what_trains(start, tmp_path, one_torch_thread):
    # what benchmarks/adaptation.py's mix sweep and scripts/adaptation_layer_mix.py rely on: a run's trained
    # weights are the same whatever share of them it saves
    root, checkpoint = start
    tune = ["train.lr=0.01", "train.iterations_per_epoch=2", "train.epochs=2", "train.val_every=1",
            f"init.from_checkpoint={checkpoint}"]  # fmt: skip
    plain = train(load_config(None, settings(root, tmp_path / "plain", *tune)))
    mixed = train(load_config(None, settings(root, tmp_path / "mixed", *tune, "init.weight_mix=0.3",
                                             "init.weight_mix_layers={decoder: 0.9}")))  # fmt: skip
    a = torch.load(plain.last_checkpoint, map_location="cpu", weights_only=True)["model"]
    b = torch.load(mixed.last_checkpoint, map_location="cpu", weights_only=True)["trained_model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("guard", ["init.anchor_weight=5", "init.weight_mix=0.5"])
def test_a_resumed_run_refers_to_where_the_run_began(start, tmp_path, one_torch_thread, guard):
    root, checkpoint = start
    tune = ["train.optimizer=sgd", "train.momentum=0.0", "train.lr=0.05", "train.epochs=2",
            "train.iterations_per_epoch=2", f"init.from_checkpoint={checkpoint}", guard]  # fmt: skip
    whole = train(load_config(None, settings(root, tmp_path / "whole", *tune)))

    def crash_after_epoch_1(record: dict) -> None:
        if record["epoch"] == 1:
            raise Crash

    out = tmp_path / "resumed"
    with pytest.raises(Crash):
        train(load_config(None, settings(root, out, *tune)), on_epoch_end=crash_after_epoch_1)
    resumed = train(load_config(None, settings(root, out, *tune)), resume=True)
    assert [r["train"] for r in resumed.history] == [r["train"] for r in whole.history]
    for key in ("model", "trained_model") if "weight_mix" in guard else ("model",):
        a = torch.load(whole.last_checkpoint, weights_only=True)[key]
        b = torch.load(resumed.last_checkpoint, weights_only=True)[key]
        assert all(torch.equal(a[k], b[k]) for k in a), key
    # the resumed run's model still says what it started from
    specs = [torch.load(r.last_checkpoint, weights_only=True)["spec"] for r in (whole, resumed)]
    assert specs[1]["training"]["init_from"] == specs[0]["training"]["init_from"] is not None
