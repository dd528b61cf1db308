"""A step whose gradient is not finite (while its loss is) is skipped and logged instead of turning every weight
into NaN; a run where most steps are like that stops with a plain error."""

from __future__ import annotations

import math

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

from tests.dataset_factory import make_msd_dataset
from training.cli import train_main
from training.loop import TrainStep


def _poison_steps(monkeypatch, steps: set[int], kind: str = "nan") -> None:
    """Add to the loss of the given (1-based) steps a term worth 0 whose gradient on ``head.weight`` is NaN
    (``kind`` "nan") or finite but so large that the sum of squares overflows ("huge")."""
    original = TrainStep.forward
    calls = [0]

    def forward(self, image, label, generator=None, progress=0.0):
        loss, terms = original(self, image, label, generator, progress)
        calls[0] += 1
        if calls[0] in steps:
            weight = self.model.head.weight
            if kind == "nan":
                loss = loss + (weight * 0).sum().sqrt() * 0  # d sqrt(x)/dx at 0 is inf, times 0: NaN
            else:
                loss = loss + (weight - weight.detach()).sum() * 1e30
        return loss, terms

    monkeypatch.setattr(TrainStep, "forward", forward)


def _run(tmp_path, iterations: int) -> tuple[int, str, object]:
    root = make_msd_dataset(tmp_path / "Task99_Tiny", n_cases=3, shape=(12, 20, 18))
    config = tmp_path / "run.yaml"
    config.write_text(
        f"data: {{root: {root}, val_fraction: 0.34, num_workers: 0, augmentation: {{enabled: false}}}}\n"
        "model: {features: [8, 16, 32]}\n"
        f"train: {{device: cpu, epochs: 1, iterations_per_epoch: {iterations}, batch_size: 2,"
        " patch_size: [8, 16, 16]}\n",
        encoding="utf-8",
    )
    out = tmp_path / "out"
    code = train_main([str(config), "--set", f"output.dir={out}"])
    return code, (out / "train.log").read_text(encoding="utf-8"), out


@pytest.mark.usefixtures("one_torch_thread")
@pytest.mark.parametrize(
    ("kind", "logged"),
    [
        ("nan", "the gradient norm is nan (model.head.weight)"),
        ("huge", "the gradient norm is inf (model.head.weight 4.9e+30, "),
    ],
)
def test_a_step_with_a_nan_or_overflowing_gradient_is_skipped_and_named_in_the_log(
    tmp_path, monkeypatch, kind, logged
):
    _poison_steps(monkeypatch, {2}, kind)
    steps_taken = []
    handle = register_optimizer_step_post_hook(lambda *_: steps_taken.append(1))
    try:
        code, log, out = _run(tmp_path, iterations=3)
    finally:
        handle.remove()
    assert code == 0, log
    assert f"epoch 1, step 2: {logged}" in log and "the step is skipped" in log
    state = torch.load(out / "checkpoint_last.pt", map_location="cpu", weights_only=True)
    weights = [t for t in state["model"].values() if t.is_floating_point()]
    assert weights and all(torch.isfinite(t).all() for t in weights)
    assert len(steps_taken) == 2  # of three: the poisoned one never reached the optimizer
    assert math.isfinite(state["history"][-1]["val"]["mean_dice"])


@pytest.mark.usefixtures("one_torch_thread")
def test_a_run_where_most_steps_have_a_nan_gradient_stops_with_a_plain_error(tmp_path, monkeypatch, capsys):
    _poison_steps(monkeypatch, {1, 2})
    code, log, _ = _run(tmp_path, iterations=2)
    assert code != 0
    error = capsys.readouterr().err
    assert "epoch 1: 2 of 2 steps had a gradient that is not finite (steps [1, 2]) and were skipped" in error
    assert "Traceback" not in error
    assert "step 1: the gradient norm is nan" in log and "step 2: the gradient norm is nan" in log
