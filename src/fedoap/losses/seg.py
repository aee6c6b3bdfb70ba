"""``L_seg = 0.5 * BCEWithLogits + soft Dice`` (method.md, training protocol)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SegLoss(nn.Module):
    """``L_seg(z, y) = bce_weight * BCE(z, y) + Dice_soft(sigmoid(z), y)``.

    The soft Dice is MONAI's ``DiceLoss(sigmoid=True, batch=True, smooth_nr=1e-5,
    smooth_dr=1e-5)``, written in torch (``soft_dice_loss``; a test holds it equal to MONAI's,
    values and gradients) so that training imports no MONAI: a Flower ClientApp starts a process
    per message and MONAI's import alone takes seconds. Intersection and union are summed over
    the whole batch before the ratio, so the many tumour-free slices of a brain-MRI client do not
    each contribute an ill-defined 0/0 term.

    Args:
        bce_weight: weight of the BCE term (0.5 in the FedOAP reference).
        per_image: the soft Dice of each image, averaged over the batch (MONAI's
            ``batch=False``), so that the loss is a mean of per-example terms, as DP-SGD's
            per-example clipping needs (``privacy.dp``).
    """

    def __init__(self, bce_weight: float = 0.5, per_image: bool = False) -> None:
        super().__init__()
        self.bce_weight = bce_weight
        self.per_image = per_image

    def forward(self, y_pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``y_pred``: logits (B, 1, H, W); ``y``: binary mask (B, 1, H, W)."""
        y_pred = y_pred.float()  # losses in fp32 even under bf16 autocast
        return self.bce_weight * F.binary_cross_entropy_with_logits(y_pred, y) + soft_dice_loss(
            y_pred, y, batch=not self.per_image
        )


def soft_dice_loss(
    logits: torch.Tensor,
    y: torch.Tensor,
    smooth_nr: float = 1e-5,
    smooth_dr: float = 1e-5,
    batch: bool = True,
) -> torch.Tensor:
    """``1 - (2 sum(p y) + smooth_nr) / (sum(p) + sum(y) + smooth_dr)`` with ``p = sigmoid(z)``,
    the sums over the batch and every pixel, per channel, then the channel mean (MONAI's
    ``DiceLoss(sigmoid=True, batch=True)``). ``batch=False``: the sums per image, then the mean
    over images and channels (MONAI's ``batch=False``)."""
    p = torch.sigmoid(logits)
    dims = [0, *range(2, p.ndim)] if batch else list(range(2, p.ndim))
    inter = (p * y).sum(dims)
    denom = p.sum(dims) + y.sum(dims)
    return (1.0 - (2.0 * inter + smooth_nr) / (denom + smooth_dr)).mean()
