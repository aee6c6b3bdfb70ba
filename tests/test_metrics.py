import math

import numpy as np
import pytest
import torch

from fedoap.metrics import case_dice, image_metrics, summarize


def box(size, y0, y1, x0, x1):
    m = torch.zeros(size, size, dtype=torch.bool)
    m[y0:y1, x0:x1] = True
    return m


def test_dice_and_iou_known_overlap():
    # two 10x10 squares overlapping in a 10x5 strip: Dice = 2*50/200, IoU = 50/150
    p = box(32, 0, 10, 0, 10)
    g = box(32, 0, 10, 5, 15)
    m = image_metrics(p[None], g[None])
    assert math.isclose(m.dice[0], 0.5, abs_tol=1e-6)
    assert math.isclose(m.iou[0], 1 / 3, abs_tol=1e-6)


def test_empty_mask_rule():
    empty = torch.zeros(16, 16, dtype=torch.bool)
    some = box(16, 2, 6, 2, 6)
    pred = torch.stack([empty, some, empty])
    gt = torch.stack([empty, empty, some])
    m = image_metrics(pred, gt)
    assert list(m.dice) == [1.0, 0.0, 0.0]  # empty/empty = 1; FP on empty = 0; miss = 0
    assert list(m.iou) == [1.0, 0.0, 0.0]
    assert np.isnan(m.hd95_px).all()  # HD95 only where both are non-empty
    s = summarize(m)
    assert s["hd95_px"] is None and s["hd95_pairs"] == 0


def test_hd95_of_shifted_square():
    # a 20x20 square shifted by 3 px: every boundary point is at most 3 px away
    p = box(64, 10, 30, 10, 30)
    g = box(64, 10, 30, 13, 33)
    m = image_metrics(p[None], g[None])
    assert math.isclose(m.hd95_px[0], 3.0, abs_tol=1e-6)


def test_hd95_of_concentric_squares():
    # inner square 10x10 inside 20x20: the outer boundary is 5 px from the inner one
    p = box(64, 20, 30, 20, 30)
    g = box(64, 15, 35, 15, 35)
    m = image_metrics(p[None], g[None])
    assert 4.0 <= m.hd95_px[0] <= math.hypot(5, 5)
    # HD95 of identical masks is 0
    assert image_metrics(g[None], g[None]).hd95_px[0] == 0.0


def test_case_dice_pools_pixels_across_images():
    a, b = box(16, 0, 4, 0, 4), box(16, 0, 4, 0, 8)  # 16 and 32 px
    empty = torch.zeros(16, 16, dtype=torch.bool)
    pred = torch.stack([a, empty, a])
    gt = torch.stack([a, a, b])
    cases = case_dice(pred, gt, ["p1", "p1", "p2"])
    assert math.isclose(cases["p1"], 2 * 16 / (16 + 32))  # per-image mean would be 0.5
    assert math.isclose(cases["p2"], 2 * 16 / (16 + 32))
    assert case_dice(empty[None], empty[None], ["e"]) == {"e": 1.0}


def test_dice_and_iou_equal_monai_on_random_and_empty_masks():
    """Validation imports no MONAI; our Dice/IoU must stay MONAI's (ignore_empty=False)."""
    from monai.metrics import compute_dice, compute_iou

    gen = torch.Generator().manual_seed(0)
    p = torch.rand(40, 1, 12, 12, generator=gen) < torch.linspace(0, 0.6, 40).view(-1, 1, 1, 1)
    g = torch.rand(40, 1, 12, 12, generator=gen) < torch.linspace(0.5, 0, 40).view(-1, 1, 1, 1)
    p[0], g[0] = False, False  # empty on empty
    p[1], g[2] = False, False  # a miss; a prediction on an empty ground truth
    m = image_metrics(p[:, 0], g[:, 0], hd95=False)
    ref_dice = compute_dice(p.float(), g.float(), include_background=True, ignore_empty=False)
    ref_iou = compute_iou(p.float(), g.float(), include_background=True, ignore_empty=False)
    np.testing.assert_allclose(m.dice, ref_dice[:, 0].numpy(), rtol=1e-6)
    np.testing.assert_allclose(m.iou, ref_iou[:, 0].numpy(), rtol=1e-6)
    assert m.dice[0] == 1.0 and m.dice[1] == 0.0 and m.dice[2] == 0.0


def test_case_scores_by_hand():
    from fedoap.metrics import case_scores

    y = torch.zeros(4, 1, 4, 4)
    p = torch.zeros(4, 1, 4, 4)
    y[0, 0, :2, :2] = 1  # case a: a tumour slice (4 px) and an empty slice
    p[0, 0, :2, :1] = 1  # 2 px predicted, all inside: Dice 2*2/(2+4)
    p[1, 0, 3, 3] = 1  # a false positive on a's empty slice
    y[2, 0, 0, 0] = 1  # case b: a tumour slice predicted empty, and an empty slice
    rows = case_scores(p, y, ["a", "a", "b", "b"])
    a, b = rows
    assert (a["case"], a["slices"], a["tumour_slices"]) == ("a", 2, 1)
    assert a["tumour_slice_dice"] == pytest.approx(4 / 6)
    assert a["case_dice"] == pytest.approx(2 * 2 / (3 + 4))  # pooled: the FP pixel counts
    assert a["empty_slice_fp_rate"] == 1.0
    assert b["case_dice"] == 0.0 and b["tumour_slice_dice"] == 0.0
    assert b["empty_slice_fp_rate"] == 0.0
    only_empty = case_scores(torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2), ["c"])[0]
    assert only_empty["tumour_slice_dice"] is None and only_empty["case_dice"] == 1.0


def test_selection_never_picks_an_uncomputable_score_and_keeps_the_earliest_tie():
    from fedoap.metrics.selection import improves, selection_score

    assert selection_score({"case_dice": None}, "case_dice") == -math.inf
    assert not improves({"case_dice": None}, "case_dice", -math.inf)  # None never wins
    assert improves({"case_dice": 0.0}, "case_dice", -math.inf)  # any score beats none
    assert not improves({"case_dice": 0.5}, "case_dice", 0.5)  # a tie keeps the earlier
    assert improves({"case_dice": 0.51}, "case_dice", 0.5)
