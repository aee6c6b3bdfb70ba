import torch
import torch.nn.functional as F

from fedoap.losses import PerturbedBoundaryLoss, SegLoss, perturbation_region
from fedoap.losses.pbl import boundary_band


def square_mask(size=16, lo=4, hi=12):
    y = torch.zeros(1, 1, size, size)
    y[..., lo:hi, lo:hi] = 1
    return y


def test_seg_loss_is_half_bce_plus_batch_soft_dice():
    torch.manual_seed(0)
    z = torch.randn(2, 1, 8, 8)
    y = (torch.rand(2, 1, 8, 8) > 0.7).float()
    p = torch.sigmoid(z)
    dice = 1 - (2 * (p * y).sum() + 1e-5) / (p.sum() + y.sum() + 1e-5)
    expected = 0.5 * F.binary_cross_entropy_with_logits(z, y) + dice
    torch.testing.assert_close(SegLoss()(z, y), expected)


def test_error_region_is_thresholded_error_map():
    y = square_mask()
    z = torch.full_like(y, -4.0)  # predicts background everywhere: wrong inside the square
    m = perturbation_region(z, y, "error", tau=0.75, band_width=1)
    assert torch.equal(m, y.bool())


def test_band_region_of_a_square():
    y = square_mask()
    band = boundary_band(y, 1)
    # dilation minus erosion with a 3x3 element: 2-pixel-wide ring at the square's edge
    expected = torch.zeros_like(y, dtype=torch.bool)
    expected[..., 3:13, 3:13] = True
    expected[..., 5:11, 5:11] = False
    assert torch.equal(band, expected)


def test_perturbation_touches_only_the_chosen_region():
    torch.manual_seed(0)
    y = square_mask()
    z = torch.randn_like(y) * 3
    for region in ("error", "band", "error_and_band"):
        loss = PerturbedBoundaryLoss(region=region, tau=0.6, s=0.5, lam=0.3, band_width=2)
        z_tilde, m = loss.perturb(z, y, torch.Generator().manual_seed(1))
        changed = z_tilde != z
        assert changed.any(), region
        assert not changed[~m].any(), region  # nothing outside M moves
        assert changed[m].float().mean() > 0.99, region  # everything inside M does (a.s.)


def test_lambda_zero_equals_plain_loss():
    torch.manual_seed(0)
    z, y = torch.randn(2, 1, 16, 16), square_mask().repeat(2, 1, 1, 1)
    plain = SegLoss()(z, y)
    pbl = PerturbedBoundaryLoss(lam=0.0, s=5.0)(z, y, torch.Generator().manual_seed(0))
    assert torch.equal(pbl, plain)


def test_pbl_differs_from_plain_when_active_and_has_gradient():
    torch.manual_seed(0)
    z = torch.randn(2, 1, 16, 16, requires_grad=True)
    y = square_mask().repeat(2, 1, 1, 1)
    pbl = PerturbedBoundaryLoss(region="band", lam=0.5, s=1.0)(
        z, y, torch.Generator().manual_seed(0)
    )
    assert not torch.allclose(pbl, SegLoss()(z, y))
    pbl.backward()
    assert z.grad is not None and z.grad.abs().sum() > 0


def test_pbl_is_the_lambda_weighted_sum_of_clean_and_perturbed_losses():
    # L = (1 - lam) L_seg(z, y) + lam L_seg(z + s xi M, y), with xi drawn from the same
    # generator as the loss draws it, and M computed here from its definition (error region).
    torch.manual_seed(0)
    z, y = torch.randn(2, 1, 16, 16) * 3, square_mask().repeat(2, 1, 1, 1)
    lam, s, tau = 0.3, 2.0, 0.75
    m = (torch.sigmoid(z) - y).abs() > tau
    assert 0 < m.float().mean() < 1
    xi = torch.randn(z.shape, generator=torch.Generator().manual_seed(7))
    want = (1 - lam) * SegLoss()(z, y) + lam * SegLoss()(z + s * xi * m, y)
    got = PerturbedBoundaryLoss(region="error", tau=tau, s=s, lam=lam)(
        z, y, torch.Generator().manual_seed(7)
    )
    torch.testing.assert_close(got, want)
    # and lam = 1 is the perturbed loss alone
    full = PerturbedBoundaryLoss(region="error", tau=tau, s=s, lam=1.0)(
        z, y, torch.Generator().manual_seed(7)
    )
    torch.testing.assert_close(full, SegLoss()(z + s * xi * m, y))


def test_soft_dice_equals_monai_dice_loss_values_and_gradients():
    """Training imports no MONAI (one Flower ClientApp process per message): our torch soft Dice
    must stay MONAI's DiceLoss(sigmoid=True, batch=True), value and gradient."""
    from monai.losses import DiceLoss

    from fedoap.losses.seg import soft_dice_loss

    reference = DiceLoss(sigmoid=True, batch=True, smooth_nr=1e-5, smooth_dr=1e-5)
    torch.manual_seed(0)
    for shape, fg in (((4, 1, 16, 16), 0.3), ((3, 2, 8, 12), 0.5), ((2, 1, 8, 8), 0.0)):
        z = (3 * torch.randn(shape)).requires_grad_()
        y = (torch.rand(shape) < fg).float()
        ours = soft_dice_loss(z, y)
        (g_ours,) = torch.autograd.grad(ours, z)
        ref = reference(z, y)
        (g_ref,) = torch.autograd.grad(ref, z)
        torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(g_ours, g_ref, rtol=1e-5, atol=1e-9)
