"""The ModelSpec of a network: what training stores in every checkpoint and export embeds in the ONNX file.

:func:`spec_for_model` is the one place a spec is made from a network (channels, classes, divisor and UAFR
map names come from the network itself); :func:`run_spec` fills in what a training run knows besides (the
dataset's class names, spacing and normalisation, the method and its validation result).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from napari_medcl.spec import ModelSpec, SpecError, default_classes
from training.config import TrainConfig, config_to_dict

__all__ = ["carried_error_model", "method_name", "run_spec", "spec_for_model"]


def spec_for_model(
    model: nn.Module,
    *,
    name: str,
    patch_size: Sequence[int],
    class_names: Sequence[str] | None = None,
    class_colors: Sequence[str] | None = None,
    spacing: Sequence[float] | None = None,
    normalization: dict[str, Any] | None = None,
    nonzero_is_foreground: bool = False,
    training: dict[str, Any] | None = None,
    training_profile: dict[str, Any] | None = None,
    prompts: dict[str, Any] | None = None,
    error_model: dict[str, Any] | None = None,
) -> ModelSpec:
    """A ModelSpec for ``model``: channels, classes, divisor and UAFR map names from the network; the rest
    as given (class names default to background, class1, ...; normalisation to z-score; no training-data
    profile). ``prompts``: the prompt channels' encoding (``PromptEncoding.to_dict``) of a network whose last
    input channels are prompt channels; ``in_channels`` then counts the image's channels only.
    ``error_model``: the error map (``ErrorModel.to_dict``), None for none."""
    k = int(model.num_classes)
    names = (
        list(class_names) if class_names is not None else ["background", *(f"class{i}" for i in range(1, k))]
    )
    if len(names) != k:
        raise SpecError(f"{len(names)} class names given for a network with {k} classes")
    prompt_channels = len(prompts["channels"]) if prompts else 0
    if prompt_channels >= int(model.in_channels):
        raise SpecError(f"{prompt_channels} prompt channels for a network with {model.in_channels} inputs")
    return ModelSpec(
        name=name,
        spatial_dims=int(model.spatial_dims),
        in_channels=int(model.in_channels) - prompt_channels,
        classes=default_classes(names, None if class_colors is None else list(class_colors)),
        patch_size=tuple(int(p) for p in patch_size),
        divisor=tuple(int(d) for d in model.divisor),
        spacing=None if spacing is None else tuple(float(s) for s in spacing),
        normalization=dict(normalization or {"kind": "zscore"}),
        uncertainty_maps=tuple(model.uncertainty_names),
        nonzero_is_foreground=nonzero_is_foreground,
        training=dict(training or {}),
        training_profile=training_profile,
        prompts=prompts,
        error_model=error_model,
    )


def carried_error_model(start_spec: Mapping[str, Any] | None) -> tuple[dict[str, Any] | None, str | None]:
    """(the error map a run started from ``start_spec`` carries into its own spec, one line for its log).

    Only the intensity consensus is carried: nothing in it is fitted, so it is the same map for the
    fine-tuned network, but its figures were measured on the starting network and are kept as that model's
    (``figures["start_model"]``), never as the new one's. A fitted error map is not carried: it was fitted to
    the starting network's own signals, and would be miscalibrated for the new weights."""
    from napari_medcl.error_model import ErrorModel, ErrorModelError

    data = (start_spec or {}).get("error_model")
    if data is None:
        return None, None
    name = (start_spec or {}).get("name") or "the starting model"
    try:
        start = ErrorModel.from_dict(data)
    except ErrorModelError as error:
        return None, f"error map: {name}'s cannot be read ({error}); the new model has none"
    if not start.is_consensus:
        return None, (
            f"error map: {name}'s is fitted to its own network's signals and is not carried; fit one for "
            "the new model with medcl-calibrate --error-case"
        )
    measured = {k: start.figures[k] for k in ("auroc", "ece") if k in start.figures}
    # nothing in a consensus is fitted: it is carried whole, only its figures become the start model's
    carried = start.with_figures({"start_model": {"name": name, **measured}})
    return carried.to_dict(), (
        f"error map: the intensity consensus carried from {name} (nothing fitted; its figures are {name}'s)"
    )


def run_spec(
    cfg: TrainConfig,
    info: Any,
    model: nn.Module,
    patch_size: Sequence[int],
    *,
    best: dict[str, Any],
    epochs: int,
    profile: dict[str, Any] | None = None,
    init: dict[str, Any] | None = None,
    error_model: dict[str, Any] | None = None,
) -> ModelSpec:
    """The spec of the network a run trains on the dataset ``info`` describes (training.data's DatasetInfo):
    ``best`` is the run's best validation so far ({"epoch", "mean_dice"}), ``epochs`` the epochs done,
    ``profile`` the training cases' training-data profile (``training.data.profile.dataset_profile``),
    ``init`` the weights the run started from (``training.init_weights``; kept under ``training.init_from``),
    ``error_model`` the error map it carries (:func:`carried_error_model`)."""
    import napari_medcl
    from training.prompt_training import prompt_encoding

    d = cfg.model.spatial_dims
    encoding = prompt_encoding(cfg.model.prompts, len(info.class_names))
    spacing = getattr(info, "spacing", None)
    if spacing is not None:
        spacing = list(spacing)[-d:]
    return spec_for_model(
        model,
        name=cfg.name or f"{getattr(info, 'name', 'dataset')}-{cfg.model.name}-{d}d",
        patch_size=patch_size,
        class_names=list(info.class_names),
        spacing=spacing,
        normalization=getattr(info, "normalization", None),
        nonzero_is_foreground=bool(getattr(info, "nonzero_is_foreground", False)),
        training={
            "method": method_name(cfg),
            "uafr": cfg.model.uafr.enabled,
            "pdcr": config_to_dict(cfg.loss.pdcr) if cfg.loss.pdcr.enabled else None,
            "ccdc": config_to_dict(cfg.loss.ccdc) if cfg.loss.ccdc.enabled else None,
            "dataset": getattr(info, "name", str(cfg.data.root)),
            "metrics": {"val_mean_dice": best["mean_dice"], "best_epoch": best["epoch"], "epochs": epochs},
            "code_version": napari_medcl.__version__,
            **({"init_from": dict(init)} if init else {}),
            **({"prompts": config_to_dict(cfg.model.prompts)} if encoding is not None else {}),
        },
        training_profile=profile,
        prompts=None if encoding is None else encoding.to_dict(),
        error_model=error_model,
    )


def method_name(cfg: TrainConfig) -> str:
    """The trained method in one word, e.g. ``unet3d+uafr+rf-pdcr+ccdc``."""
    parts = [f"{cfg.model.name}{cfg.model.spatial_dims}d"]
    uafr = cfg.model.uafr
    if uafr.enabled:
        # SE / CBAM at the UAFR sites, or UAFR without F, are other methods (paper A, Tables VIII and IX a)
        parts.append(uafr.block if uafr.block != "uafr" else "uafr" if uafr.use_f else "uafr-nof")
    if cfg.loss.pdcr.enabled:
        parts.append(f"{cfg.loss.pdcr.mode}-pdcr")
    if cfg.loss.ccdc.enabled:
        parts.append("ccdc")
    if cfg.model.prompts.enabled:
        parts.append("prompts")
    return "+".join(parts)
