"""The inference face of a trained network: image -> (probabilities, uafr_uncertainty), as the ONNX graph has it.

``InferenceWrapper(model)`` keeps the network in eval mode and returns exactly the outputs of the ONNX
contract (architecture.md §4.3): ``probabilities`` = softmax of the final logits, computed in float32, and,
when the network has UAFR blocks, ``uafr_uncertainty`` = every block's normalised-entropy map brought to the
input's size and stacked in ``model.uncertainty_names`` order. Deep-supervision logits, PDCR taps and the CCDC
projection are training-only and never reach the outputs (taps and embedding are not even computed:
``return_features`` is off during the forward pass).

Why the maps are upsampled by their stride and then cropped, rather than resized straight to the input size:
a stride-``s`` map of an input of ``S`` voxels has ``ceil(S / s)`` voxels. Upsampling it by exactly ``s``
(linear, ``align_corners=False``) and cropping to ``S`` gives every input voxel the same value whatever the
input size, so a window's map does not depend on how large the window is. For inputs that are multiples of
the stride (every window ``napari_medcl.predict`` feeds the model) it is the same as resizing to ``S``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["InferenceWrapper"]

OUTPUT_PROBABILITIES = "probabilities"
OUTPUT_UNCERTAINTY = "uafr_uncertainty"
_LINEAR = {2: "bilinear", 3: "trilinear"}


class InferenceWrapper(nn.Module):
    """Wraps a registry model (``forward(image) -> SegmentationOutput``) for inference and export.

    ``forward(image)``: image (N, C_in, *S) float32 -> ``(probabilities,)`` or
    ``(probabilities, uafr_uncertainty)``: probabilities (N, K, *S) float32 summing to 1 over K;
    uafr_uncertainty (N, U, *S) float32 in [0, 1] with U = ``len(model.uncertainty_names)`` (absent when 0).

    ``dtype``: the precision the network runs in (``torch.float16`` for the fp16 export; the model must
    already be in that dtype). The input is cast to it on entry; the softmax and the outputs stay float32
    (UAFR's own entropy is computed in float32 inside the model).

    The wrapper (and so the model) is always in eval mode: ``train(True)`` is refused rather than obeyed,
    because a wrapper in training mode would export batch statistics instead of folded running statistics.
    """

    def __init__(self, model: nn.Module, *, dtype: torch.dtype = torch.float32, prompt_channels: int = 0):
        super().__init__()
        if not 0 <= prompt_channels < getattr(model, "in_channels", prompt_channels + 1):
            raise ValueError(
                f"prompt_channels {prompt_channels} for a network with {model.in_channels} inputs"
            )
        # A prompt-conditioned network (model.prompts) takes the image and its prompt channels as one tensor;
        # the graph takes them as two inputs, so that only the image is normalised and a product that has
        # no prompts can feed zeros without knowing their layout (napari_medcl.prompt_channels).
        self.prompt_channels = int(prompt_channels)
        for attribute in ("spatial_dims", "uncertainty_names", "uncertainty_strides"):
            if not hasattr(model, attribute):
                raise TypeError(
                    f"{type(model).__name__} lacks {attribute!r}; wrap a model built by "
                    "training.models.create_model"
                )
        if model.spatial_dims not in _LINEAR:
            raise ValueError(f"spatial_dims must be 2 or 3, got {model.spatial_dims!r}")
        self.model = model
        self.dtype = dtype
        self.spatial_dims = int(model.spatial_dims)
        self.uncertainty_names = tuple(model.uncertainty_names)
        strides = model.uncertainty_strides
        self.uncertainty_strides = tuple(tuple(int(s) for s in strides[n]) for n in self.uncertainty_names)
        self.eval()

    @property
    def output_names(self) -> tuple[str, ...]:
        """Names of the forward outputs, in order (the ONNX output names)."""
        return (
            (OUTPUT_PROBABILITIES, OUTPUT_UNCERTAINTY) if self.uncertainty_names else (OUTPUT_PROBABILITIES,)
        )

    def train(self, mode: bool = True) -> InferenceWrapper:
        if mode:
            raise RuntimeError("InferenceWrapper is for inference only; it cannot be put in training mode")
        return super().train(False)

    @property
    def input_names(self) -> tuple[str, ...]:
        """Names of the forward inputs, in order (the ONNX input names)."""
        return ("image", "prompts") if self.prompt_channels else ("image",)

    def forward(self, image: Tensor, prompts: Tensor | None = None) -> tuple[Tensor, ...]:
        """image (N, C, *S) [, prompts (N, P, *S) when ``prompt_channels`` P > 0] -> (probabilities
        (N, K, *S),) [+ (uafr_uncertainty (N, U, *S),)], with C + P the network's inputs."""
        if self.prompt_channels:
            if not torch.jit.is_tracing() and (
                prompts is None
                or prompts.shape[1] != self.prompt_channels
                or prompts.shape[2:] != image.shape[2:]
            ):
                got = None if prompts is None else tuple(prompts.shape)
                raise ValueError(
                    f"image of shape {tuple(image.shape)} needs prompts (N, {self.prompt_channels}, *S), got {got}"
                )
            image = torch.cat([image, prompts.to(image.dtype)], dim=1)
        with _features_off(self.model):
            out = self.model(image.to(self.dtype))
        probabilities = torch.softmax(out.logits.float(), dim=1)
        if not self.uncertainty_names:
            return (probabilities,)
        spatial = image.shape[2:]
        maps = [
            self._to_input_grid(out.uncertainty[name].float(), stride, spatial)
            for name, stride in zip(self.uncertainty_names, self.uncertainty_strides)
        ]
        return probabilities, torch.cat(maps, dim=1).clamp(0.0, 1.0)  # (N, U, *S)

    def _to_input_grid(self, u: Tensor, stride: tuple[int, ...], spatial: torch.Size) -> Tensor:
        """(N, 1, *ceil(S / stride)) -> (N, 1, *S): linear upsampling by the stride, then a crop to S."""
        if any(s != 1 for s in stride):
            u = F.interpolate(
                u, scale_factor=tuple(float(s) for s in stride), mode=_LINEAR[self.spatial_dims],
                align_corners=False,
            )  # fmt: skip
        return u[(slice(None), slice(None), *(slice(0, n) for n in spatial))]


@contextlib.contextmanager
def _features_off(model: nn.Module) -> Iterator[None]:
    """Switch off the model's PDCR taps and CCDC embedding for one forward pass, then restore the flag."""
    if not hasattr(model, "return_features"):
        yield
        return
    previous = model.return_features
    model.return_features = False
    try:
        yield
    finally:
        model.return_features = previous
