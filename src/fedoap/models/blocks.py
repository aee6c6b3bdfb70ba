"""U-Net building blocks (Ronneberger et al., MICCAI 2015) with a configurable norm.

InstanceNorm (affine) is the reference choice for federations: it keeps no running batch
statistics, so there is nothing batch-dependent to average across hospitals.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

NormKind = Literal["instance", "batch", "group"]

#: Module types that count as normalisation layers (FedBN keeps exactly these local).
NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.InstanceNorm2d,
    nn.BatchNorm2d,
    nn.GroupNorm,
    nn.LayerNorm,
)


def make_norm(kind: NormKind, channels: int) -> nn.Module:
    if kind == "instance":
        return nn.InstanceNorm2d(channels, affine=True)
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        return nn.GroupNorm(min(8, channels), channels)
    raise ValueError(f"unknown norm {kind!r}; use one of instance, batch, group")


class DoubleConv(nn.Sequential):
    """(3x3 conv -> norm -> ReLU) x 2. Conv bias is dropped: the norm's shift replaces it."""

    def __init__(self, c_in: int, c_out: int, norm: NormKind) -> None:
        super().__init__(
            nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
            make_norm(norm, c_out),
            nn.ReLU(inplace=True),
            nn.Conv2d(c_out, c_out, 3, padding=1, bias=False),
            make_norm(norm, c_out),
            nn.ReLU(inplace=True),
        )


class Down(nn.Sequential):
    """2x2 max-pool then :class:`DoubleConv`; halves the resolution."""

    def __init__(self, c_in: int, c_out: int, norm: NormKind) -> None:
        super().__init__(nn.MaxPool2d(2), DoubleConv(c_in, c_out, norm))


class Encoder(nn.Module):
    """Contracting path with ``depth`` levels of widths w, 2w, ..., w*2^(depth-1).

    Returns every level's feature map (the skips); the last one is the deepest feature f that
    both bottlenecks start from.
    """

    def __init__(self, in_channels: int, width: int, depth: int, norm: NormKind) -> None:
        super().__init__()
        widths = [width * 2**i for i in range(depth)]
        self.stages = nn.ModuleList([DoubleConv(in_channels, widths[0], norm)])
        self.stages.extend(Down(a, b, norm) for a, b in zip(widths[:-1], widths[1:], strict=True))
        self.out_channels = widths

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        skips = []
        for stage in self.stages:
            x = stage(x)
            skips.append(x)
        return skips


class Up(nn.Module):
    """2x2 transposed conv up-sampling, concatenation with the skip, :class:`DoubleConv`."""

    def __init__(self, c_in: int, c_out: int, norm: NormKind) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(c_in, c_out, 2, stride=2)
        self.conv = DoubleConv(2 * c_out, c_out, norm)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.cat([skip, self.up(x)], dim=1))


class Decoder(nn.Module):
    """Expanding path mirroring :class:`Encoder`: from w*2^depth channels back to w."""

    def __init__(self, width: int, depth: int, norm: NormKind) -> None:
        super().__init__()
        widths = [width * 2**i for i in range(depth + 1)]  # w .. w*2^depth
        self.stages = nn.ModuleList(
            Up(widths[i + 1], widths[i], norm) for i in reversed(range(depth))
        )

    def forward(self, x: torch.Tensor, skips: list[torch.Tensor]) -> torch.Tensor:
        for stage, skip in zip(self.stages, reversed(skips), strict=True):
            x = stage(x, skip)
        return x


class SpatialAdapter(nn.Module):
    """FedOAP's personal spatial adapter A^k at full resolution (method.md).

    ``ReLU(norm(conv3x3(ReLU(norm(conv3x3(x))))) + norm(conv1x1(x)))``: a small residual block
    that lets each hospital re-shape the shared decoder's features for its own boundaries.
    """

    def __init__(self, channels: int, norm: NormKind) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1, bias=False),
            make_norm(norm, channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels, channels, 3, padding=1, bias=False),
            make_norm(norm, channels),
        )
        self.shortcut = nn.Sequential(
            nn.Conv2d(channels, channels, 1, bias=False), make_norm(norm, channels)
        )
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.body(x) + self.shortcut(x))
