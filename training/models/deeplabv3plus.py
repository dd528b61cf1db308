"""DeepLabV3+ (2D) with a ResNet encoder (output stride 16), ASPP, the v3+ decoder, optional UAFR and CCDC head.

Encoder: ResNet v1.5 (stride on the 3x3 conv), ``encoder_depth`` 18/34 (basic blocks) or 50/101 (bottlenecks);
**default 50**, the usual DeepLabV3+ backbone and the closest in capacity to the paper's aligned Xception-65.
The last stage is dilated (stride 1, dilation 2), so the encoder output has stride 16. Module names follow
torchvision's ResNet (``conv1``, ``bn1``, ``layer1``.. with ``conv1/bn1/.../downsample``), so a local
torchvision ResNet state dict (its ``fc.*`` classifier is ignored) loads through ``encoder_weights``.

Names and true strides (computed, see ``model.tap_info``):
    taps: ``stem`` (conv7x7/2 + norm + ReLU, stride 2), ``encoder1`` (layer1, stride 4), ``encoder2`` (8),
    ``encoder3`` (16), ``encoder4`` (dilated layer4, 16), ``lowlevel`` (encoder1 projected to 48 ch, stride 4),
    ``decoder`` (output of the decoder convs, stride 4: the feature the classifier and projection head read).
    UAFR sites: ``stem``, ``encoder1`` .. ``encoder4``, ``lowlevel``, ``concat`` (the ASPP+low-level concat
    before the decoder convs); none inside ASPP.

Mapping to the paper's Xception places (methods.md section 2): the paper puts UAFR after x1/x2 (the stem
convs, stride 2) -> our ``stem``; after the exit-flow conv3/conv4/conv5 (end of the encoder, stride 16) -> our
``encoder4``; on the 48-ch projected low-level feature -> ``lowlevel``; on the 304-ch concat -> ``concat``.
The paper has none in Xception blocks 1-3 (strides 4, 8, 16), our ``encoder1``..``encoder3``. ``uafr=True``
follows the brief (every encoder stage too); the paper's exact placement is
``uafr_layers=["stem", "encoder4", "lowlevel", "concat"]``.

The ASPP image-pooling branch has no norm (a 1x1 map cannot be batch- or instance-normalised at batch 1).
Any input size works: zero-padded at the high end to a multiple of 16, outputs cropped back.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from training.models.attention import create_attention
from training.models.blocks import ConvNormAct, conv, crop_to_grid, dropout, max_pool, norm, pad_to_multiple
from training.models.output import ProjectionInput, SegmentationOutput, TapInfo
from training.models.receptive_field import Geometry, propagate_geometry
from training.models.registry import register_model
from training.models.unet import ProjectionHead, init_conv_weights, resolve_uafr_sites

__all__ = ["ASPP", "DeepLabV3Plus", "ResNetEncoder", "load_encoder_weights"]

OUTPUT_STRIDE = 16
_RESNET_LAYOUT = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
}


class _Residual(nn.Module):
    """Shared residual logic: relu(main(x) + shortcut(x))."""

    downsample: nn.Module | None

    def _shortcut(self, x: Tensor) -> Tensor:
        return x if self.downsample is None else self.downsample(x)

    def propagate_geometry(self, geometry: Geometry) -> Geometry:
        main = geometry
        for layer in self._main_layers():
            main = propagate_geometry(layer, main)
        short = geometry if self.downsample is None else propagate_geometry(self.downsample, geometry)
        return main.merge(short)


class BasicBlock(_Residual):
    expansion = 1

    def __init__(self, sd: int, in_ch: int, width: int, stride: int, dilation: int, norm_kind: str):
        super().__init__()
        self.conv1 = conv(sd, in_ch, width, 3, stride, dilation, bias=False)
        self.bn1 = norm(norm_kind, sd, width)
        self.conv2 = conv(sd, width, width, 3, 1, dilation, bias=False)
        self.bn2 = norm(norm_kind, sd, width)
        self.relu = nn.ReLU()
        self.downsample = _downsample(sd, in_ch, width, stride, norm_kind)

    def _main_layers(self) -> list[nn.Module]:
        return [self.conv1, self.conv2]

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + self._shortcut(x))


class Bottleneck(_Residual):
    expansion = 4

    def __init__(self, sd: int, in_ch: int, width: int, stride: int, dilation: int, norm_kind: str):
        super().__init__()
        out_ch = width * self.expansion
        self.conv1 = conv(sd, in_ch, width, 1, bias=False)
        self.bn1 = norm(norm_kind, sd, width)
        self.conv2 = conv(sd, width, width, 3, stride, dilation, bias=False)
        self.bn2 = norm(norm_kind, sd, width)
        self.conv3 = conv(sd, width, out_ch, 1, bias=False)
        self.bn3 = norm(norm_kind, sd, out_ch)
        self.relu = nn.ReLU()
        self.downsample = _downsample(sd, in_ch, out_ch, stride, norm_kind)

    def _main_layers(self) -> list[nn.Module]:
        return [self.conv1, self.conv2, self.conv3]

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + self._shortcut(x))


def _downsample(sd: int, in_ch: int, out_ch: int, stride: int, norm_kind: str) -> nn.Module | None:
    if stride == 1 and in_ch == out_ch:
        return None
    return nn.Sequential(conv(sd, in_ch, out_ch, 1, stride, bias=False), norm(norm_kind, sd, out_ch))


class ResNetEncoder(nn.Module):
    """ResNet with output stride 16: stem (stride 2) -> maxpool (4) -> layer1 (4), layer2 (8), layer3 (16),
    layer4 (dilated, 16). ``forward(x)`` -> [stem, layer1, layer2, layer3, layer4] feature maps."""

    def __init__(
        self, spatial_dims: int, in_channels: int, depth: int = 50, width: int = 64, norm_kind="batch"
    ):
        super().__init__()
        if depth not in _RESNET_LAYOUT:
            raise ValueError(f"encoder_depth must be one of {sorted(_RESNET_LAYOUT)}, got {depth!r}")
        kind, counts = _RESNET_LAYOUT[depth]
        block = BasicBlock if kind == "basic" else Bottleneck
        sd = spatial_dims
        self.depth, self.width, self.in_channels = depth, width, in_channels
        self.conv1 = conv(sd, in_channels, width, 7, 2, bias=False)
        self.bn1 = norm(norm_kind, sd, width)
        self.relu = nn.ReLU()
        self.maxpool = max_pool(sd, 3, 2, 1)
        self.channels = [width] + [width * 2**i * block.expansion for i in range(4)]
        in_ch = width
        layers = []
        for i, (count, stride, dilation) in enumerate(zip(counts, (1, 2, 2, 1), (1, 1, 1, 2))):
            blocks = []
            for b in range(count):
                blocks.append(block(sd, in_ch, width * 2**i, stride if b == 0 else 1, dilation, norm_kind))
                in_ch = width * 2**i * block.expansion
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = layers

    def stem(self, x: Tensor) -> Tensor:
        """(B, C_in, H, W) -> (B, width, H/2, W/2)."""
        return self.relu(self.bn1(self.conv1(x)))

    def stage(self, index: int, x: Tensor) -> Tensor:
        """Residual stage ``index`` (1-4); stage 1 starts with the max-pool."""
        if index == 1:
            x = self.maxpool(x)
        return getattr(self, f"layer{index}")(x)

    def stem_geometry(self, geometry: Geometry) -> Geometry:
        return propagate_geometry(self.conv1, geometry)

    def stage_geometry(self, index: int, geometry: Geometry) -> Geometry:
        if index == 1:
            geometry = propagate_geometry(self.maxpool, geometry)
        return propagate_geometry(getattr(self, f"layer{index}"), geometry)

    def forward(self, x: Tensor) -> list[Tensor]:
        feats = [self.stem(x)]
        for index in range(1, 5):
            feats.append(self.stage(index, feats[-1]))
        return feats


def load_encoder_weights(encoder: ResNetEncoder, path: str | Path) -> None:
    """Load a local state dict into ``encoder``; every key and shape must match (``fc.*`` is ignored).

    Accepts a plain state dict or a checkpoint ``{"state_dict": ...}``. Raises FileNotFoundError or a
    ValueError naming the file and the first mismatches.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: encoder weights file not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # any unpickling/format problem is the user's file, say so in one line
        raise ValueError(f"{path}: cannot read encoder weights ({type(exc).__name__}: {exc})") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"{path}: expected a state dict of tensors, got {type(state).__name__}")
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    own = encoder.state_dict()
    problems = [f"missing {k}" for k in own if k not in state]
    problems += [f"unexpected {k}" for k in state if k not in own]
    problems += [
        f"{k} has shape {tuple(state[k].shape)}, encoder needs {tuple(v.shape)}"
        for k, v in own.items()
        if k in state and state[k].shape != v.shape
    ]
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise ValueError(
            f"{path}: weights do not fit the ResNet-{encoder.depth} encoder (width {encoder.width}, "
            f"{encoder.in_channels} input channels): {'; '.join(problems[:3])}{more}"
        )
    encoder.load_state_dict(state, strict=True)


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling: 1x1 conv, 3x3 convs at ``rates``, image pooling; concat -> 1x1 project.

    (B, C_in, *S) -> (B, C_out, *S).
    """

    def __init__(
        self, sd: int, in_ch: int, out_ch: int, rates: Sequence[int], norm_kind: str, dropout_p: float
    ):
        super().__init__()
        act = {"norm_kind": norm_kind, "activation_kind": "relu"}
        self.branches = nn.ModuleList(
            [ConvNormAct(sd, in_ch, out_ch, 1, **act)]
            + [ConvNormAct(sd, in_ch, out_ch, 3, dilation=r, **act) for r in rates]
        )
        self.pooling = nn.Sequential(conv(sd, in_ch, out_ch, 1, bias=True), nn.ReLU())
        self.project = nn.Sequential(
            ConvNormAct(sd, (len(rates) + 2) * out_ch, out_ch, 1, **act), dropout(sd, dropout_p)
        )

    def forward(self, x: Tensor) -> Tensor:
        spatial_axes = tuple(range(2, x.ndim))
        pooled = self.pooling(x.mean(dim=spatial_axes, keepdim=True))  # (B, C_out, 1, 1)
        feats = [branch(x) for branch in self.branches] + [pooled.expand(-1, -1, *x.shape[2:])]
        return self.project(torch.cat(feats, dim=1))

    def propagate_geometry(self, geometry: Geometry) -> Geometry:
        # The global image-pooling branch is left out: see receptive_field.py, "Rule for decoder taps".
        merged = propagate_geometry(self.branches[0], geometry)
        merged = merged.merge(*(propagate_geometry(b, geometry) for b in self.branches[1:]))
        return propagate_geometry(self.project, merged)


@register_model("deeplabv3plus", spatial_dims=(2,))
class DeepLabV3Plus(nn.Module):
    """DeepLabV3+ for 2D images; see the module docstring for names, strides and UAFR places.

    Args (keyword-only): spatial_dims (must be 2), in_channels, num_classes; encoder_depth (18/34/50/101,
    default 50), encoder_width (64 = standard ResNet), encoder_weights (path of a local encoder state dict);
    aspp_channels (256), aspp_rates (6, 12, 18), lowlevel_channels (48), decoder_channels (256), norm ("batch"),
    dropout (0.1, after the ASPP projection and each decoder conv); uafr / uafr_layers / uafr_m / uafr_hidden /
    uafr_kernel_size / uafr_norm / uafr_block / uafr_use_f as in the U-Net; projection_dim (CCDC head on
    ``decoder``, stride 4);
    return_features.
    """

    def __init__(
        self,
        *,
        spatial_dims: int,
        in_channels: int,
        num_classes: int,
        encoder_depth: int = 50,
        encoder_width: int = 64,
        encoder_weights: str | Path | None = None,
        aspp_channels: int = 256,
        aspp_rates: Sequence[int] = (6, 12, 18),
        lowlevel_channels: int = 48,
        decoder_channels: int = 256,
        norm: str = "batch",
        dropout: float = 0.1,
        uafr: bool = False,
        uafr_layers: Sequence[str] | None = None,
        uafr_m: int = 2,
        uafr_hidden: int = 16,
        uafr_kernel_size: int = 3,
        uafr_norm: str = "batch",
        uafr_block: str = "uafr",
        uafr_use_f: bool = True,
        projection_dim: int | None = None,
        return_features: bool = True,
    ):
        super().__init__()
        if spatial_dims != 2:
            raise ValueError(
                f"deeplabv3plus is 2D only, got spatial_dims={spatial_dims!r}; use 'unet' for 3D"
            )
        if in_channels < 1 or num_classes < 1:
            raise ValueError(f"in_channels and num_classes must be >= 1, got {in_channels}, {num_classes}")
        sd = 2
        self.spatial_dims = sd
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.return_features = return_features
        self.embedding_channels = projection_dim
        self.divisor = (OUTPUT_STRIDE,) * sd

        self.encoder = ResNetEncoder(sd, in_channels, encoder_depth, encoder_width, norm)
        act = {"norm_kind": norm, "activation_kind": "relu"}
        self.aspp = ASPP(sd, self.encoder.channels[4], aspp_channels, aspp_rates, norm, dropout)
        self.lowlevel = ConvNormAct(sd, self.encoder.channels[1], lowlevel_channels, 1, **act)
        concat_channels = aspp_channels + lowlevel_channels
        self.decoder = nn.Sequential(
            ConvNormAct(sd, concat_channels, decoder_channels, 3, dropout_p=dropout, **act),
            ConvNormAct(sd, decoder_channels, decoder_channels, 3, dropout_p=dropout, **act),
        )
        self.head = conv(sd, decoder_channels, num_classes, 1)
        self.projection = (
            None if projection_dim is None else ProjectionHead(sd, decoder_channels, int(projection_dim), 3)
        )
        self._channels = {"stem": self.encoder.channels[0]}
        self._channels.update({f"encoder{i}": self.encoder.channels[i] for i in range(1, 5)})
        self._channels.update({"lowlevel": lowlevel_channels, "concat": concat_channels})
        self._channels["decoder"] = decoder_channels
        site_names = ["stem", "encoder1", "encoder2", "encoder3", "encoder4", "lowlevel", "concat"]
        sites = resolve_uafr_sites(uafr, uafr_layers, site_names)
        self.uafr = nn.ModuleDict(
            {
                n: create_attention(
                    uafr_block,
                    self._channels[n],
                    sd,
                    m=uafr_m,
                    hidden=uafr_hidden,
                    kernel_size=uafr_kernel_size,
                    norm=uafr_norm,
                    use_f=uafr_use_f,
                )
                for n in sites
            }
        )
        init_conv_weights(self)
        # Loaded last so the initialisation above does not overwrite the weights.
        if encoder_weights is not None:
            load_encoder_weights(self.encoder, encoder_weights)
        self._geometry = self._compute_geometry()
        self._geometry_without_uafr = self._compute_geometry(include_uafr=False)

    @property
    def uncertainty_names(self) -> list[str]:
        return [name for name, block in self.uafr.items() if block.gives_uncertainty]

    @property
    def uncertainty_strides(self) -> dict[str, tuple[int, ...]]:
        """Stride of each UAFR map (``concat`` lives on the ``decoder`` grid)."""
        strides = self._site_strides()
        return {n: strides[n] for n in self.uncertainty_names}

    def _site_strides(self) -> dict[str, tuple[int, ...]]:
        strides = {n: g.stride for n, g in self._geometry.items()}
        strides["concat"] = strides["decoder"]
        return strides

    @property
    def tap_geometry(self) -> dict[str, Geometry]:
        return dict(self._geometry)

    @property
    def tap_info(self) -> dict[str, TapInfo]:
        return {n: TapInfo(self._channels[n], g.stride, g.receptive_field) for n, g in self._geometry.items()}

    @property
    def tap_info_without_uafr(self) -> dict[str, TapInfo]:
        """``tap_info`` with receptive fields measured as if the UAFR (or SE/CBAM) blocks were absent."""
        return {
            n: TapInfo(self._channels[n], g.stride, g.receptive_field)
            for n, g in self._geometry_without_uafr.items()
        }

    def _site_geometry(self, name: str, g: Geometry, include_uafr: bool = True) -> Geometry:
        return propagate_geometry(self.uafr[name], g) if include_uafr and name in self.uafr else g

    def _compute_geometry(self, include_uafr: bool = True) -> dict[str, Geometry]:
        out: dict[str, Geometry] = {}
        site = self._site_geometry
        g = site("stem", self.encoder.stem_geometry(Geometry.identity(self.spatial_dims)), include_uafr)
        out["stem"] = g
        for i in range(1, 5):
            g = site(f"encoder{i}", self.encoder.stage_geometry(i, g), include_uafr)
            out[f"encoder{i}"] = g
        low = site("lowlevel", propagate_geometry(self.lowlevel, out["encoder1"]), include_uafr)
        out["lowlevel"] = low
        up = propagate_geometry(self.aspp, out["encoder4"]).resize(4, "bilinear", align_corners=False)
        g = site("concat", up.merge(low), include_uafr)
        out["decoder"] = propagate_geometry(self.decoder, g)
        return out

    def forward(self, image: Tensor) -> SegmentationOutput:
        """image (B, C_in, H, W) -> SegmentationOutput; logits at the input size, taps/embedding cropped grids."""
        # Skipped while tracing for export: a traced shape check would be frozen into the graph.
        if not torch.jit.is_tracing() and (image.ndim != 4 or image.shape[1] != self.in_channels):
            raise ValueError(
                f"expected an image (B, {self.in_channels}, H, W), got shape {tuple(image.shape)}"
            )
        spatial = image.shape[2:]
        taps: dict[str, Tensor] = {}
        uncertainty: dict[str, Tensor] = {}

        def site(name: str, x: Tensor, stride: Sequence[int]) -> Tensor:
            if name in self.uafr:
                x, u = self.uafr[name](x)
                if u is not None:
                    uncertainty[name] = crop_to_grid(u, spatial, stride)
            if self.return_features and name in self._geometry:
                taps[name] = crop_to_grid(x, spatial, stride)
            return x

        strides = self._site_strides()
        x = site("stem", self.encoder.stem(pad_to_multiple(image, self.divisor)), strides["stem"])
        feats = []
        for i in range(1, 5):
            x = site(f"encoder{i}", self.encoder.stage(i, x), strides[f"encoder{i}"])
            feats.append(x)
        low = site("lowlevel", self.lowlevel(feats[0]), strides["lowlevel"])
        # ASPP output from stride 16 to the low-level stride 4 (exact: the input is padded to a multiple of 16).
        x = F.interpolate(self.aspp(x), scale_factor=4, mode="bilinear", align_corners=False)
        x = site("concat", torch.cat([x, low], dim=1), strides["concat"])
        x = site("decoder", self.decoder(x), strides["decoder"])
        logits = F.interpolate(self.head(x), scale_factor=4, mode="bilinear", align_corners=False)
        logits = crop_to_grid(logits, spatial, (1, 1))
        projection = None
        if self.projection is not None and self.return_features:
            projection = ProjectionInput(crop_to_grid(x, spatial, strides["decoder"]), self.projection)
        return SegmentationOutput(
            logits=logits, deep_supervision=[], taps=taps, projection=projection, uncertainty=uncertainty
        )
