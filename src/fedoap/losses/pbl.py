"""FedOAP's perturbed boundary loss (PBL), method.md "Perturbed boundary loss".

For logits z, mask y and p = sigmoid(z)::

    e  = |p - y|                                  error map
    M  = 1[e > tau]                  (region="error", the reference)
       | band_b(y) OR band_b(1[p>0.5])            (region="band")
       | 1[e > tau] OR band                       (region="error_and_band")
    z~ = z + s * xi * M,   xi ~ N(0, 1)
    L_PBL = (1 - lam) * L_seg(z, y) + lam * L_seg(z~, y)

``band_b(m)`` is the morphological gradient dilate_b(m) - erode_b(m): the pixels within b px of
the mask's boundary. The region is computed without gradient; the perturbation is additive, so the
gradient of the perturbed term flows to z everywhere, and the noise inside M pushes the model to
be confidently right where it is (near) wrong.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from fedoap.losses.seg import SegLoss

Region = Literal["error", "band", "error_and_band"]


def boundary_band(mask: torch.Tensor, width: int) -> torch.Tensor:
    """Pixels within ``width`` px of the boundary of binary ``mask`` (B, 1, H, W), as a bool map."""
    k = 2 * width + 1
    m = mask.float()
    dilated = F.max_pool2d(m, k, stride=1, padding=width)
    eroded = -F.max_pool2d(-m, k, stride=1, padding=width)
    return (dilated - eroded) > 0


@torch.no_grad()
def perturbation_region(
    logits: torch.Tensor, y: torch.Tensor, region: Region, tau: float, band_width: int
) -> torch.Tensor:
    """The bool map M of pixels to perturb, shape of ``logits``."""
    p = torch.sigmoid(logits.float())
    error = (p - y).abs() > tau
    if region == "error":
        return error
    band = boundary_band(y, band_width) | boundary_band(p > 0.5, band_width)
    if region == "band":
        return band
    if region == "error_and_band":
        return error | band
    raise ValueError(f"region must be one of error, band, error_and_band; got {region!r}")


class PerturbedBoundaryLoss(nn.Module):
    """``L_PBL = (1 - lam) L_seg(z, y) + lam L_seg(z + s xi M, y)``.

    Args:
        region: which pixels are perturbed (see module docstring).
        tau: error threshold for the ``error`` region (reference 0.75).
        s: noise scale (reference 0.1).
        lam: weight of the perturbed term (reference 0.1). ``lam=0`` is exactly ``L_seg``.
        band_width: b, in pixels, for the ``band`` region.
    """

    def __init__(
        self,
        region: Region = "error",
        tau: float = 0.75,
        s: float = 0.1,
        lam: float = 0.1,
        band_width: int = 2,
        seg: SegLoss | None = None,
    ) -> None:
        super().__init__()
        if region not in ("error", "band", "error_and_band"):
            raise ValueError(f"region must be one of error, band, error_and_band; got {region!r}")
        self.region, self.tau, self.s, self.lam, self.band_width = region, tau, s, lam, band_width
        self.seg = seg or SegLoss()

    def perturb(
        self, logits: torch.Tensor, y: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (z~, M)."""
        z = logits.float()
        m = perturbation_region(z, y, self.region, self.tau, self.band_width)
        xi = torch.randn(z.shape, generator=generator, dtype=z.dtype, device=z.device)
        return z + self.s * xi * m, m

    def forward(
        self, y_pred: torch.Tensor, y: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        clean = self.seg(y_pred, y)
        if self.lam == 0:
            return clean
        perturbed, _ = self.perturb(y_pred, y, generator)
        return (1 - self.lam) * clean + self.lam * self.seg(perturbed, y)
