"""Deterministic image transforms: letterboxing and intensity normalisation.

Letterboxing is how ``../shared/data`` was made: keep the aspect ratio, scale the longer side to
``size``, zero-pad the rest. Images are resized bicubically, masks bilinearly then thresholded at
0.5, so a mask never shifts relative to its image.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image


def letterbox_geometry(h: int, w: int, size: int) -> tuple[int, int, int, int]:
    """(new_h, new_w, top, left) of an (h, w) image letterboxed into size x size."""
    scale = size / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    return nh, nw, (size - nh) // 2, (size - nw) // 2


def _resize(arr: np.ndarray, nh: int, nw: int, is_mask: bool) -> np.ndarray:
    if arr.shape[:2] == (nh, nw):
        return arr
    if is_mask:
        m = Image.fromarray(arr.astype(np.float32)).resize((nw, nh), Image.Resampling.BILINEAR)
        return (np.asarray(m) >= 0.5).astype(np.uint8)
    if arr.ndim == 3:  # channels: resize each as float
        return np.stack([_resize(arr[..., c], nh, nw, False) for c in range(arr.shape[-1])], -1)
    resized = Image.fromarray(arr.astype(np.float32)).resize((nw, nh), Image.Resampling.BICUBIC)
    out = np.asarray(resized)
    if arr.dtype == np.uint8:
        return np.clip(np.rint(out), 0, 255).astype(np.uint8)
    return out.astype(np.float32)


def letterbox(arr: np.ndarray, size: int, is_mask: bool) -> np.ndarray:
    """Letterbox an (H, W) or (H, W, C) array to (size, size[, C])."""
    h, w = arr.shape[:2]
    if (h, w) == (size, size):
        return arr
    nh, nw, top, left = letterbox_geometry(h, w, size)
    resized = _resize(arr, nh, nw, is_mask)
    out = np.zeros((size, size, *arr.shape[2:]), dtype=resized.dtype)
    out[top : top + nh, left : left + nw] = resized
    return out


def unletterbox(arr: np.ndarray, h: int, w: int, is_mask: bool) -> np.ndarray:
    """Invert :func:`letterbox`: crop the padding and resize back to (h, w)."""
    size = arr.shape[0]
    nh, nw, top, left = letterbox_geometry(h, w, size)
    crop = arr[top : top + nh, left : left + nw]
    return _resize(crop, h, w, is_mask)


def normalize(images: np.ndarray, mode: str) -> torch.Tensor:
    """(N, H, W[, C]) array -> float32 tensor (N, C, H, W).

    ``zscore``: per image, over all its pixels and channels (no calibrated intensities in MRI,
    ultrasound or endoscopy). ``unit``: scale uint8 to [0, 1].
    """
    x = torch.from_numpy(np.ascontiguousarray(images)).float()
    x = x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2)
    if mode == "unit":
        return x / 255.0 if images.dtype == np.uint8 else x
    if mode == "zscore":
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        std = x.std(dim=(1, 2, 3), keepdim=True)
        return (x - mean) / std.clamp_min(1e-6)
    raise ValueError(f"unknown normalisation {mode!r}; use zscore or unit")
