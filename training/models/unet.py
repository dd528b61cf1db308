"""nnU-Net-like plain convolutional U-Net, 2D and 3D, with optional UAFR, deep supervision and CCDC projection.

Naming (taps, UAFR sites, ``uafr_layers``): stages are numbered by resolution, 1 = full resolution.
``encoder1`` .. ``encoderN`` are the encoder stage outputs (``encoderN`` is the bottleneck); ``decoderK``
(K = 1 .. N-1) is the decoder stage that works at the resolution of ``encoderK`` and receives its skip, so
``decoder1`` is the full-resolution feature the segmentation head (and the projection head) reads, and
``decoder{N-1}`` is the first one computed after the bottleneck. Dicts are ordered as computed:
encoder1 .. encoderN, decoder{N-1} .. decoder1.

Any input size works: the image is zero-padded at the high end of each axis to a multiple of ``divisor`` (the
product of the strides per axis), and every output is cropped back to the units covering the input
(``ceil(S / stride)``), so logits have the input's size and tap voxel ``i`` keeps its place ``i * stride``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from training.models.attention import create_attention
from training.models.blocks import (
    ConvNormAct,
    as_tuple,
    check_spatial_dims,
    conv,
    crop_to_grid,
    pad_to_multiple,
    transposed_conv,
)
from training.models.output import ProjectionInput, SegmentationOutput, TapInfo
from training.models.receptive_field import Geometry, propagate_geometry
from training.models.registry import register_model

__all__ = ["ProjectionHead", "UNet", "init_conv_weights"]

DEFAULT_STAGES = 6
DEFAULT_MAX_FEATURES = {2: 512, 3: 320}  # nnU-Net's caps


def init_conv_weights(module: nn.Module) -> None:
    """nnU-Net's initialisation: He-normal for LeakyReLU(0.01), zero biases."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
            nn.init.kaiming_normal_(m.weight, a=1e-2)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class ProjectionHead(nn.Sequential):
    """CCDC projection head: conv k (C -> C) -> LeakyReLU -> conv 1 (C -> E), not normalised (the loss does).

    ``forward(x)``: (B, C, *S) -> (B, E, *S). It has no normalisation layer on purpose: instance or batch norm
    would make every output pixel depend on statistics over the whole map, so the gradient of the few pixels
    CCDC takes gradients from would reach every pixel. Without it, the head's output at a pixel depends only
    on the k^d neighbourhood of that pixel, and ``at`` evaluates it there alone, exactly (docs/performance.md,
    "Losses"). LeakyReLU (0.01, the networks' own), not ReLU: at a pixel where every hidden unit is dead a ReLU
    head outputs exactly its bias, zero at initialisation, and the L2 normalisation of a zero vector has a
    1 / eps gradient.
    """

    def __init__(self, spatial_dims: int, channels: int, out_channels: int, kernel_size: int | Sequence[int]):
        super().__init__(
            conv(spatial_dims, channels, channels, kernel_size, bias=True),
            # In place: neither the conv's backward nor the matmul's in ``at`` needs its own output.
            nn.LeakyReLU(0.01, inplace=True),
            conv(spatial_dims, channels, out_channels, 1, bias=True),
        )

    def hidden(self, x: Tensor) -> Tensor:
        """The activation the last 1x1 conv reads: (B, C, *S) -> (B, C, *S)."""
        return self[1](self[0](x))

    def readout(self) -> tuple[Tensor, Tensor]:
        """The last 1x1 conv as a matrix: weight (E, C) and bias (E,); the output is ``weight @ hidden + bias``."""
        last = self[2]
        return last.weight.flatten(1), last.bias

    def at(self, x: Tensor, flat_index: Tensor) -> Tensor:
        """``self(x)`` at chosen pixels only, with gradient: x (B, C, *S), flat_index (...) int64 indices into
        the flattened (B, *S) grid -> (..., E).

        Gathers the k^d neighbourhood of each pixel (zeros outside the grid, as the conv's "same" padding; the
        conv has stride 1 and no dilation) and applies the conv weights as one matmul, so the cost grows with
        the number of pixels, not with the map.
        """
        first = self[0]
        spatial = tuple(x.shape[2:])
        per_image = math.prod(spatial)
        index = flat_index.reshape(-1)
        coords = torch.stack(torch.unravel_index(index % per_image, spatial), dim=-1)  # (P, d)
        # Kernel offsets in the order of the weight's flattened taps (row-major): (k^d, d).
        offsets = torch.cartesian_prod(*[torch.arange(-p, p + 1, device=x.device) for p in first.padding])
        neighbours = coords.unsqueeze(1) + offsets.view(-1, len(spatial)).unsqueeze(0)  # (P, k^d, d)
        size = torch.tensor(spatial, device=x.device)
        inside = ((neighbours >= 0) & (neighbours < size)).all(-1, keepdim=True)  # (P, k^d, 1)
        neighbours = torch.minimum(neighbours.clamp_min(0), size - 1)
        batch = (index // per_image).unsqueeze(1).expand(-1, neighbours.shape[1])  # (P, k^d)
        # Advanced indices around the channel slice put (P, k^d) first: (P, k^d, C). No copy of x even when
        # it is a cropped view.
        patches = x[(batch, slice(None), *neighbours.unbind(-1))]
        dtype = torch.promote_types(x.dtype, first.weight.dtype)
        patches = torch.where(inside, patches.to(dtype), 0.0)
        # (C_out, C_in, *k) -> (C_out, k^d * C_in), taps in the order of ``offsets``.
        kernel = first.weight.flatten(2).transpose(1, 2).flatten(1)
        hidden = self[1](patches.flatten(1) @ kernel.t().to(dtype) + first.bias.to(dtype))  # (P, C_out)
        weight, bias = self.readout()
        out = hidden @ weight.t().to(dtype) + bias.to(dtype)  # (P, E)
        return out.reshape(*flat_index.shape, -1)


def _resolve_stages(n_stages, features, strides, kernel_sizes) -> int:
    lengths = {
        name: len(v)
        for name, v in (("features", features), ("strides", strides), ("kernel_sizes", kernel_sizes))
        if v is not None
    }
    if n_stages is not None:
        lengths["n_stages"] = n_stages
    if len(set(lengths.values())) > 1:
        raise ValueError(f"the number of stages disagrees between arguments: {lengths}")
    n = next(iter(lengths.values()), DEFAULT_STAGES)
    if n < 2:
        raise ValueError(f"a U-Net needs at least 2 stages, got {n}")
    return n


def resolve_uafr_sites(uafr: bool, uafr_layers: Sequence[str] | None, valid: Sequence[str]) -> list[str]:
    """``uafr_layers`` (names) wins over ``uafr`` (all sites); returned in ``valid``'s order."""
    if uafr_layers is None:
        return list(valid) if uafr else []
    if isinstance(uafr_layers, str):
        uafr_layers = [uafr_layers]
    unknown = [n for n in uafr_layers if n not in valid]
    if unknown:
        raise ValueError(f"unknown UAFR site(s) {unknown}; valid names: {', '.join(valid)}")
    return [n for n in valid if n in uafr_layers]


@register_model("unet", spatial_dims=(2, 3))
class UNet(nn.Module):
    """Plain conv U-Net: per stage two (conv -> norm -> LeakyReLU), the first strided for downsampling;
    transposed-conv upsampling (kernel = stride), skip concatenation, 1x1 segmentation head.

    Args (all keyword-only):
        spatial_dims: 2 or 3. in_channels, num_classes: image channels and classes K (background included).
        features: channels per stage; default ``base_features * 2**i`` for ``n_stages`` stages (default 6).
            Capped by ``max_features`` (default 512 in 2D, 320 in 3D, as nnU-Net).
        strides: per stage, an int or one int per axis (array order); the first must be all ones.
            Default ``[1, 2, 2, ...]``. Anisotropic example: ``[[1, 1, 1], [1, 2, 2], [2, 2, 2], ...]``.
        kernel_sizes: per stage, odd int or per-axis ints, e.g. ``[[1, 3, 3], [3, 3, 3], ...]``; default 3.
        norm: "instance" (default) | "batch" | "group". activation: "leakyrelu" (default) | "relu".
        dropout: channel-dropout probability after each conv block (default 0, as nnU-Net).
        deep_supervision: 1x1 heads on decoder2 .. decoder{N-1}; their logits come finest first.
        uafr: UAFR after every encoder and decoder stage (paper default); ``uafr_layers`` picks sites by name.
        uafr_m, uafr_hidden, uafr_norm: UAFR hyper-parameters (paper: 2, 16, "batch").
        uafr_block: "uafr" (default), or "se" / "cbam" at the same sites (paper A's Table VIII comparison).
        uafr_use_f: False drops UAFR's F (Table IX a): the entropy of softmax over the feature's own channels.
        uafr_kernel_size: kernel of UAFR's first conv; default None = the stage's own kernel (3 by default, the
            paper's best; [1, 3, 3] at anisotropic stages so UAFR does not mix slices the stage keeps apart).
        projection_dim: CCDC projection head (``ProjectionHead``) with this many output channels.
        projection_level: the decoder stage the projection head reads: 1 = decoder1 at full resolution (paper B),
            2 = decoder2 at stride 2 (as ReCo works at a reduced stride), ... The embedding lives on that stage's
            grid; the caller resizes labels and probabilities to it.
        return_features: when False, taps and projection are skipped (empty dict / None).
    """

    def __init__(
        self,
        *,
        spatial_dims: int,
        in_channels: int,
        num_classes: int,
        features: Sequence[int] | None = None,
        n_stages: int | None = None,
        base_features: int = 32,
        max_features: int | None = None,
        strides: Sequence[int | Sequence[int]] | None = None,
        kernel_sizes: Sequence[int | Sequence[int]] | None = None,
        norm: str = "instance",
        activation: str = "leakyrelu",
        dropout: float = 0.0,
        deep_supervision: bool = False,
        uafr: bool = False,
        uafr_layers: Sequence[str] | None = None,
        uafr_m: int = 2,
        uafr_hidden: int = 16,
        uafr_kernel_size: int | Sequence[int] | None = None,
        uafr_norm: str = "batch",
        uafr_block: str = "uafr",
        uafr_use_f: bool = True,
        projection_dim: int | None = None,
        projection_level: int = 1,
        return_features: bool = True,
    ):
        super().__init__()
        sd = check_spatial_dims(spatial_dims)
        if in_channels < 1 or num_classes < 1:
            raise ValueError(f"in_channels and num_classes must be >= 1, got {in_channels}, {num_classes}")
        n = _resolve_stages(n_stages, features, strides, kernel_sizes)
        cap = DEFAULT_MAX_FEATURES[sd] if max_features is None else max_features
        if features is None:
            features = [base_features * 2**i for i in range(n)]
        features = [min(int(f), cap) for f in features]
        if min(features) < 1:
            raise ValueError(f"features must be positive, got {features}")
        strides = [1] + [2] * (n - 1) if strides is None else strides
        stride_t = [as_tuple(s, sd, f"strides[{i}]") for i, s in enumerate(strides)]
        if any(v != 1 for v in stride_t[0]):
            raise ValueError(f"the first stage must have stride 1 (full resolution), got {strides[0]!r}")
        kernel_sizes = [3] * n if kernel_sizes is None else kernel_sizes
        kernel_t = [as_tuple(k, sd, f"kernel_sizes[{i}]") for i, k in enumerate(kernel_sizes)]

        self.spatial_dims = sd
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.features = tuple(features)
        self.return_features = return_features
        self.embedding_channels = projection_dim
        if not 1 <= projection_level <= n - 1:
            raise ValueError(f"projection_level must be a decoder stage 1..{n - 1}, got {projection_level}")
        self.projection_level = projection_level
        self.divisor = tuple(math.prod(s[a] for s in stride_t) for a in range(sd))

        block = {"norm_kind": norm, "activation_kind": activation, "dropout_p": dropout}
        self.encoder = nn.ModuleList()
        for i in range(n):
            c_in = in_channels if i == 0 else features[i - 1]
            self.encoder.append(
                nn.Sequential(
                    ConvNormAct(sd, c_in, features[i], kernel_t[i], stride_t[i], **block),
                    ConvNormAct(sd, features[i], features[i], kernel_t[i], **block),
                )
            )
        # upsample[i] / decoder[i] build decoder{i+1} from level i+1 and the skip encoder{i+1}.
        self.upsample = nn.ModuleList(
            transposed_conv(sd, features[i + 1], features[i], stride_t[i + 1], bias=False)
            for i in range(n - 1)
        )
        self.decoder = nn.ModuleList(
            nn.Sequential(
                ConvNormAct(sd, 2 * features[i], features[i], kernel_t[i], **block),
                ConvNormAct(sd, features[i], features[i], kernel_t[i], **block),
            )
            for i in range(n - 1)
        )
        self._names = [f"encoder{i + 1}" for i in range(n)] + [
            f"decoder{i + 1}" for i in reversed(range(n - 1))
        ]
        level = {name: int(name[7:]) - 1 for name in self._names}  # "encoderK"/"decoderK" -> K - 1
        self._channels = {name: features[lv] for name, lv in level.items()}
        sites = resolve_uafr_sites(uafr, uafr_layers, self._names)
        self.uafr = nn.ModuleDict(
            {
                name: create_attention(
                    uafr_block,
                    self._channels[name],
                    sd,
                    m=uafr_m,
                    hidden=uafr_hidden,
                    kernel_size=kernel_t[level[name]] if uafr_kernel_size is None else uafr_kernel_size,
                    norm=uafr_norm,
                    use_f=uafr_use_f,
                )
                for name in sites
            }
        )
        self.head = conv(sd, features[0], num_classes, 1)
        self.deep_supervision_heads = nn.ModuleList(
            conv(sd, features[i], num_classes, 1) for i in range(1, n - 1) if deep_supervision
        )
        self.projection = (
            None
            if projection_dim is None
            else ProjectionHead(
                sd, features[projection_level - 1], int(projection_dim), kernel_t[projection_level - 1]
            )
        )
        init_conv_weights(self)
        self._geometry = self._compute_geometry()
        self._geometry_without_uafr = self._compute_geometry(include_uafr=False)

    # --- description -------------------------------------------------------------------------------------

    @property
    def uncertainty_names(self) -> list[str]:
        """UAFR site names, in the order of ``output.uncertainty`` (SE/CBAM blocks give no map)."""
        return [name for name, block in self.uafr.items() if block.gives_uncertainty]

    @property
    def uncertainty_strides(self) -> dict[str, tuple[int, ...]]:
        """Stride of each UAFR map (that of the stage it follows)."""
        return {n: self._geometry[n].stride for n in self.uncertainty_names}

    @property
    def tap_geometry(self) -> dict[str, Geometry]:
        """Exact per-voxel receptive-field geometry of every tap (see ``receptive_field.py``)."""
        return dict(self._geometry)

    @property
    def tap_info(self) -> dict[str, TapInfo]:
        return {
            name: TapInfo(self._channels[name], g.stride, g.receptive_field)
            for name, g in self._geometry.items()
        }

    @property
    def tap_info_without_uafr(self) -> dict[str, TapInfo]:
        """``tap_info`` with receptive fields measured as if the UAFR (or SE/CBAM) blocks were absent, as the
        authors' 3D code measures the RF-PDCR windows (23 / 47 for its stages 3 / 4)."""
        return {
            name: TapInfo(self._channels[name], g.stride, g.receptive_field)
            for name, g in self._geometry_without_uafr.items()
        }

    def _compute_geometry(self, include_uafr: bool = True) -> dict[str, Geometry]:
        g = Geometry.identity(self.spatial_dims)
        out: dict[str, Geometry] = {}
        for i, stage in enumerate(self.encoder):
            g = self._site_geometry(f"encoder{i + 1}", propagate_geometry(stage, g), include_uafr)
            out[f"encoder{i + 1}"] = g
        for i in reversed(range(len(self.decoder))):
            g = propagate_geometry(self.upsample[i], g).merge(out[f"encoder{i + 1}"])
            g = self._site_geometry(f"decoder{i + 1}", propagate_geometry(self.decoder[i], g), include_uafr)
            out[f"decoder{i + 1}"] = g
        return out

    def _site_geometry(self, name: str, g: Geometry, include_uafr: bool = True) -> Geometry:
        return propagate_geometry(self.uafr[name], g) if include_uafr and name in self.uafr else g

    # --- forward -----------------------------------------------------------------------------------------

    def forward(self, image: Tensor) -> SegmentationOutput:
        """image (B, C_in, *S) -> SegmentationOutput; any S (padded internally, outputs cropped back)."""
        # Skipped while tracing for export: a traced shape check would be frozen into the graph.
        if not torch.jit.is_tracing() and (
            image.ndim != self.spatial_dims + 2 or image.shape[1] != self.in_channels
        ):
            raise ValueError(
                f"expected an image (B, {self.in_channels}, *S) with {self.spatial_dims} spatial axes, "
                f"got shape {tuple(image.shape)}"
            )
        spatial = image.shape[2:]
        taps: dict[str, Tensor] = {}
        uncertainty: dict[str, Tensor] = {}

        def site(name: str, x: Tensor) -> Tensor:
            stride = self._geometry[name].stride
            if name in self.uafr:
                x, u = self.uafr[name](x)
                if u is not None:
                    uncertainty[name] = crop_to_grid(u, spatial, stride)
            if self.return_features:
                taps[name] = crop_to_grid(x, spatial, stride)
            return x

        x = pad_to_multiple(image, self.divisor)
        skips = []
        for i, stage in enumerate(self.encoder):
            x = site(f"encoder{i + 1}", stage(x))
            skips.append(x)
        deep: list[Tensor] = []
        projection = None
        for i in reversed(range(len(self.decoder))):
            x = self.upsample[i](x)
            x = site(f"decoder{i + 1}", self.decoder[i](torch.cat([x, skips[i]], dim=1)))
            if self.projection is not None and self.return_features and i + 1 == self.projection_level:
                stride = self._geometry[f"decoder{i + 1}"].stride
                # The head runs later, where it is needed (densely, or at sampled pixels only), on the cropped
                # map: both ways see the same zero padding at its border.
                projection = ProjectionInput(crop_to_grid(x, spatial, stride), self.projection)
            if self.deep_supervision_heads and i >= 1:
                stride = self._geometry[f"decoder{i + 1}"].stride
                deep.append(crop_to_grid(self.deep_supervision_heads[i - 1](x), spatial, stride))
        ones = (1,) * self.spatial_dims
        logits = crop_to_grid(self.head(x), spatial, ones)
        return SegmentationOutput(
            logits=logits,
            deep_supervision=deep[::-1],
            taps=taps,
            projection=projection,
            uncertainty=uncertainty,
        )
