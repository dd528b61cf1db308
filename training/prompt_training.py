"""Training a prompt-conditioned network with simulated interactions (``model.prompts``), as DeepEdit and
nnInteractive train theirs: the user is simulated by clicking where the network's own previous prediction
is wrong, for a few rounds, and the network then learns from the image with every click so far.

:func:`sample_click` is the simulated user (pure: numpy in, one click out); :func:`simulate_prompts` runs the
rounds on a batch and returns the prompt channels the training pass appends to the image. The channels are
encoded by ``napari_medcl.prompt_channels`` — the encoder the product uses at inference.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from napari_medcl.prompt_channels import Click, PromptEncoding

__all__ = ["prompt_encoding", "sample_click", "simulate_prompts"]


def prompt_encoding(settings, num_classes: int) -> PromptEncoding | None:
    """The encoding ``model.prompts`` (training.config.PromptsConfig) describes; None when it is off."""
    if not settings.enabled:
        return None
    return PromptEncoding(
        num_classes=num_classes,
        radius_mm=float(settings.click_radius_mm),
        shape=settings.click_shape,
        previous=settings.previous_segmentation,
        amplitude=float(settings.amplitude),
    )


def sample_click(prediction: np.ndarray, truth: np.ndarray, *, negative: bool = False) -> Click | None:
    """The simulated user's click on ``prediction`` (*S) int against ``truth`` (*S) int, same shape: the voxel
    deepest inside (largest Euclidean distance to a right voxel or the edge) the largest connected error
    component (faces touching). A positive click on the true class there; with ``negative`` and a wrongly
    predicted foreground class, a negative click on that class instead. None when nothing is wrong."""
    from scipy import ndimage

    if prediction.shape != truth.shape:
        raise ValueError(f"prediction of shape {prediction.shape} and truth of shape {truth.shape} differ")
    errors = prediction != truth
    if not errors.any():
        return None
    components, _ = ndimage.label(errors)
    sizes = np.bincount(components.ravel())
    sizes[0] = 0
    largest = np.pad(components == sizes.argmax(), 1)  # padded: the patch's edge counts as a border
    depth = ndimage.distance_transform_edt(largest)[(slice(1, -1),) * truth.ndim]
    at = np.unravel_index(int(depth.argmax()), depth.shape)
    predicted, true = int(prediction[at]), int(truth[at])
    if negative and predicted > 0:
        return Click(predicted, False, tuple(int(i) for i in at))
    return Click(true, True, tuple(int(i) for i in at))


@torch.no_grad()
def simulate_prompts(
    model: nn.Module,
    image: Tensor,
    label: Tensor,
    encoding: PromptEncoding,
    settings,
    spacing: Sequence[float],
    generator: torch.Generator,
) -> Tensor:
    """Prompt channels (B, P, *S) float32 for a batch: image (B, C, *S) float, label (B, *S) int64; ``model``
    takes (B, C + P, *S). ``settings``: training.config.PromptsConfig; ``spacing`` of the patch (mm per axis);
    all randomness from ``generator`` (CPU).

    Per sample: none with probability ``no_prompt_fraction``; otherwise 1..``max_rounds`` rounds of (run the
    network in eval mode with the channels so far, click in its errors, previous segmentation = its labels).
    """
    b = image.shape[0]
    spatial = tuple(image.shape[2:])
    if tuple(label.shape) != (b, *spatial):
        raise ValueError(
            f"image of shape {tuple(image.shape)} and label of shape {tuple(label.shape)} differ"
        )
    prompts = torch.zeros((b, encoding.num_channels, *spatial), dtype=image.dtype, device=image.device)
    draws = torch.rand((b, 1 + settings.max_rounds), generator=generator)
    rounds = [
        0 if float(d[0]) < settings.no_prompt_fraction else 1 + int(float(d[1]) * settings.max_rounds)
        for d in draws
    ]
    if not any(rounds):
        return prompts
    clicks: list[list[Click]] = [[] for _ in range(b)]
    truth = label.cpu().numpy()
    was_training = model.training
    model.eval()  # the simulated user answers the network as it would predict, not a dropout sample
    try:
        for r in range(max(rounds)):
            active = [i for i in range(b) if rounds[i] > r]
            x = torch.cat([image[active], prompts[active]], dim=1)
            predicted = model(x).logits.argmax(1).cpu().numpy()
            for j, i in enumerate(active):
                negative = float(torch.rand((), generator=generator)) < settings.negative_click_prob
                click = sample_click(predicted[j], truth[i], negative=negative)
                if click is not None:
                    clicks[i].append(click)
                channels = encoding.encode(clicks[i], predicted[j], spatial, spacing)
                prompts[i] = torch.from_numpy(channels).to(prompts.device, prompts.dtype)
    finally:
        model.train(was_training)
    return prompts
