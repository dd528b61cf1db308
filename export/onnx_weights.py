"""Training weights back from an exported ONNX file, for a model whose training checkpoint is gone.

The bundled models were exported from checkpoints that were not kept; fine-tuning them
(``medcl-train --init-from brain-tissue-3d``) needs a torch ``state_dict``. The ONNX graph holds every
weight the inference path uses, some renamed or transformed by the exporter:

- convolutions, transposed convolutions and heads keep their parameter names;
- instance-norm scales and shifts become constants of ``Mul``/``Add`` nodes (``AxiswiseNorm``);
- a BatchNorm (the UAFR blocks' gate) is folded into the convolution before it: only W' = W g / sqrt(v + e)
  and b' = beta - m g / sqrt(v + e) are left, not g, beta, m, v.

Which initializer is which parameter is found, not assumed: the same architecture, its parameters set to
distinct random values (each BatchNorm to the identity with a random shift), is exported with the same
exporter, and each of its initializers is matched by value to the parameter it came from; the two graphs
must have the same nodes in the same order, so a position in one is the same weight in the other.

A folded BatchNorm gets back W' as its convolution's weight and, as its own statistics, the mean and
variance of that convolution's output over the given calibration images, with g = sqrt(v + e) and
beta = b' + m: in eval mode this reproduces the ONNX model exactly, and in train mode (batch statistics)
it starts from nearly the same gate as in eval mode. Layers the graph does not hold (the deep-supervision
heads, used only by the training loss) keep the fresh, seeded initialisation; :class:`Recovery` lists them.

``python -m export.onnx_weights MODEL.onnx CONFIG.yaml --data DATASET -o WEIGHTS.pt`` writes a weights file
(``training.init_weights.WEIGHTS_FORMAT``) and prints how closely the recovered network matches the file.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import sys
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = ["Recovery", "calibrate_batchnorms", "fit_heads_not_in_graph", "recover_state_dict"]

_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


@dataclass(frozen=True)
class Recovery:
    """What :func:`recover_state_dict` did: ``from_graph`` parameter names copied from the file,
    ``folded`` BatchNorm modules whose convolution carried them, ``not_in_graph`` parameters left at their
    fresh initialisation (not used by inference)."""

    from_graph: tuple[str, ...]
    folded: tuple[str, ...]
    not_in_graph: tuple[str, ...]


def recover_state_dict(onnx_path: str | Path, model: nn.Module, spec: Any) -> Recovery:
    """Copy the weights of ``onnx_path`` into ``model`` (same architecture, built from the model's config),
    in place. Each folded BatchNorm is left as the identity with the folded shift as its bias; run
    :func:`calibrate_batchnorms` next. ValueError when the graphs or the values do not line up."""
    import onnx
    from onnx import numpy_helper

    from export.onnx import to_onnx

    target = onnx.load(str(onnx_path))
    sample = (spec.training.get("export") or {}).get("sample_shape")
    tagged = _tagged_copy(model)
    with tempfile.TemporaryDirectory() as folder:
        probe_path = Path(folder) / "probe.onnx"
        to_onnx(tagged, probe_path, spec=spec, sample_shape=sample)
        probe = onnx.load(str(probe_path))
    probe_nodes, _ = _nodes_without_aliases(probe.graph)
    target_nodes, target_alias = _nodes_without_aliases(target.graph)
    ops_probe = [n.op_type for n in probe_nodes]
    ops_target = [n.op_type for n in target_nodes]
    if ops_probe != ops_target:
        raise ValueError(
            f"{onnx_path}: its graph ({len(ops_target)} nodes) is not what this architecture exports "
            f"({len(ops_probe)} nodes); build the network from the model's own training config"
        )
    target_values = {t.name: numpy_helper.to_array(t) for t in target.graph.initializer}
    probe_values = {t.name: numpy_helper.to_array(t) for t in probe.graph.initializer}
    probe_to_target = _initializers_by_position(
        probe_nodes, {t.name for t in probe.graph.initializer}, target_nodes, set(target_values), target_alias
    )

    params = dict(tagged.named_parameters())
    by_size: dict[int, list[str]] = {}
    for name, value in params.items():
        by_size.setdefault(value.numel(), []).append(name)
    own = dict(model.named_parameters())
    copied: set[str] = set()
    for probe_name, array in probe_values.items():
        match = _matching_parameter(array, by_size.get(array.size, []), params)
        target_array = target_values[probe_to_target[probe_name]]
        if match is None:
            # Not a parameter (a shape, an epsilon, a scale): it must be the same in both graphs.
            if array.shape != target_array.shape or not np.array_equal(array, target_array):
                raise ValueError(f"{onnx_path}: constant {probe_name} differs from this architecture's")
            continue
        with torch.no_grad():
            own[match].copy_(torch.from_numpy(target_array.copy()).reshape(own[match].shape))
        copied.add(match)
    folded = []
    for name, module in model.named_modules():
        if isinstance(module, _BATCHNORMS) and f"{name}.bias" in copied:
            # The probe's BatchNorm was the identity with its bias as shift, so the folded shift b' matched the
            # bias; the scale g, never seen alone, is the identity's until calibration.
            with torch.no_grad():
                module.weight.fill_(1.0)
                module.running_mean.zero_()
                module.running_var.fill_(1.0 - module.eps)
            copied.add(f"{name}.weight")
            folded.append(name)
    missing = tuple(sorted(set(own) - copied))
    return Recovery(from_graph=tuple(sorted(copied)), folded=tuple(folded), not_in_graph=missing)


def calibrate_batchnorms(model: nn.Module, folded: Sequence[str], images: Iterable[torch.Tensor]) -> None:
    """Give each folded BatchNorm (left as the identity by :func:`recover_state_dict`) the statistics of its
    input over ``images`` ((N, C, *S) batches), keeping its eval-mode output unchanged."""
    modules = dict(model.named_modules())
    sums: dict[str, list[torch.Tensor]] = {name: [] for name in folded}

    def hook(name: str):
        def collect(_module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
            x = inputs[0].detach().double()
            # (N, C, *S) -> per channel: count, sum, sum of squares
            flat = x.transpose(0, 1).reshape(x.shape[1], -1)
            sums[name].append(
                torch.stack([flat.new_full((x.shape[1],), flat.shape[1]), flat.sum(1), (flat**2).sum(1)])
            )

        return collect

    handles = [modules[name].register_forward_pre_hook(hook(name)) for name in folded]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in images:
                model(batch)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    for name in folded:
        if not sums[name]:
            raise ValueError("calibrate_batchnorms: no images were given")
        count, total, squares = torch.stack(sums[name]).sum(0)
        mean = total / count
        var = (squares / count - mean**2).clamp(min=0.0)
        bn = modules[name]
        with torch.no_grad():
            shift = bn.bias.double().clone()  # b' of the identity-scaled BatchNorm
            bn.running_mean.copy_(mean)
            bn.running_var.copy_(var)
            bn.weight.copy_(torch.sqrt(var + bn.eps))
            bn.bias.copy_(shift + mean)


def fit_heads_not_in_graph(
    model: nn.Module,
    cases: Sequence[tuple[torch.Tensor, torch.Tensor]],
    *,
    steps: int = 300,
    lr: float = 0.05,
) -> list[float]:
    """Fit the deep-supervision heads (1x1 convs the graph lacks) to the frozen network's features: each one a
    linear classifier of its decoder stage's output, trained with the training loss (CE + Dice) on ``cases``
    (image (N, C, *S) with every size a multiple of the divisor, labels (N, *S) int64). Left at random, they
    would send large gradients into the recovered decoder at the start of a fine-tuning run. Returns each
    head's final loss."""
    from training.losses.segmentation import ce_dice_loss, downsample_labels

    heads = list(getattr(model, "deep_supervision_heads", []))
    if not heads:
        return []
    features: list[list[torch.Tensor]] = [[] for _ in heads]
    handles = [
        head.register_forward_pre_hook(lambda _m, inputs, j=j: features[j].append(inputs[0].detach()))
        for j, head in enumerate(heads)
    ]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for image, _ in cases:
                model(image)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    losses = []
    for j, head in enumerate(heads):
        targets = [downsample_labels(label, f.shape[2:]) for f, (_, label) in zip(features[j], cases)]
        optimizer = torch.optim.Adam(head.parameters(), lr=lr)
        for _ in range(steps):
            optimizer.zero_grad()
            loss = sum(ce_dice_loss(head(f), t).loss for f, t in zip(features[j], targets)) / len(targets)
            loss.backward()
            optimizer.step()
        losses.append(float(loss.detach()))
    return losses


def _tagged_copy(model: nn.Module) -> nn.Module:
    """A copy whose every parameter holds distinct random values and every BatchNorm is the identity (unit
    scale, zero mean, variance 1 - eps) plus a random shift, so that folding leaves the values findable."""
    tagged = copy.deepcopy(model).cpu().float()
    generator = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for parameter in tagged.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator))
        for module in tagged.modules():
            if isinstance(module, _BATCHNORMS):
                module.weight.fill_(1.0)
                module.running_mean.zero_()
                module.running_var.fill_(1.0 - module.eps)
    return tagged


def _matching_parameter(
    array: np.ndarray, candidates: list[str], params: dict[str, torch.Tensor]
) -> str | None:
    flat = np.asarray(array, dtype=np.float64).ravel()
    for name in candidates:
        value = params[name].detach().double().numpy().ravel()
        # A folded scale of 1/sqrt(1 - eps + eps) may round by an ulp; random values never come this close.
        if np.allclose(flat, value, rtol=1e-5, atol=1e-6):
            return name
    return None


def _nodes_without_aliases(graph: Any) -> tuple[list[Any], dict[str, str]]:
    """The graph's nodes without the Identity nodes that only rename an initializer, and those names ->
    the initializer's. The exporter stores equal weights once and names the copies by Identity nodes (a
    fresh network's zero biases, say); the probe's random weights are all different, so it has none."""
    initializers = {t.name for t in graph.initializer}
    alias: dict[str, str] = {}
    nodes = []
    for node in graph.node:
        source = node.input[0] if node.op_type == "Identity" and node.input else None
        if source is not None and (source in initializers or source in alias):
            alias[node.output[0]] = alias.get(source, source)
        else:
            nodes.append(node)
    return nodes, alias


def _initializers_by_position(
    probe_nodes: list[Any],
    probe_inits: set[str],
    target_nodes: list[Any],
    target_inits: set[str],
    target_alias: dict[str, str],
) -> dict[str, str]:
    """probe initializer name -> the target's initializer at the same place (node index, input slot)."""
    mapping: dict[str, str] = {}
    for node_p, node_t in zip(probe_nodes, target_nodes):
        for name_p, name_t in zip(node_p.input, node_t.input):
            if name_p in probe_inits:
                name_t = target_alias.get(name_t, name_t)
                if name_t not in target_inits:
                    raise ValueError(f"initializer {name_p} of the probe is a computed value in the file")
                if mapping.setdefault(name_p, name_t) != name_t:
                    raise ValueError(f"initializer {name_p} maps to two initializers of the file")
    unused = probe_inits - set(mapping)
    if unused:
        raise ValueError(f"initializers used by no node: {sorted(unused)[:3]}")
    return mapping


# ---------------------------------------------------------------------------------------------- command


def _calibration_cases(
    cfg: Any, spatial_dims: int, divisor: Sequence[int], seed: int, cache: Path
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The training cases of ``cfg``'s split, preprocessed as training does and cut to multiples of the
    divisor: (image (N, C, *S), labels (N, *S) int64), whole volumes (3D) or every tenth slice (2D)."""
    from training.data import prepare_dataset

    _, train_cases, _ = prepare_dataset(cfg.data, spatial_dims=spatial_dims, seed=seed, cache_dir=cache)
    cases = []
    for case in train_cases:
        image = torch.from_numpy(np.array(case.image, dtype=np.float32))  # (C, D, H, W), a copy of the cache
        label = torch.from_numpy(np.array(case.label, dtype=np.int64))  # (D, H, W)
        if spatial_dims == 3:
            image, label = image[None], label[None]
        else:
            image, label = image[:, ::10].transpose(0, 1), label[::10]  # (D/10, C, H, W), (D/10, H, W)
        box = tuple(slice(0, (n // k) * k) for n, k in zip(label.shape[1:], divisor))
        cases.append(
            (image[(slice(None), slice(None), *box)].contiguous(), label[(slice(None), *box)].contiguous())
        )
    return cases


def _compare(model: nn.Module, onnx_path: Path, image: torch.Tensor) -> float:
    """max |diff| of the class probabilities between the torch network (eval) and ONNX Runtime."""
    import onnxruntime as ort

    from training.models.inference_wrapper import InferenceWrapper

    wrapper = InferenceWrapper(copy.deepcopy(model).eval())
    with torch.no_grad():
        ours = wrapper(image)[0].numpy()
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    theirs = session.run(["probabilities"], {"image": image.numpy()})[0]
    return float(np.abs(ours - theirs).max())


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m export.onnx_weights",
        description="Recover a training weights file from an exported ONNX model (see the module docstring).",
    )
    parser.add_argument("model", type=Path, help="the .onnx file")
    parser.add_argument("config", type=Path, help="the training config (recipe) the model was trained with")
    parser.add_argument("--data", type=Path, required=True, help="dataset root for the BatchNorm statistics")
    parser.add_argument("-o", "--output", type=Path, required=True, help="weights file to write (.pt)")
    args = parser.parse_args(argv)

    from napari_medcl.onnx_session import check_model_bytes
    from training.building import build_model
    from training.config import config_to_dict, load_config
    from training.init_weights import save_weights_file

    spec = check_model_bytes(args.model.read_bytes(), args.model)
    cfg = load_config(args.config, [f"data.root={args.data}", "data.num_workers=0"])
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg, spec.in_channels, spec.num_classes)
    recovery = recover_state_dict(args.model, model, spec)
    with tempfile.TemporaryDirectory() as cache:  # the dataset folder is left as it was
        cases = _calibration_cases(cfg, spec.spatial_dims, spec.divisor, cfg.train.seed, Path(cache))
    calibrate_batchnorms(model, recovery.folded, [image for image, _ in cases])
    head_losses = fit_heads_not_in_graph(model, cases)
    # a crop of up to twice the patch of the last training case (its sizes stay multiples of the divisor)
    probe = cases[-1][0][(slice(0, 1), slice(None), *(slice(0, 2 * p) for p in spec.patch_size))]
    difference = _compare(model, args.model, probe.contiguous())
    sha = hashlib.sha256(args.model.read_bytes()).hexdigest()
    notes = (
        f"recovered from {args.model.name} (sha256 {sha}) by export/onnx_weights.py: {len(recovery.from_graph)} "
        f"parameters from the graph; folded BatchNorms {', '.join(recovery.folded) or 'none'} given the "
        f"statistics of their input over the training cases of {cfg.data.root} (fold {cfg.data.fold}); "
        f"not in the graph: {', '.join(recovery.not_in_graph) or 'none'}, fitted as linear classifiers of the "
        f"frozen network's features on the same cases (CE + Dice per head: "
        f"{', '.join(f'{v:.3f}' for v in head_losses) or '-'}); "
        f"max |probability difference| vs ONNX Runtime on a {list(probe.shape)} crop: {difference:.2e}"
    )
    out_cfg = config_to_dict(cfg)
    out_cfg["data"]["root"] = str(load_config(args.config).data.root)  # the recipe's, not this machine's
    save_weights_file(args.output, model.state_dict(), config=out_cfg, spec=spec.to_dict(), notes=notes)
    print(notes)
    print(f"wrote {args.output} ({args.output.stat().st_size} bytes)")
    return 0 if difference < 1e-4 else 1


if __name__ == "__main__":
    sys.exit(main())
