"""Online augmentation of a training batch: flips, small rotations, intensity jitter.

It works on whole batches of tensors with a caller-supplied generator, so that a run is
reproducible from its seed and a resumed run draws the same augmentations.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from fedoap.config import AugmentConfig


def augment_batch(
    x: torch.Tensor, y: torch.Tensor, cfg: AugmentConfig, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """``x``: (B, C, H, W) normalised images, ``y``: (B, 1, H, W) masks; returns new tensors.

    ``gen`` lives on the batch's device, so every draw is made there."""
    b, dev = x.shape[0], gen.device
    if cfg.flip:
        for dim in (2, 3):
            flip = torch.rand(b, generator=gen, device=dev) < 0.5
            # No ``if flip.any()``: reading it back would stall a GPU's queue every batch.
            x = torch.where(flip[:, None, None, None], x.flip(dim), x)
            y = torch.where(flip[:, None, None, None], y.flip(dim), y)
    if cfg.rotate_deg > 0:
        angle = (torch.rand(b, generator=gen, device=dev) * 2 - 1) * math.radians(cfg.rotate_deg)
        cos, sin = torch.cos(angle), torch.sin(angle)
        zero = torch.zeros_like(cos)
        theta = torch.stack(
            [torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1
        )
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        # Padding value: the image's minimum (background), not 0 (which is mean intensity after
        # z-scoring).
        lo = x.amin(dim=(1, 2, 3), keepdim=True)
        x = (
            F.grid_sample(x - lo, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
            + lo
        )
        y = (F.grid_sample(y, grid, mode="bilinear", align_corners=False) >= 0.5).to(y.dtype)
    if cfg.intensity > 0:
        scale = 1 + (torch.rand(b, 1, 1, 1, generator=gen, device=dev) * 2 - 1) * cfg.intensity
        shift = (torch.rand(b, 1, 1, 1, generator=gen, device=dev) * 2 - 1) * cfg.intensity
        x = x * scale + shift
    return x, y
