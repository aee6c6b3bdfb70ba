"""``L_seg = 0.5 * BCEWithLogits + soft Dice`` (method.md, training protocol)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.losses import DiceLoss
from torch import nn


class SegLoss(nn.Module):
    """``L_seg(z, y) = bce_weight * BCE(z, y) + Dice_soft(sigmoid(z), y)``.

    The soft Dice is MONAI's ``DiceLoss`` with ``batch=True``: intersection and union are summed
    over the whole batch before the ratio, so the many tumour-free slices of a brain-MRI client do
    not each contribute an ill-defined 0/0 term.

    Args:
        bce_weight: weight of the BCE term (0.5 in the FedOAP reference).
    """

    def __init__(self, bce_weight: float = 0.5) -> None:
        super().__init__()
        self.bce_weight = bce_weight
        self.dice = DiceLoss(sigmoid=True, batch=True, smooth_nr=1e-5, smooth_dr=1e-5)

    def forward(self, y_pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``y_pred``: logits (B, 1, H, W); ``y``: binary mask (B, 1, H, W)."""
        y_pred = y_pred.float()  # losses in fp32 even under bf16 autocast
        return self.bce_weight * F.binary_cross_entropy_with_logits(y_pred, y) + self.dice(
            y_pred, y
        )
