"""Segmentation metrics per image and per case.

Dice and IoU are MONAI's ``compute_dice`` / ``compute_iou`` (``ignore_empty=False``) written in
torch, held equal to MONAI's by a test, and HD95 is MONAI's
``compute_hausdorff_distance(percentile=95)``, imported only when HD95 is asked for (the test
split): validation, which runs in every Flower message, imports no MONAI. All on binarised
predictions (logit > 0), in pixels. The reference code computed Dice over flattened batches
with smoothing; here every image is scored on its own and the reduction is a separate, NaN-aware
step (the MONAI convention).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

EMPTY_MASK_RULE = (
    "Dice/IoU per image: an empty prediction on an empty ground truth scores 1; any predicted "
    "pixel on an empty ground truth scores 0; an empty prediction on a non-empty ground truth "
    "scores 0. HD95 (pixels) is computed only where both prediction and ground truth are "
    "non-empty and is NaN otherwise; its mean is over those pairs, and hd95_pairs counts them. "
    "Case Dice pools the pixels of all images of a case (2*sum TP / (sum |P| + sum |G|)), with "
    "the same empty rule applied to the pooled case."
)


@dataclass(frozen=True)
class ImageMetrics:
    """Per-image metric arrays of length N."""

    dice: np.ndarray
    iou: np.ndarray
    hd95_px: np.ndarray  # NaN where prediction or ground truth is empty (or not computed)


def _as_bchw(x: torch.Tensor) -> torch.Tensor:
    x = torch.as_tensor(x)
    if x.ndim == 3:  # (N, H, W)
        x = x.unsqueeze(1)
    if x.ndim != 4 or x.shape[1] != 1:
        raise ValueError(f"expected masks (N, H, W) or (N, 1, H, W), got {tuple(x.shape)}")
    return x.bool().float()


def image_metrics(y_pred: torch.Tensor, y: torch.Tensor, hd95: bool = True) -> ImageMetrics:
    """Dice, IoU and HD95 of binary predictions ``y_pred`` against masks ``y`` ((N, H, W))."""
    p, g = _as_bchw(y_pred), _as_bchw(y)
    if p.shape != g.shape:
        raise ValueError(f"y_pred {tuple(p.shape)} and y {tuple(g.shape)} differ in shape")
    dice, iou = overlap(p, g)
    hd = torch.full((p.shape[0],), float("nan"))
    if hd95:
        from monai.metrics import compute_hausdorff_distance

        both = (p.flatten(1).sum(1) > 0) & (g.flatten(1).sum(1) > 0)
        idx = torch.nonzero(both).flatten()
        if len(idx):
            with warnings.catch_warnings():
                # MONAI warns about a deprecated argument it passes to itself.
                warnings.simplefilter("ignore", FutureWarning)
                hd[idx] = compute_hausdorff_distance(
                    p[idx], g[idx], include_background=True, percentile=95
                )[:, 0].float()
    return ImageMetrics(
        dice.numpy().astype(np.float64),
        iou.numpy().astype(np.float64),
        hd.numpy().astype(np.float64),
    )


def overlap(p: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image Dice ``2|P∩G| / (|P| + |G|)`` and IoU ``|P∩G| / |P∪G|`` of binary (N, 1, H, W)
    masks; an empty prediction on an empty ground truth scores 1 for both (MONAI's
    ``ignore_empty=False``), and a prediction on an empty ground truth scores 0."""
    p, g = p.flatten(1), g.flatten(1)
    tp = (p * g).sum(1)
    total = p.sum(1) + g.sum(1)
    union = total - tp
    empty = total == 0
    one = torch.ones_like(tp)
    dice = torch.where(empty, one, 2.0 * tp / torch.where(empty, one, total))
    iou = torch.where(empty, one, tp / torch.where(empty, one, union))
    return dice, iou


def case_dice(y_pred: torch.Tensor, y: torch.Tensor, case_ids: Sequence[str]) -> dict[str, float]:
    """Dice per case, pooling the pixels of every image of the case (e.g. one MRI patient)."""
    p, g = _as_bchw(y_pred).flatten(1), _as_bchw(y).flatten(1)
    tp = (p * g).sum(1).double()
    ps, gs = p.sum(1).double(), g.sum(1).double()
    ids = np.asarray(case_ids)
    out: dict[str, float] = {}
    for case in dict.fromkeys(ids.tolist()):
        sel = torch.from_numpy(ids == case)
        denom = float(ps[sel].sum() + gs[sel].sum())
        out[case] = 1.0 if denom == 0 else float(2 * tp[sel].sum() / denom)
    return out


#: The columns of a run's ``test_cases.csv`` (:func:`case_scores` gives all but ``client``).
CASE_FIELDS = (
    "client",
    "case",
    "slices",
    "tumour_slices",
    "case_dice",
    "tumour_slice_dice",
    "empty_slice_fp_rate",
)


def case_scores(
    y_pred: torch.Tensor, y: torch.Tensor, case_ids: Sequence[str]
) -> list[dict[str, float | int | str | None]]:
    """One row per case (patient or video), in the order cases first appear:

    * ``slices``, ``tumour_slices``: its images, and those whose ground truth has tumour;
    * ``case_dice``: Dice of the case's pooled pixels (:func:`case_dice`; an empty prediction on
      a case with tumour scores 0);
    * ``tumour_slice_dice``: the mean per-image Dice over its tumour slices (None without any);
    * ``empty_slice_fp_rate``: the share of its tumour-free slices on which anything is
      predicted (None without any).

    The unit that paired comparisons resample: a patient's score does not depend on how many of
    its slices are empty, as a mean over all images would."""
    p, g = _as_bchw(y_pred), _as_bchw(y)
    if p.shape != g.shape:
        raise ValueError(f"y_pred {tuple(p.shape)} and y {tuple(g.shape)} differ in shape")
    dice, _ = overlap(p, g)
    pooled = case_dice(p, g, case_ids)
    has_tumour = (g.flatten(1).sum(1) > 0).numpy()
    predicted = (p.flatten(1).sum(1) > 0).numpy()
    ids = np.asarray(case_ids)
    rows: list[dict[str, float | int | str | None]] = []
    for case in dict.fromkeys(ids.tolist()):
        sel = ids == case
        tumour, empty = sel & has_tumour, sel & ~has_tumour
        rows.append(
            {
                "case": str(case),
                "slices": int(sel.sum()),
                "tumour_slices": int(tumour.sum()),
                "case_dice": pooled[case],
                "tumour_slice_dice": float(dice.numpy()[tumour].mean()) if tumour.any() else None,
                "empty_slice_fp_rate": float(predicted[empty].mean()) if empty.any() else None,
            }
        )
    return rows


def _nanmean(a: np.ndarray) -> float:
    a = np.asarray(a, dtype=np.float64)
    return float(np.nanmean(a)) if np.isfinite(a).any() else float("nan")


def summarize(
    m: ImageMetrics, cases: dict[str, float] | None = None
) -> dict[str, float | int | None]:
    """Means over images (HD95 over the pairs where it is defined) and over cases."""
    out: dict[str, float | int | None] = {
        "dice": _nanmean(m.dice),
        "iou": _nanmean(m.iou),
        "hd95_px": _nanmean(m.hd95_px),
        "hd95_pairs": int(np.isfinite(m.hd95_px).sum()),
        "n_images": len(m.dice),
    }
    if cases is not None:
        out["case_dice"] = _nanmean(np.array(list(cases.values())))
        out["n_cases"] = len(cases)
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in out.items()}
