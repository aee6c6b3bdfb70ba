"""A synthetic multi-organ federation that needs no files: the embedded default.

Each *style* imitates one organ and modality, and the styles differ the way real clients do:

=============  ==================  ===============  ==========  ============================
style          background anatomy  noise            tumour      cases (patients/videos)
=============  ==================  ===============  ==========  ============================
``mri``        head, skull ring,   Rician           bright,     6 slices; sizes follow an
               ventricles          (magnitude)      with edema  ellipsoid, end slices empty
``ultrasound`` tissue layers in a  multiplicative   dark, very  1 image; 15% "normal" with
               sector              speckle          irregular,  unlabelled dark fat lobules
                                                    shadowed
``endoscopy``  vignetting, folds,  mild Gaussian,   subtle lit  8 video frames, small motion;
               dark lumen          highlights       dome, large never empty
``ct``         body, liver, spine  Gaussian         dark, small 5 slices; 30% of patients
                                                    1-3 lesions tumour-free
=============  ==================  ===============  ==========  ============================

Tumour outlines are radial Fourier curves ``r(theta) = r0 (1 + sum_k a_k cos(k theta + phi_k))``
with random harmonics, so boundaries are irregular and each one different; images are rendered
with a soft edge while the mask is the hard outline. Contrast polarity differs between styles
(bright in MRI, dark in ultrasound and CT), so a model trained on one client does visibly worse on
another, and the federated problem is not trivial.

Everything is deterministic from ``(seed, style, client name)``.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable

import numpy as np

from fedoap.data.sources.raw import RawClient

Rng = np.random.Generator


def gaussian_filter(x: np.ndarray, sigma: float) -> np.ndarray:
    """scipy's Gaussian blur, imported on first use: a site that reads its own data (the Flower
    ClientApp, one process per message) never pays for scipy."""
    from scipy.ndimage import gaussian_filter as blur

    return np.asarray(blur(x, sigma))


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    return yy, xx


def smooth_noise(rng: Rng, size: int, sigma: float) -> np.ndarray:
    """Gaussian random field with correlation length ``sigma`` px, unit std."""
    f = gaussian_filter(rng.standard_normal((size, size)).astype(np.float32), sigma)
    return f / (f.std() + 1e-8)


def radial_shape(
    rng: Rng, size: int, cy: float, cx: float, r0: float, irregularity: float, harmonics: int = 6
) -> tuple[np.ndarray, np.ndarray]:
    """Signed distance-like field ``r(theta) - d`` (positive inside) of an irregular blob."""
    yy, xx = _grid(size)
    dy, dx = yy - cy, xx - cx
    d = np.hypot(dy, dx)
    theta = np.arctan2(dy, dx)
    r = np.ones_like(theta)
    for k in range(2, harmonics + 1):
        a = rng.normal(0, irregularity / k)
        r += a * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    r = r0 * np.clip(r, 0.35, 1.8)
    return r - d, d


def _soft(field: np.ndarray, edge: float) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(np.clip(-field / max(edge, 1e-3), -60, 60)))


def _ellipse(size: int, cy: float, cx: float, ay: float, ax: float) -> np.ndarray:
    yy, xx = _grid(size)
    return ((yy - cy) / ay) ** 2 + ((xx - cx) / ax) ** 2


# ----------------------------------------------------------------------------------------------
# Styles. Each renders one case: a list of (image float in ~[0, 1], mask uint8).
# ----------------------------------------------------------------------------------------------


def _mri_case(rng: Rng, size: int) -> list[tuple[np.ndarray, np.ndarray]]:
    s = size
    cy, cx = s / 2 + rng.normal(0, s * 0.02, 2)
    ay, ax = s * rng.uniform(0.38, 0.45), s * rng.uniform(0.31, 0.38)
    has_tumour = rng.random() > 0.25
    t_cy = cy + rng.uniform(-0.45, 0.45) * ay * 0.7
    t_cx = cx + rng.uniform(-0.45, 0.45) * ax * 0.7
    t_r = s * rng.uniform(0.05, 0.13)
    irregular = rng.uniform(0.2, 0.45)
    texture = smooth_noise(rng, s, s / 18)
    fine = smooth_noise(rng, s, 1.5)
    shape_rng_seed = int(rng.integers(1 << 31))
    out = []
    for z in np.linspace(-1.25, 1.25, 6):
        e = _ellipse(s, cy, cx, ay * (1 - 0.1 * z**2), ax * (1 - 0.1 * z**2))
        head = e < 1
        skull = (e >= 0.82) & (e < 1)
        brain = 0.33 + 0.05 * texture + 0.03 * fine
        # Ventricles: two dark crescents near the middle, shrinking away from the centre slice.
        for side in (-1, 1):
            v = _ellipse(s, cy - s * 0.03, cx + side * s * 0.06, s * 0.1, s * 0.03)
            brain = np.where(v < 1 - 0.5 * abs(z), 0.12, brain)
        img = np.where(head, brain, 0.0)
        img = np.where(skull, 0.85, img)
        mask = np.zeros((s, s), np.uint8)
        scale = 1 - (z / 1.05) ** 2
        if has_tumour and scale > 0.05:
            r = t_r * np.sqrt(scale)
            field, _ = radial_shape(
                np.random.default_rng(shape_rng_seed), s, t_cy, t_cx, r, irregular
            )
            edema, _ = radial_shape(
                np.random.default_rng(shape_rng_seed + 1), s, t_cy, t_cx, r * 1.6, irregular
            )
            img = img + 0.14 * _soft(edema, 2.0) * head
            inside = _soft(field, 0.8)
            img = img * (1 - inside) + inside * (0.78 + 0.06 * fine)
            mask = ((field > 0) & head).astype(np.uint8)
        sigma = 0.035
        img = np.hypot(img + rng.normal(0, sigma, img.shape), rng.normal(0, sigma, img.shape))
        out.append((gaussian_filter(img, 0.6), mask))
    return out


def _ultrasound_case(rng: Rng, size: int) -> list[tuple[np.ndarray, np.ndarray]]:
    s = size
    yy, xx = _grid(s)
    depth = yy / s
    layers = np.zeros((s, s), np.float32)
    n_layers = rng.integers(3, 6)
    bounds = np.sort(rng.uniform(0.1, 0.9, n_layers))
    warp = smooth_noise(rng, s, s / 6) * 0.03
    for b in bounds:
        layers += rng.uniform(-0.15, 0.15) * (depth + warp > b)
    img = 0.45 + layers + 0.08 * smooth_noise(rng, s, s / 10)
    img = np.where(depth < 0.05, 0.8, img)  # bright skin line
    img *= 1 - 0.5 * depth  # attenuation with depth
    mask = np.zeros((s, s), np.uint8)
    # Distractors: dark, smooth, elongated fat lobules that are *not* lesions.
    for _ in range(rng.integers(1, 4)):
        e = _ellipse(s, rng.uniform(0.2, 0.8) * s, rng.uniform(0.15, 0.85) * s, s * 0.04, s * 0.12)
        img = np.where(e < 1, img * 0.55, img)
    if rng.random() > 0.15:
        cy, cx = rng.uniform(0.35, 0.65) * s, rng.uniform(0.3, 0.7) * s
        r0 = s * rng.uniform(0.08, 0.2)
        malignant = rng.random() < 0.45
        field, _ = radial_shape(
            rng, s, cy, cx, r0, 0.7 if malignant else 0.25, 9 if malignant else 5
        )
        inside = _soft(field, 1.0)
        img = img * (1 - 0.75 * inside)
        # Posterior acoustic shadow (malignant) or enhancement (benign cyst-like) below the lesion.
        column = np.exp(-(((xx - cx) / (r0 * 0.8)) ** 2)) * (yy > cy + r0 * 0.6)
        img = img * (1 + (-0.35 if malignant else 0.25) * column)
        mask = (field > 0).astype(np.uint8)
    speckle = gaussian_filter(rng.rayleigh(0.8, (s, s)).astype(np.float32), 0.7)
    img = img * speckle
    # Sector-shaped field of view, as a curvilinear probe gives.
    fan = np.abs(xx - s / 2) < (0.3 * s + 0.35 * yy)
    img = np.where(fan, img, 0.0)
    mask = mask * fan
    return [(img, mask.astype(np.uint8))]


def _endoscopy_case(rng: Rng, size: int) -> list[tuple[np.ndarray, np.ndarray]]:
    s = size
    yy, xx = _grid(s)
    vignette = 1 - 0.6 * (np.hypot(yy - s / 2, xx - s / 2) / (0.75 * s)) ** 2
    folds = np.sin(xx * rng.uniform(0.05, 0.12) + smooth_noise(rng, s, s / 5) * 3)
    lumen_c = rng.uniform(0.2, 0.8, 2) * s
    p_c = rng.uniform(0.3, 0.7, 2) * s
    p_r = s * rng.uniform(0.12, 0.24)
    light = rng.uniform(0, 2 * np.pi)
    shape_seed = int(rng.integers(1 << 31))
    texture = smooth_noise(rng, s, 2.0)
    out = []
    for f in range(8):
        shift = np.array([np.sin(f / 3), np.cos(f / 4)]) * s * 0.03 * f / 4
        ly, lx = lumen_c + shift
        lumen = _ellipse(s, ly, lx, s * 0.12, s * 0.09)
        img = (0.55 + 0.08 * folds + 0.03 * texture) * vignette
        img = np.where(lumen < 1, 0.1 + 0.3 * np.clip(lumen - 0.6, 0, 1), img)
        cy, cx = p_c + shift
        field, d = radial_shape(np.random.default_rng(shape_seed), s, cy, cx, p_r, 0.18, 4)
        inside = _soft(field, 1.5)
        # Lit dome: brighter on the side facing the light, a little texture of its own.
        dome = np.sqrt(np.clip(1 - (d / p_r) ** 2, 0, 1))
        shade = ((yy - cy) * np.sin(light) + (xx - cx) * np.cos(light)) / p_r
        img = img + inside * (0.1 + 0.1 * dome - 0.08 * shade + 0.04 * texture)
        mask = (field > 0).astype(np.uint8)
        for _ in range(rng.integers(2, 6)):  # specular highlights
            hy, hx = rng.uniform(0, s, 2)
            img = np.where(np.hypot(yy - hy, xx - hx) < s * 0.012, 1.0, img)
        img = gaussian_filter(img + rng.normal(0, 0.015, img.shape), 0.8)
        out.append((img, mask))
    return out


def _ct_case(rng: Rng, size: int) -> list[tuple[np.ndarray, np.ndarray]]:
    s = size
    cy, cx = s * 0.52, s / 2
    body = _ellipse(s, cy, cx, s * 0.36, s * 0.46)
    liver_c = (cy - s * 0.05, cx - s * 0.13)
    liver_field, _ = radial_shape(rng, s, *liver_c, s * 0.22, 0.15, 3)
    has_tumour = rng.random() > 0.3
    lesions = [
        (
            liver_c[0] + rng.uniform(-0.12, 0.12) * s,
            liver_c[1] + rng.uniform(-0.12, 0.12) * s,
            s * rng.uniform(0.035, 0.08),
            int(rng.integers(1 << 31)),
        )
        for _ in range(rng.integers(1, 4))
    ]
    texture = smooth_noise(rng, s, 3.0)
    out = []
    for z in np.linspace(-0.9, 0.9, 5):
        img = np.where(body < 1, 0.42 + 0.02 * texture, 0.02)
        img = np.where((body >= 0.85) & (body < 1), 0.28, img)  # subcutaneous fat
        spine = _ellipse(s, cy + s * 0.25, cx, s * 0.05, s * 0.05)
        img = np.where(spine < 1, 0.95, img)
        liver = liver_field + s * 0.02 * (1 - z**2) > 0
        img = np.where(liver, 0.56 + 0.02 * texture, img)
        mask = np.zeros((s, s), np.uint8)
        if has_tumour:
            for ly, lx, lr, seed in lesions:
                scale = 1 - (z / 1.0) ** 2
                if scale <= 0.05:
                    continue
                field, _ = radial_shape(
                    np.random.default_rng(seed), s, ly, lx, lr * np.sqrt(scale), 0.3
                )
                inside = _soft(field, 0.7) * liver
                img = img * (1 - inside) + inside * 0.4
                mask |= ((field > 0) & liver).astype(np.uint8)
        img = gaussian_filter(img + rng.normal(0, 0.03, img.shape), 0.5)
        out.append((img, mask))
    return out


STYLES: dict[str, Callable[[Rng, int], list[tuple[np.ndarray, np.ndarray]]]] = {
    "mri": _mri_case,
    "ultrasound": _ultrasound_case,
    "endoscopy": _endoscopy_case,
    "ct": _ct_case,
}


def generate_client(style: str, num_images: int, size: int, name: str, seed: int = 0) -> RawClient:
    """Generate ``num_images`` image/mask pairs (whole cases, truncated to the count)."""
    if style not in STYLES:
        raise ValueError(f"unknown synthetic style {style!r}; known styles: {', '.join(STYLES)}")
    rng = np.random.default_rng([seed, zlib.crc32(style.encode()), zlib.crc32(name.encode())])
    render = STYLES[style]
    images: list[np.ndarray] = []
    masks: list[np.ndarray] = []
    cases: list[str] = []
    names: list[str] = []
    case = 0
    while len(images) < num_images:
        for i, (img, mask) in enumerate(render(rng, size)):
            if len(images) == num_images:
                break
            images.append(np.clip(np.rint(img * 255), 0, 255).astype(np.uint8))
            masks.append(mask.astype(np.uint8))
            cases.append(f"{name}-case{case:04d}")
            names.append(f"{name}-case{case:04d}-{i}")
        case += 1
    return RawClient(
        images=np.stack(images),
        masks=np.stack(masks),
        case_ids=np.array(cases),
        names=np.array(names),
    )
