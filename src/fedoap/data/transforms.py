"""Deterministic image transforms: letterboxing and intensity normalisation.

Letterboxing is how ``../shared/data`` was made: keep the aspect ratio, scale the longer side to
``size``, zero-pad the rest. Images are resized bicubically, masks bilinearly then thresholded at
0.5, so a mask never shifts relative to its image.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

#: Largest |value| a float image is resized at as is; beyond, bicubic overshoot (or a float64
#: value past float32's 3.4e38) could overflow PIL's float32 arithmetic.
FLOAT32_SAFE = 1e30

#: Images z-scored at a time: bounds the float64 working copy (64 RGB images of 128^2: 25 MB) and
#: keeps it near the CPU caches, which makes it faster than one pass over a whole split.
ZSCORE_CHUNK = 64


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
    # PIL resamples in float32: values beyond FLOAT32_SAFE (or float64 ones beyond its range)
    # would come back inf. Such an image is resized at unit scale and scaled back (in float64, the
    # dtype it keeps if it was float64); ordinary images take the old path exactly (scale 1).
    scale = 1.0
    if arr.dtype.kind == "f" and arr.size:
        largest = float(np.abs(arr).max())
        scale = largest if largest > FLOAT32_SAFE else 1.0
    src = arr if scale == 1.0 else arr / scale
    resized = Image.fromarray(src.astype(np.float32)).resize((nw, nh), Image.Resampling.BICUBIC)
    out = np.asarray(resized)
    if arr.dtype == np.uint8:
        return np.clip(np.rint(out), 0, 255).astype(np.uint8)
    if scale == 1.0:
        return out.astype(np.float32)
    big = out.astype(np.float64) * scale
    if arr.dtype == np.float64:
        return big
    # Bicubic overshoot of float32 values near its largest must not round to inf.
    limit = float(np.finfo(np.float32).max)
    return np.clip(big, -limit, limit).astype(np.float32)


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
    ultrasound or endoscopy); finite for any finite input (see :func:`_zscore`). ``unit``: scale
    uint8 to [0, 1]; other dtypes pass unchanged (as float32).
    """
    if mode == "unit":
        out = images.astype(np.float32)
        if images.dtype == np.uint8:
            out /= np.float32(255.0)
    elif mode == "zscore":
        out = np.empty(images.shape, np.float32)
        for i in range(0, len(images), ZSCORE_CHUNK):
            out[i : i + ZSCORE_CHUNK] = _zscore(images[i : i + ZSCORE_CHUNK])
    else:
        raise ValueError(f"unknown normalisation {mode!r}; use zscore or unit")
    x = torch.from_numpy(out)
    return x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2).contiguous()


def _zscore(images: np.ndarray) -> np.ndarray:
    """Per-image z-scores of (N, ...) ``images``, in float64, for any finite values.

    In float32, ``x - mean`` and the sum of squares overflow to inf (then NaN) for values near
    3e38, and float64 input beyond float32's range is inf once cast. Each image is first divided
    by its largest |value|, which leaves its z-scores unchanged (they are scale-invariant), so
    values lie in [-1, 1] and the sum of squares below 4 x the pixel count. The std clamp (1e-6
    in the image's own units, as before) is scaled alike, so ordinary images give the same
    z-scores up to rounding and a constant image gives zeros.
    """
    x = images.reshape(len(images), -1).astype(np.float64)
    if x.size == 0:
        return x.reshape(images.shape)
    # Largest |value| per image, without an |x| copy.
    scale = np.maximum(x.max(axis=1, keepdims=True), -x.min(axis=1, keepdims=True))
    scale[scale == 0] = 1.0  # an all-zero image: nothing to scale
    x /= scale
    x -= x.mean(axis=1, keepdims=True)
    # Unbiased, as torch.std was; a one-pixel image has no spread (std 0, z-scores 0).
    std = np.sqrt(np.einsum("ij,ij->i", x, x)[:, None] / max(x.shape[1] - 1, 1))
    with np.errstate(over="ignore"):  # 1e-6 / a subnormal scale is inf: z-scores 0, as before
        x /= np.maximum(std, 1e-6 / scale)
    return x.reshape(images.shape)
