"""Prompt-conditioned training (model.prompts): the simulated user clicks inside the network's errors, the
rounds build the prompt channels, and a network initialised from an automatic one with extra input
channels starts out computing exactly what the automatic one did."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_medcl.prompt_channels import PromptEncoding
from training.config import ConfigError, PromptsConfig, config_from_dict, config_notices
from training.init_weights import InitError, InitialWeights, apply_initial_weights
from training.models import create_model
from training.prompt_training import sample_click, simulate_prompts

pytestmark = pytest.mark.torch


def test_the_click_is_deepest_inside_the_largest_error_component_with_the_true_class():
    truth = np.zeros((9, 20, 20), dtype=np.int64)
    truth[1:8, 2:9, 2:9] = 2  # the larger mistake: missed entirely, centre (4, 5, 5)
    truth[2:5, 14:17, 14:17] = 1  # a smaller one
    prediction = np.zeros_like(truth)
    click = sample_click(prediction, truth)
    assert click.positive and click.label == 2 and click.at == (4, 5, 5)


def test_a_wrongly_labelled_region_gives_a_background_or_a_negative_click():
    truth = np.zeros((9, 20, 20), dtype=np.int64)
    prediction = truth.copy()
    prediction[3:6, 11:14, 11:14] = 3  # labelled 3 where there is nothing
    positive = sample_click(prediction, truth)
    assert (positive.label, positive.positive, positive.at) == (0, True, (4, 12, 12))
    negative = sample_click(prediction, truth, negative=True)
    assert (negative.label, negative.positive, negative.at) == (3, False, (4, 12, 12))


def test_no_error_no_click_and_shapes_must_agree():
    labels = np.ones((4, 5, 6), dtype=np.int64)
    assert sample_click(labels, labels) is None
    with pytest.raises(ValueError, match=r"\(4, 5, 6\).*\(4, 5\)"):
        sample_click(labels, labels[..., 0])


class Background(torch.nn.Module):
    """Predicts background everywhere and records what it was given."""

    def __init__(self):
        super().__init__()
        self.inputs = []

    def forward(self, x):
        self.inputs.append(x.clone())
        logits = torch.zeros(x.shape[0], 3, *x.shape[2:])
        logits[:, 0] = 1.0
        return type("Out", (), {"logits": logits})()


def test_simulated_rounds_click_in_the_errors_of_the_networks_own_prediction():
    encoding = PromptEncoding(num_classes=3, radius_mm=1.0)
    label = torch.zeros(2, 9, 16, 16, dtype=torch.int64)
    label[:, 2:7, 4:9, 4:9] = 1  # the network misses it: centre (4, 6, 6)
    image = torch.randn(2, 1, 9, 16, 16)
    settings = PromptsConfig(enabled=True, max_rounds=2, no_prompt_fraction=0.0, negative_click_prob=0.0)
    model = Background()
    prompts = simulate_prompts(
        model, image, label, encoding, settings, (1.0, 1.0, 1.0), torch.Generator().manual_seed(0)
    )
    assert prompts.shape == (2, encoding.num_channels, 9, 16, 16)
    for sample in prompts:
        positive = sample[0]
        assert positive[4, 6, 6] == 1 and positive.sum() == 7  # a 1 mm disk: the voxel and 6 neighbours
        assert not sample[1:].any()  # no other click; the previous segmentation (background) is all zero
    # round one saw no prompts; the network was asked in eval mode and left as it was
    assert not model.inputs[0][:, 1:].any() and model.training


def test_samples_without_prompts_and_the_generator_decides():
    encoding = PromptEncoding(num_classes=3)
    label = torch.ones(3, 4, 8, 8, dtype=torch.int64)
    image = torch.randn(3, 1, 4, 8, 8)
    none = PromptsConfig(enabled=True, no_prompt_fraction=1.0)
    model = Background()
    out = simulate_prompts(model, image, label, encoding, none, (1.0,) * 3, torch.Generator().manual_seed(0))
    assert not out.any() and not model.inputs  # no round was run at all
    some = PromptsConfig(enabled=True, no_prompt_fraction=0.5, max_rounds=3)
    runs = [
        simulate_prompts(
            Background(), image, label, encoding, some, (1.0,) * 3, torch.Generator().manual_seed(s)
        )
        for s in (3, 3)
    ]
    assert torch.equal(runs[0], runs[1])


def test_the_config_section_and_its_notices():
    cfg = config_from_dict({"model": {"prompts": {"enabled": True, "max_rounds": 2}}})
    assert cfg.model.prompts.max_rounds == 2 and cfg.model.prompts.click_shape == "disk"
    off = config_from_dict({"model": {"prompts": {"max_rounds": 2}}})
    assert "model.prompts.max_rounds has no effect: model.prompts.enabled is false" in config_notices(off)
    with pytest.raises(ConfigError, match="no_prompt_fraction must be in"):
        config_from_dict({"model": {"prompts": {"no_prompt_fraction": 1.5}}})


def networks(extra: int):
    torch.manual_seed(0)
    options = {"spatial_dims": 3, "num_classes": 4, "features": [8, 16], "uafr": True}
    automatic = create_model("unet", in_channels=1, **options).eval()
    torch.manual_seed(1)
    prompted = create_model("unet", in_channels=1 + extra, **options).eval()
    return automatic, prompted


def test_init_expands_the_input_layer_with_zeros_so_the_prompt_model_starts_as_the_automatic_one(
    one_torch_thread,
):
    automatic, prompted = networks(extra=9)
    weights = InitialWeights("auto", _path(), "0" * 64, automatic.state_dict(), None, None)
    lines = apply_initial_weights(
        prompted, weights, class_names=["bg", "a", "b", "c"], reinit_heads=False, extra_input_channels=9
    )
    assert any("9 input channel(s) added to encoder.0.0.0" in line for line in lines)
    first = prompted.state_dict()["encoder.0.0.0.weight"]
    assert (
        torch.equal(first[:, :1], automatic.state_dict()["encoder.0.0.0.weight"]) and not first[:, 1:].any()
    )
    image = torch.randn(1, 1, 8, 16, 16)
    with torch.no_grad():
        expected = automatic(image).logits
        empty = prompted(torch.cat([image, torch.zeros(1, 9, 8, 16, 16)], 1)).logits
        clicked = prompted(torch.cat([image, torch.rand(1, 9, 8, 16, 16)], 1)).logits
    assert torch.equal(empty, expected) and torch.equal(clicked, expected)


def test_init_refuses_a_checkpoint_whose_input_layer_does_not_fit(one_torch_thread):
    automatic, prompted = networks(extra=9)
    weights = InitialWeights("auto", _path(), "0" * 64, automatic.state_dict(), None, None)
    with pytest.raises(InitError, match="4 fewer channels"):
        apply_initial_weights(
            prompted, weights, class_names=["bg", "a", "b", "c"], reinit_heads=False, extra_input_channels=4
        )


def _path():
    from pathlib import Path

    return Path("automatic.pt")
