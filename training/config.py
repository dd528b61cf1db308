"""Training configuration: typed dataclasses with defaults; YAML files and ``--set`` hold only what differs.

A run is described by one :class:`TrainConfig`. A YAML file lists only the keys that differ from the defaults
(``training/configs/*.yaml``), ``--set section.key=value`` overrides single keys with YAML-parsed values
(``--set train.patch_size=[64,64,32]``), and the fully resolved config is written as ``config.yaml`` next to
the run and stored inside every checkpoint. Unknown keys and ill-typed values are errors that name the key
and list the valid ones; nothing is silently ignored.

``config_version`` changes whenever a key is renamed or changes meaning. :func:`migrate` upgrades an older
resolved config (for instance one read back from a checkpoint) where a migration is known, and refuses with
a clear message otherwise.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from napari_medcl.errors import MedclError
from training.data import DataConfig

CONFIG_VERSION = 1

__all__ = [
    "CONFIG_VERSION",
    "CCDCConfig",
    "ConfigError",
    "InitConfig",
    "LossConfig",
    "ModelConfig",
    "OutputConfig",
    "PDCRConfig",
    "PromptsConfig",
    "TrainConfig",
    "TrainSettings",
    "UAFRConfig",
    "config_from_dict",
    "config_notices",
    "config_to_dict",
    "config_to_yaml",
    "diff_configs",
    "load_config",
    "migrate",
    "parse_overrides",
]


class ConfigError(MedclError, ValueError):
    """A config file or override is wrong; the message names the file or key and is meant for one line."""


# ---------------------------------------------------------------------------------------------- sections


@dataclass(frozen=True)
class UAFRConfig:
    """Uncertainty-aware feature re-weighting blocks inside the network (methods.md §2).

    ``layers`` = None puts a block at every site the architecture offers (U-Net: after every encoder and
    decoder stage; DeepLabV3+: stem, encoder1-4, lowlevel, concat); a list picks sites by name. ``m`` is
    the number of softmax channels whose entropy is the uncertainty (2 in the paper), ``hidden`` the width
    of the block's first conv (16 in the paper); None keeps the model's default.
    """

    enabled: bool = False
    layers: tuple[str, ...] | None = None
    m: int | None = None
    hidden: int | None = None
    kernel_size: int | None = None
    norm: Literal["instance", "batch", "group"] | None = None
    # Ablations (paper A): ``block`` "se" / "cbam" put those attention blocks at the same sites instead of
    # UAFR (Table VIII, Fig. 6); ``use_f`` False drops F (Eq. 13), so U is the entropy of softmax(Q) over Q's
    # own channels (Table IX a).
    block: Literal["uafr", "se", "cbam"] = "uafr"
    use_f: bool = True


@dataclass(frozen=True)
class PromptsConfig:
    """Prompt channels (engine (b) of interactive correction): clicks and the previous segmentation as extra
    input channels after the image's, trained with simulated interactions (``training.prompt_training``).

    Encoding (``napari_medcl.prompt_channels``): per foreground class a positive and a negative click map, each
    click a ``click_shape`` (disk or gaussian) of ``click_radius_mm``; with ``previous_segmentation`` the
    previous labels one-hot over the foreground classes. Simulation, per training sample: with probability
    ``no_prompt_fraction`` every prompt channel stays zero (the network keeps segmenting on its own);
    otherwise 1..``max_rounds`` rounds (uniform), each running the network without gradients, clicking the
    voxel deepest inside the largest error component of its prediction (a distance transform; the class
    from the ground truth: a positive click on the true class, or with ``negative_click_prob`` a negative
    click on the wrongly predicted foreground class) and taking the prediction as the previous segmentation;
    then the training pass with gradients sees every click so far. Randomness from the run's generator.
    ``amplitude`` scales every prompt channel (``napari_medcl.prompt_channels``: with a larger one the new input
    weights, which start at zero, reach the prompts in fewer steps); the spec records it.
    """

    enabled: bool = False
    click_radius_mm: float = 2.0
    click_shape: Literal["disk", "gaussian"] = "disk"
    previous_segmentation: bool = True
    max_rounds: int = 3
    no_prompt_fraction: float = 0.25
    negative_click_prob: float = 0.2
    amplitude: float = 1.0

    def __post_init__(self) -> None:
        if self.max_rounds < 1:
            raise ValueError(f"max_rounds must be >= 1, got {self.max_rounds!r}")
        if not self.click_radius_mm > 0:
            raise ValueError(f"click_radius_mm must be > 0, got {self.click_radius_mm!r}")
        if not (self.amplitude > 0 and math.isfinite(self.amplitude)):
            raise ValueError(f"amplitude must be a finite number > 0, got {self.amplitude!r}")
        for name in ("no_prompt_fraction", "negative_click_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)!r}")


@dataclass(frozen=True)
class ModelConfig:
    """Which network and how it is built. ``None`` means "the architecture's default"; options an
    architecture does not have must stay None (``features`` for DeepLabV3+, ``encoder_depth`` for the U-Net).

    ``in_channels`` and ``num_classes`` are not here: they come from the dataset. ``deep_supervision`` None
    is on for the U-Net (nnU-Net) and absent for DeepLabV3+. ``projection_dim`` None gives a 256-d
    projection head when CCDC is enabled and none otherwise.
    """

    name: Literal["unet", "deeplabv3plus"] = "unet"
    spatial_dims: Literal[2, 3] = 3
    # U-Net
    features: tuple[int, ...] | None = None
    n_stages: int | None = None
    base_features: int | None = None
    max_features: int | None = None
    strides: tuple[Any, ...] | None = None
    kernel_sizes: tuple[Any, ...] | None = None
    deep_supervision: bool | None = None
    projection_level: int | None = None  # decoder stage the CCDC projection head reads (1 = full resolution)
    # DeepLabV3+
    encoder_depth: int | None = None
    encoder_weights: str | None = None
    # both
    norm: Literal["instance", "batch", "group"] | None = None
    dropout: float | None = None
    uafr: UAFRConfig = field(default_factory=UAFRConfig)
    projection_dim: int | None = None
    prompts: PromptsConfig = field(default_factory=PromptsConfig)


@dataclass(frozen=True)
class PDCRConfig:
    """Patch-dragsaw contrastive regularisation on intermediate feature maps (methods.md §1.4).

    ``layers`` maps a model tap name to the number of positions N sampled on it (None: the model's middle
    encoder taps with N = 128/64/32 by depth); ``cross_pairs`` lists pairs of taps for the cross-layer term.
    ``mode`` "h" uses the fixed ``patch_sizes``, "rf" each layer's receptive field; ``layer_modes`` sets the
    mode per tap (e.g. RF-PDCR in the encoder and H-PDCR in the decoder, Table VI b).

    ``form`` "paper" is Eq. 9 as printed; "authors" the authors' code, which shifts s / tau by its largest value
    before weighting (not equivalent: it re-weights the negatives, methods.md §1.4). ``reduction`` "mean" over
    (b, i, j) is the 3D code's, "sum" the 2D code's (then ``weight`` must be much smaller for the same strength).
    ``weight`` multiplies the single-layer terms, ``cross_weight`` (None: ``weight``) the cross-layer ones.
    ``rf_includes_uafr`` False measures RF windows without UAFR's gate convolution (the authors' 3D code).

    Ablations: ``affinity`` "ratio" (Eq. 3), "l1" / "l2" (1 - the L1 / L2 norm of the difference of the class
    fractions, Table V a), "dice" (mean Dice of the two patches' masks, Eq. 16 read as the text describes it,
    Table V d), "constant" (``constant_affinity``), "rigid" (1 where the Eq. 3 affinity >= ``rigid_threshold``,
    else 0) and "center" (1 where the centre voxels share a label) (Fig. 5). ``series`` "loss" averages the
    loss over the patch series (the paper's), "ratio" averages the class fractions first (Table V b).
    """

    enabled: bool = False
    layers: dict[str, int] | None = None
    mode: Literal["h", "rf"] = "h"
    layer_modes: dict[str, Literal["h", "rf"]] | None = None
    patch_sizes: tuple[Any, ...] = (5, 7, 9)
    cross_pairs: tuple[tuple[str, str], ...] = ()
    cross_samples: int = 64
    proj_channels: int = 32
    position_encoding: bool = False
    temperature: float = 0.5
    weight: float = 0.01
    cross_weight: float | None = None
    form: Literal["paper", "authors"] = "paper"
    reduction: Literal["mean", "sum"] = "mean"
    rf_includes_uafr: bool = False
    affinity: Literal["ratio", "l1", "l2", "dice", "constant", "rigid", "center"] = "ratio"
    constant_affinity: float = 0.5
    rigid_threshold: float = 0.5
    series: Literal["loss", "ratio"] = "loss"


@dataclass(frozen=True)
class CCDCConfig:
    """Class-confidence and confusion guided dynamic contrastive loss on the projection head (methods.md §3.4).

    The defaults are the paper's (weight 1, tau 0.5, t_h 0.97, 256 queries and 256 negatives per query,
    region-level queries of 4 pixels at stride 1, adaptive threshold and ratio, dynamic negatives); the
    other switches reproduce its ablations (Tables 4-7), see ``training.losses.ccdc``. ``region_size`` 4 is
    the 2x2 region (2x2x2 in 3D), 2 the pixel and its neighbour along the last axis (Table 7's two pixels).
    """

    enabled: bool = False
    weight: float = 1.0
    temperature: float = 0.5
    strong_threshold: float = 0.97
    num_queries: int = 256
    num_negatives: int = 256
    region: bool = True
    region_stride: int = 1
    region_size: Literal[2, 4] = 4
    adaptive_threshold: bool = True
    fixed_threshold: float = 0.97
    adaptive_ratio: bool = True
    fixed_easy_fraction: float = 0.5
    query_mode: Literal["adaptive", "easy", "hard", "easy_to_hard"] = "adaptive"
    negative_sampling: Literal["dynamic", "random", "uniform"] = "dynamic"
    core_fallback: Literal["mean", "topk"] = "mean"
    core_topk: int = 32


@dataclass(frozen=True)
class LossConfig:
    """CE + Dice (on every deep-supervision head the model has, nnU-Net weights) plus the contrastive terms.

    ``batch_dice`` pools the Dice sums over the batch (nnU-Net's choice for 2D).
    """

    ce_weight: float = 1.0
    dice_weight: float = 1.0
    batch_dice: bool = False
    pdcr: PDCRConfig = field(default_factory=PDCRConfig)
    ccdc: CCDCConfig = field(default_factory=CCDCConfig)


@dataclass(frozen=True)
class TrainSettings:
    """Optimisation and run settings; the defaults are nnU-Net's (SGD Nesterov 0.99, lr 1e-2, poly 0.9).

    ``batch_size`` is the global batch: under DDP each of the N processes takes ``batch_size / N`` (it must
    divide). ``patch_size`` = None takes the dataset's median case shape, capped at 128 per axis in 3D and
    256 in 2D, rounded down to the model's divisor. ``amp`` applies on CUDA; on CPU autocast (bf16 only)
    is used when ``amp_cpu`` is true. It is off by default: on a CPU with native bf16 (an AMD EPYC with
    AVX512-BF16) it made the default recipes' training steps 1.5-2x cheaper in CPU time, and a half-length run
    of the 2D default recipe reached the fp32 run's held-out Dice within that run's epoch-to-epoch noise, but no
    full recipe has been trained with it; without native bf16 (AVX512-BF16, AMX-BF16 or ARM BF16) it is
    emulated and usually slower. The run log says which (docs/performance.md, "Training on CPU: bf16").
    ``grad_clip`` <= 0 turns clipping off. ``deterministic`` asks torch for deterministic algorithms (on CPU
    runs are reproducible bit for bit with or without it).
    """

    epochs: int = 1000
    iterations_per_epoch: int = 250
    batch_size: int = 2
    patch_size: tuple[int, ...] | None = None
    optimizer: Literal["sgd", "adam", "adamw"] = "sgd"
    lr: float = 1e-2
    min_lr: float = 0.0
    weight_decay: float = 3e-5
    momentum: float = 0.99
    nesterov: bool = True
    scheduler: Literal["poly", "cosine", "constant"] = "poly"
    poly_exponent: float = 0.9
    warmup_epochs: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: bool = True
    amp_dtype: Literal["bf16", "fp16"] = "bf16"
    amp_cpu: bool = False
    compile: bool = False
    grad_clip: float = 12.0
    seed: int = 0
    deterministic: bool = False
    sync_batchnorm: bool = False
    val_every: int = 1
    val_overlap: float = 0.5
    val_batch_size: int = 2
    val_max_cases: int | None = None

    def __post_init__(self) -> None:
        for name in ("epochs", "iterations_per_epoch", "batch_size", "val_every", "val_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        if self.patch_size is not None and (not self.patch_size or min(self.patch_size) < 1):
            raise ValueError(f"patch_size must be positive integers or null, got {list(self.patch_size)}")
        if not self.lr > 0 or self.min_lr < 0 or self.weight_decay < 0:
            raise ValueError(
                f"lr must be > 0 and min_lr, weight_decay >= 0, got {self.lr}, {self.min_lr}, {self.weight_decay}"
            )
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum!r}")
        if not 0 <= self.warmup_epochs < self.epochs:
            raise ValueError(f"warmup_epochs must be in [0, epochs), got {self.warmup_epochs!r}")
        if not 0 <= self.val_overlap < 1:
            raise ValueError(f"val_overlap must be in [0, 1), got {self.val_overlap!r}")
        if self.val_max_cases is not None and self.val_max_cases < 1:
            raise ValueError(f"val_max_cases must be >= 1 or null, got {self.val_max_cases!r}")


@dataclass(frozen=True)
class InitConfig:
    """Where the network's weights start: ``from_checkpoint`` None trains from scratch; otherwise a training
    checkpoint (``checkpoint_best.pt``), a weights file (``<name>.pt`` beside a bundled model) or a bundled
    model's name, loaded weights-only (``training.init_weights``). Every layer's shape must match this config's
    network. ``reinit_heads`` lets a dataset with another set of classes start only the output heads (the
    1x1 segmentation and deep-supervision heads) afresh; without it a change of classes is an error.

    ``replay`` guards against forgetting (``training.replay``): a dataset folder of the original training data
    whose training cases make up ``replay_fraction`` of every batch, and whose validation cases are scored
    before and after (``summary.json``). ``auto``: on when ``from_checkpoint`` names a bundled model and the
    dataset its recipe trained on is where ``medcl-data build`` puts it (the recipe's ``data.root``, e.g.
    ``data/mni152-tissue``, under the working folder or the source checkout); null: off.

    ``anchor_weight`` (L2-SP, Li et al. 2018) is a second guard: ``anchor_weight / 2 * sum((w - w0) ** 2)``
    over every weight loaded from ``from_checkpoint`` (w0: its loaded value) joins the loss, pulling the
    network back toward where it started (``training.start_weights``); 0 is off. ``weight_mix`` (WiSE-FT,
    Wortsman et al. 2022) is a third: the model the run validates and saves is ``w0 + weight_mix * (w - w0)``,
    between the start and the trained weights, while training itself goes on from the trained ones; 1 is
    off. ``weight_mix_layers`` maps prefixes at a dot boundary (``decoder``, ``uafr.decoder1``, ``head``) to
    their own share in [0, 1] (the longest matching prefix wins; empty: ``weight_mix`` everywhere). ``train_only`` is a fourth: names of the network's parameters, or prefixes ending at a dot boundary
    (``encoder.0``, ``uafr.encoder1``), that the optimizer updates; every other weight keeps its loaded value
    (BatchNorm running statistics still follow the data). Empty (the default): all of them."""

    from_checkpoint: str | None = None
    reinit_heads: bool = False
    replay: str | None = "auto"
    # Half: in benchmarks/adaptation.py --quick (one seed) 0.5 kept more of the clean held-out block than 0.25
    # (-0.074 vs -0.094 mean Dice; none: -0.192) at the same gain on the new scanner's block.
    replay_fraction: float = 0.5
    anchor_weight: float = 0.0
    weight_mix: float = 1.0
    weight_mix_layers: dict[str, float] = field(default_factory=dict)
    train_only: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if isinstance(self.train_only, str) or any(not isinstance(n, str) or not n for n in self.train_only):
            raise ValueError(
                f"train_only must be a list of parameter names or prefixes, got {self.train_only!r}"
            )
        if not 0.0 < self.replay_fraction < 1.0:
            raise ValueError(f"replay_fraction must be in (0, 1), got {self.replay_fraction!r}")
        if not (self.anchor_weight >= 0.0 and math.isfinite(self.anchor_weight)):
            raise ValueError(f"anchor_weight must be a finite number >= 0, got {self.anchor_weight!r}")
        if not 0.0 < self.weight_mix <= 1.0:
            raise ValueError(f"weight_mix must be in (0, 1], got {self.weight_mix!r}")
        layers = self.weight_mix_layers
        if not isinstance(layers, dict) or any(
            not isinstance(k, str)
            or not k
            or isinstance(v, bool)
            or not isinstance(v, (int, float))
            or not 0.0 <= v <= 1.0
            for k, v in layers.items()
        ):
            raise ValueError(
                f"weight_mix_layers must map parameter-name prefixes to shares in [0, 1], got {layers!r}"
            )


@dataclass(frozen=True)
class OutputConfig:
    """Where the run writes: ``config.yaml``, ``train.log``, ``metrics.jsonl``, ``curves.png`` and checkpoints."""

    dir: str = "runs/medcl"


@dataclass(frozen=True)
class TrainConfig:
    """Everything one training run needs. ``name`` (None: ``<dataset>-<model>-<d>d``) becomes the ModelSpec name."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainSettings = field(default_factory=TrainSettings)
    output: OutputConfig = field(default_factory=OutputConfig)
    init: InitConfig = field(default_factory=InitConfig)
    name: str | None = None
    config_version: int = CONFIG_VERSION


# ---------------------------------------------------------------------------------------------- building


def config_from_dict(data: Mapping[str, Any], *, source: str = "config") -> TrainConfig:
    """A :class:`TrainConfig` from a (possibly partial) nested mapping; missing keys take their defaults.

    Raises :class:`ConfigError` naming ``source`` and the dotted key for unknown keys, wrong types and
    values outside a key's choices.
    """
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: the top level must be a mapping of sections, got {type(data).__name__}")
    version = data.get("config_version", CONFIG_VERSION)
    if version != CONFIG_VERSION:
        data = migrate(dict(data), source=source)
    return _build(TrainConfig, data, "", source)


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict (lists, not tuples) of a config dataclass; ``config_from_dict`` reads it back equal."""
    return _plain(dataclasses.asdict(cfg))


def config_to_yaml(cfg: TrainConfig) -> str:
    """The resolved config as YAML text, with a header line saying what it is and one comment line per
    :func:`config_notices` entry (comments, so the file still reads back as the same config)."""
    body = yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=None, width=100)
    notes = "".join(f"# notice: {line}\n" for line in config_notices(cfg))
    return "# napari-medcl resolved training config (every key, defaults included)\n" + notes + body


def config_notices(cfg: TrainConfig) -> list[str]:
    """One line per setting that differs from its default but has no effect in the chosen mode.

    A run warns with these at its start and writes them into ``config.yaml``; a setting left at its default
    is never reported (it was not chosen). The rules follow what each module reads.
    """
    notes: list[str] = []

    def unused(section: Any, prefix: str, names: Sequence[str], why: str) -> None:
        defaults = type(section)()
        for name in names:
            if getattr(section, name) != getattr(defaults, name):
                notes.append(f"{prefix}.{name} has no effect: {why}")

    uafr = cfg.model.uafr
    uafr_options = ("layers", "m", "hidden", "kernel_size", "norm", "block", "use_f")
    if not uafr.enabled:
        unused(uafr, "model.uafr", uafr_options, "model.uafr.enabled is false")
    elif uafr.block != "uafr":
        unused(uafr, "model.uafr", ("m", "hidden", "kernel_size", "norm", "use_f"), f"block is {uafr.block}")
    elif not uafr.use_f:
        unused(uafr, "model.uafr", ("m", "hidden", "kernel_size", "norm"), "use_f is false (no F to build)")

    p = cfg.loss.pdcr
    pdcr_options = [f.name for f in dataclasses.fields(p) if f.name != "enabled"]
    if not p.enabled:
        unused(p, "loss.pdcr", pdcr_options, "loss.pdcr.enabled is false")
    else:
        # modes of the taps named in the config; None layers means the model's defaults, all in ``mode``
        named = list(p.layers or {}) + [n for pair in p.cross_pairs for n in pair]
        modes = {(p.layer_modes or {}).get(n, p.mode) for n in named} or {p.mode}
        if modes == {"rf"}:
            unused(p, "loss.pdcr", ("patch_sizes",), "every tap is in RF mode (windows = receptive fields)")
            unused(p, "loss.pdcr", ("series",), "RF mode has one window per tap, no series to average")
        if "rf" not in modes:
            unused(p, "loss.pdcr", ("rf_includes_uafr",), "no tap is in RF mode")
        elif not uafr.enabled:
            unused(p, "loss.pdcr", ("rf_includes_uafr",), "model.uafr is off, so no block to include")
        if not p.cross_pairs:
            unused(p, "loss.pdcr", ("cross_samples", "proj_channels", "cross_weight"), "cross_pairs is empty")
        if p.affinity != "constant":
            unused(p, "loss.pdcr", ("constant_affinity",), f"affinity is {p.affinity}, not constant")
        if p.affinity != "rigid":
            unused(p, "loss.pdcr", ("rigid_threshold",), f"affinity is {p.affinity}, not rigid")
        if p.affinity in ("dice", "center", "constant"):
            unused(p, "loss.pdcr", ("series",), f"affinity {p.affinity} is not computed from class fractions")
        if p.layer_modes and all(m == p.mode for m in p.layer_modes.values()):
            notes.append(f"loss.pdcr.layer_modes has no effect: every entry equals mode ({p.mode})")

    if cfg.init.from_checkpoint is None:
        unused(
            cfg.init,
            "init",
            ("anchor_weight", "weight_mix", "weight_mix_layers", "train_only"),
            "init.from_checkpoint is null (no start weights)",
        )

    pr = cfg.model.prompts
    if not pr.enabled:
        unused(pr, "model.prompts", [f.name for f in dataclasses.fields(pr) if f.name != "enabled"],
               "model.prompts.enabled is false")  # fmt: skip

    c = cfg.loss.ccdc
    ccdc_options = [f.name for f in dataclasses.fields(c) if f.name != "enabled"]
    if not c.enabled:
        unused(c, "loss.ccdc", ccdc_options, "loss.ccdc.enabled is false")
    else:
        if c.adaptive_threshold:
            unused(c, "loss.ccdc", ("fixed_threshold",), "adaptive_threshold is on")
        if c.query_mode != "adaptive":
            unused(c, "loss.ccdc", ("adaptive_ratio",), f"query_mode is {c.query_mode}, not adaptive")
        if c.adaptive_ratio or c.query_mode != "adaptive":
            unused(
                c, "loss.ccdc", ("fixed_easy_fraction",), "adaptive_ratio is on or query_mode is not adaptive"
            )
        if not c.region:
            unused(c, "loss.ccdc", ("region_stride", "region_size"), "region is false (pixel-level queries)")
        if c.core_fallback != "topk":
            unused(c, "loss.ccdc", ("core_topk",), f"core_fallback is {c.core_fallback}, not topk")
    return notes


def load_config(path: str | Path | None, overrides: Sequence[str] = ()) -> TrainConfig:
    """Read a delta YAML file (or none: defaults only) and apply ``key=value`` overrides, in that order."""
    data: dict[str, Any] = {}
    source = "config"
    if path is not None:
        path = Path(path)
        source = str(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as error:
            where = getattr(error, "problem_mark", None)
            line = f" (line {where.line + 1})" if where is not None else ""
            raise ConfigError(f"{path}: not valid YAML{line}: {getattr(error, 'problem', error)}") from None
        except UnicodeDecodeError:
            raise ConfigError(f"{path}: not a text file") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(
                f"{path}: the top level must be a mapping of sections, got {type(loaded).__name__}"
            )
        data = loaded
    for key, value in parse_overrides(overrides):
        _set_dotted(data, key, value)
    if overrides:
        source = f"{source} with --set overrides"
    return config_from_dict(data, source=source)


def parse_overrides(overrides: Sequence[str]) -> list[tuple[str, Any]]:
    """``["train.lr=1e-3", "train.patch_size=[64,64]"]`` -> ``[("train.lr", 0.001), ...]`` (values YAML-parsed)."""
    parsed = []
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected key=value, e.g. train.lr=0.001")
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError:
            raise ConfigError(f"--set {item!r}: the value is not valid YAML") from None
        parsed.append((key, value))
    return parsed


def diff_configs(a: TrainConfig, b: TrainConfig) -> list[str]:
    """Dotted keys whose values differ between two configs (for resume checks)."""
    out: list[str] = []
    _diff(config_to_dict(a), config_to_dict(b), "", out)
    return out


# Migrations from an older config_version to the next one: {old_version: function(dict) -> dict}.
# Version 1 is the first; when a key is renamed, add `1: _migrate_v1_to_v2` here and bump CONFIG_VERSION.
_MIGRATIONS: dict[int, typing.Callable[[dict[str, Any]], dict[str, Any]]] = {}


def migrate(data: dict[str, Any], *, source: str = "config") -> dict[str, Any]:
    """Upgrade a resolved config dict to :data:`CONFIG_VERSION`, or raise a ConfigError saying why not."""
    version = data.get("config_version", CONFIG_VERSION)
    if not isinstance(version, int) or isinstance(version, bool):
        raise ConfigError(f"{source}: config_version must be an integer, got {version!r}")
    if version > CONFIG_VERSION:
        raise ConfigError(
            f"{source}: config_version {version} is newer than this napari-medcl understands "
            f"({CONFIG_VERSION}); update napari-medcl"
        )
    while version < CONFIG_VERSION:
        step = _MIGRATIONS.get(version)
        if step is None:
            raise ConfigError(
                f"{source}: config_version {version} cannot be migrated to {CONFIG_VERSION}; "
                "retrain, or use the napari-medcl version that wrote it"
            )
        data = step(data)
        version = data["config_version"] = version + 1
    return data


# ---------------------------------------------------------------------------------------------- internals


def _set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = data
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {key}: {'.'.join(parts[: i + 1])} is a value, not a section")
        node = child
    node[parts[-1]] = value


def _build(cls: type, data: Any, prefix: str, source: str) -> Any:
    where = prefix.rstrip(".") or "the top level"
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: {where} must be a mapping, got {_show(data)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in data if k not in fields]
    if unknown:
        raise ConfigError(
            f"{source}: unknown key '{prefix}{unknown[0]}'; valid keys under {where}: {', '.join(fields)}"
        )
    kwargs = {name: _coerce(value, hints[name], f"{prefix}{name}", source) for name, value in data.items()}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as error:
        if isinstance(error, ConfigError):
            raise
        raise ConfigError(f"{source}: {where}: {error}") from None


def _coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    """``value`` checked against the annotation ``tp`` (lists become tuples where a tuple is declared)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return _freeze(value)
    if dataclasses.is_dataclass(tp):
        return _build(tp, {} if value is None else value, f"{key}.", source)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key, source)
            except ConfigError as error:
                errors.append(error)
        raise errors[0] if len(errors) == 1 else _type_error(key, source, value, tp)
    if origin is Literal:
        if value in args and not (isinstance(value, bool) and not any(isinstance(a, bool) for a in args)):
            return value
        raise ConfigError(f"{source}: {key} must be one of {', '.join(map(str, args))}, got {_show(value)}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _type_error(key, source, value, tp)
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _type_error(key, source, value, tp)
    if tp is float:
        if isinstance(value, str):
            # YAML 1.1 reads 1e-3 (no dot) as a string; accept any plain number written that way.
            with contextlib.suppress(ValueError):
                value = float(value.strip())
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
        raise _type_error(key, source, value, tp)
    if tp is str:
        if isinstance(value, str):
            return value
        raise _type_error(key, source, value, tp)
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise _type_error(key, source, value, tp)
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{key}[{i}]", source) for i, v in enumerate(value))
        if origin is tuple and args:
            if len(value) != len(args):
                raise ConfigError(f"{source}: {key} must have {len(args)} items, got {_show(value)}")
            return tuple(_coerce(v, a, f"{key}[{i}]", source) for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        items = [_coerce(v, item, f"{key}[{i}]", source) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, Mapping):
            raise _type_error(key, source, value, tp)
        key_tp, value_tp = args if args else (Any, Any)
        return {
            _coerce(k, key_tp, f"{key} key", source): _coerce(v, value_tp, f"{key}.{k}", source)
            for k, v in value.items()
        }
    if tp is Path and isinstance(value, str):
        return Path(value)
    if isinstance(tp, type):
        if isinstance(value, tp):
            return value
        raise _type_error(key, source, value, tp)
    return value


def _type_error(key: str, source: str, value: Any, tp: Any) -> ConfigError:
    return ConfigError(f"{source}: {key} must be {_type_name(tp)}, got {_show(value)}")


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _type_name(a) for a in args)
    if origin in (tuple, list):
        return f"a list of {_type_name(args[0])}" if args else "a list"
    if origin is dict:
        return f"a mapping of {_type_name(args[0])} to {_type_name(args[1])}" if args else "a mapping"
    if origin is Literal:
        return "one of " + ", ".join(map(str, args))
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    return names.get(tp, getattr(tp, "__name__", str(tp)))


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _freeze(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_freeze(v) for v in value)
    return value


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def _diff(a: Any, b: Any, prefix: str, out: list[str]) -> None:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in dict.fromkeys([*a, *b]):
            _diff(a.get(key), b.get(key), f"{prefix}{key}.", out)
    elif a != b:
        out.append(prefix.rstrip("."))
