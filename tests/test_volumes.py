"""3D volume sources (nnU-Net, Decathlon, plain pairs), their slicing, and predict on NIfTI."""

from __future__ import annotations

import dataclasses
import gzip
import json
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from fedoap.api import predict_images, predict_volume
from fedoap.config import ClientSpec, Config, ConfigError, DataConfig, VolumeSpec
from fedoap.data import prepare_clients
from fedoap.data.cache import cache_key
from fedoap.data.dataset import load_raw
from fedoap.data.errors import DataError
from fedoap.data.volumes import (
    Volume,
    VolumeInput,
    load_volumes,
    normalise_volume,
    prepare_volume,
    read_volume,
    restore_slices,
    slice_axis,
)
from tests.conftest import tiny_config
from tests.test_cache import age

AFFINE = np.diag([0.9, 0.8, 3.0, 1.0])


def blob(shape: tuple[int, ...], centre: tuple[float, ...], radius: float) -> np.ndarray:
    """A {0, 1} ball of ``radius`` voxels around ``centre``."""
    grid = np.indices(shape).astype(np.float64)
    d2 = sum((g - c) ** 2 for g, c in zip(grid, centre, strict=True))
    return (d2 <= radius**2).astype(np.uint8)


def save(path: Path, data: np.ndarray, affine: np.ndarray = AFFINE) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, affine), path)
    return path


#: Slices per synthetic volume (along its last, coarsest axis); the ball spans slices 3-13.
Z = 16


def case_arrays(seed: int, shape: tuple[int, int, int] = (24, 20, Z)) -> tuple[np.ndarray, ...]:
    """(image float32, label uint8): a bright ball on noise; label 1 the ball, 2 its core."""
    rng = np.random.default_rng(seed)
    label = blob(shape, (12 + seed % 3, 10, 8), 5)
    label[blob(shape, (12 + seed % 3, 10, 8), 2) == 1] = 2
    image = (rng.normal(100, 10, shape) + 80 * (label > 0)).astype(np.float32)
    return image, label


def make_nnunet(
    root: Path,
    n: int = 4,
    channels: tuple[str, ...] = ("FLAIR",),
    labels: dict[str, Any] | None = None,
) -> Path:
    for k in range(n):
        image, label = case_arrays(k)
        for c in range(len(channels)):
            save(root / "imagesTr" / f"case{k:02d}_{c:04d}.nii.gz", image + 1000 * c)
        save(root / "labelsTr" / f"case{k:02d}.nii.gz", label)
    meta = {
        "channel_names": {str(i): name for i, name in enumerate(channels)},
        "labels": labels or {"background": 0, "edema": 1, "core": 2},
        "numTraining": n,
        "file_ending": ".nii.gz",
    }
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


def make_msd(root: Path, n: int = 6) -> Path:
    """A Decathlon task of ``n`` cases: 4D images (FLAIR, T1w = 2 x FLAIR + 7), 3D labels."""
    training = []
    for k in range(n):
        image, label = case_arrays(k)
        save(root / "imagesTr" / f"b{k}.nii.gz", np.stack([image, image * 2 + 7], axis=-1))
        save(root / "labelsTr" / f"b{k}.nii.gz", label)
        training.append({"image": f"./imagesTr/b{k}.nii.gz", "label": f"./labelsTr/b{k}.nii.gz"})
    meta = {
        "modality": {"0": "FLAIR", "1": "T1w"},
        "labels": {"0": "background", "1": "edema", "2": "core"},
        "training": training,
    }
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


def spec(source: str, path: Path, **kw: Any) -> ClientSpec:
    vol = kw.pop("volume", {})
    return ClientSpec(name="v", source=source, path=str(path), volume=VolumeSpec(**vol), **kw)  # type: ignore[arg-type]


def one_round(run_dir: Path, clients: list[dict[str, Any]]) -> Config:
    """Train a one-round fp32 run of ``clients`` at 32 x 32 into ``run_dir``; its config."""
    from fedoap.api import run_experiment

    cfg = tiny_config(
        "train.precision=fp32",
        "federation.rounds=1",
        "finetune.epochs=0",
        data={"image_size": 32, "clients": clients},
    )
    run_experiment(cfg, run_dir, progress=False)
    return cfg


def load(s: ClientSpec, size: int = 32) -> Any:
    return load_volumes(s, Path(s.path or ""), size, 10**8)


# --------------------------------------------------------------------------------------------
# Layouts
# --------------------------------------------------------------------------------------------


def test_nnunet_cases_are_patients_and_every_slice_is_kept(tmp_path):
    root = make_nnunet(tmp_path / "ds")
    raw = load(spec("nnunet", root))
    # 4 volumes of Z slices along the coarsest axis (3 mm, the last).
    assert raw.images.shape == (4 * Z, 32, 32) and raw.images.dtype == np.float32
    assert sorted(set(raw.case_ids)) == ["case00", "case01", "case02", "case03"]
    assert list(raw.names[:2]) == ["case00_s0000", "case00_s0001"]
    # Every non-zero label is tumour by default: slice 8 of case00 holds the ball of radius 5.
    expected = blob((24, 20, Z), (12, 10, 8), 5)[:, :, 8]
    from fedoap.data.transforms import letterbox

    assert np.array_equal(raw.masks[8], letterbox(expected, 32, is_mask=True))


def test_label_map_by_value_and_by_name(tmp_path):
    root = make_nnunet(tmp_path / "ds", labels={"background": 0, "edema": 1, "core": 2})
    core = load(spec("nnunet", root, volume={"labels": (2,)}))
    by_name = load(spec("nnunet", root, volume={"labels": ("core",)}))
    whole = load(spec("nnunet", root))
    assert np.array_equal(core.masks, by_name.masks)
    assert 0 < core.masks.sum() < whole.masks.sum()
    # nnU-Net region labels: a name standing for several values.
    region = make_nnunet(tmp_path / "r", labels={"background": 0, "edema": 1, "core": 2})
    meta = json.loads((region / "dataset.json").read_text())
    meta["labels"]["whole"] = [1, 2]
    (region / "dataset.json").write_text(json.dumps(meta))
    assert np.array_equal(
        load(spec("nnunet", region, volume={"labels": ("whole",)})).masks, whole.masks
    )


def test_channel_is_chosen_by_name(tmp_path):
    root = make_nnunet(tmp_path / "ds", channels=("T1", "FLAIR"))
    s = spec("nnunet", root, channel="flair")  # names match ignoring case when unambiguous
    raw = load(s)
    assert "channel 'FLAIR'" in raw.notes[0]
    image, _ = case_arrays(0)
    want = prepare_volume(image + 1000, (0.9, 0.8, 3.0), "mr", VolumeSpec(), 32, "x").slices
    assert np.allclose(raw.images[:Z], want, atol=1e-6)
    with pytest.raises(DataError, match=r"channels \(0: T1, 1: FLAIR\)"):
        load(spec("nnunet", root))


def test_msd_4d_images_give_the_named_modality(tmp_path):
    root = make_msd(tmp_path / "Task01", n=3)
    raw = load(spec("msd", root, channel="T1w"))
    image, _ = case_arrays(0)
    want = prepare_volume(image * 2 + 7, (0.9, 0.8, 3.0), "mr", VolumeSpec(), 32, "x").slices
    assert np.allclose(raw.images[:Z], want, atol=1e-6)
    assert sorted(set(raw.case_ids)) == ["b0", "b1", "b2"]


def test_plain_folder_pairs_by_name_with_patient_regex(tmp_path):
    for k, name in enumerate(["p1_t0", "p1_t1", "p2_t0"]):
        image, label = case_arrays(k)
        save(tmp_path / "images" / f"{name}.nii", image)
        save(tmp_path / "labels" / f"{name}_seg.nii.gz", label)
    s = spec("volumes", tmp_path, mask_dir="labels", mask_suffix="_seg", case_regex=r"^(p\d+)_")
    raw = load(s)
    assert sorted(set(raw.case_ids)) == ["p1", "p2"]  # two scans of p1: one patient
    assert raw.names[Z] == "p1_t1_s0000"


# --------------------------------------------------------------------------------------------
# Normalisation, axis, slice policy
# --------------------------------------------------------------------------------------------


def test_ct_window_is_the_closed_form():
    hu = np.array([[[-1000.0, -160.0, 40.0, 240.0, 3000.0]]])
    out = normalise_volume(hu, "ct", VolumeSpec(intensity="ct", window=(40.0, 400.0)), "x")
    assert np.allclose(out, [[[0.0, 0.0, 0.5, 1.0, 1.0]]])


def test_mr_clips_to_percentiles_then_zscores():
    rng = np.random.default_rng(0)
    x = rng.normal(50, 5, (10, 10, 10))
    x[0, 0, 0] = 1e6  # one hot voxel: clipped, so it cannot flatten the others
    out = normalise_volume(x, "mr", VolumeSpec(percentiles=(1.0, 99.0)), "x").astype(np.float64)
    assert abs(out.mean()) < 1e-5 and abs(out.std() - 1) < 1e-5
    assert out.max() < 3.5  # without clipping the outlier would sit at ~31 std


def test_mr_intensities_past_float32_give_the_same_zscores():
    # A header's scl_slope of 1e38 makes an int16 volume's values overflow float32: the z-score
    # does not depend on the scale, so neither may ours.
    rng = np.random.default_rng(0)
    x = rng.normal(50, 5, (10, 10, 10))
    want = normalise_volume(x, "mr", VolumeSpec(), "x")
    got = normalise_volume(x * 1e38, "mr", VolumeSpec(), "x")
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, want, atol=1e-4)


def test_predict_on_intensities_at_the_float32_limit_gives_the_plain_volumes_mask(tmp_path):
    # The same MR volume three ways: as stored, spread over +-3e38 in float32, and as int16 with
    # a header scl_slope of 1e38 (values past float32). The z-score does not depend on scale or
    # offset, so all three must give the plain volume's mask, not an empty one.
    root = make_nnunet(tmp_path / "nn", n=6)
    clients = [
        {"name": "a", "source": "nnunet", "path": str(root)},
        {"name": "b", "source": "nnunet", "path": str(make_nnunet(tmp_path / "nn2", n=6))},
    ]
    one_round(tmp_path / "run", clients)
    x = np.asarray(nib.load(root / "imagesTr" / "case00_0000.nii.gz").dataobj, np.float64)
    x = np.round(x)  # integers, so that the int16 copy holds the same values
    centred = x - x.mean()
    ints = nib.Nifti1Image(x.astype(np.int16), AFFINE)
    ints.header.set_slope_inter(1e38, 0)
    volumes = {
        "plain": nib.Nifti1Image(x.astype(np.float32), AFFINE),
        "wide": nib.Nifti1Image(
            (centred / np.abs(centred).max() * 3e38).astype(np.float32), AFFINE
        ),
        "slope": ints,
    }
    masks = {}
    for name, img in volumes.items():
        nib.save(img, tmp_path / f"{name}.nii.gz")
        (out,) = predict_images(
            tmp_path / "run", "a", [tmp_path / f"{name}.nii.gz"], tmp_path / name
        )
        masks[name] = np.asarray(nib.load(out[0]).dataobj)
    assert masks["plain"].sum() > 20
    assert np.array_equal(masks["wide"], masks["plain"])
    assert np.array_equal(masks["slope"], masks["plain"])


def test_axis_defaults_to_the_coarsest_spacing():
    assert slice_axis(VolumeSpec(), (1.0, 3.0, 1.0)) == 1
    assert slice_axis(VolumeSpec(), (1.0, 1.0, 1.0)) == 2  # equals: the last
    assert slice_axis(VolumeSpec(axis=0), (1.0, 1.0, 5.0)) == 0
    p = prepare_volume(np.zeros((6, 7, 5)), (2.0, 1.0, 1.0), "mr", VolumeSpec(), 8, "x")
    assert p.axis == 0 and p.slices.shape == (6, 8, 8) and p.plane == (7, 5)


def test_foreground_policy_keeps_tumour_slices_and_a_seeded_share_of_the_rest(tmp_path):
    root = make_nnunet(tmp_path / "ds", n=2)
    fg = load(spec("nnunet", root, volume={"slices": "foreground"}))
    # Tumour is decided on the label's own voxels, before letterboxing can erase a tiny one.
    has = np.concatenate([case_arrays(k)[1].reshape(-1, Z).any(0) for k in range(2)])
    assert 0 < has.sum() < 2 * Z
    kept = [f"case{k:02d}_s{i:04d}" for k in range(2) for i in np.flatnonzero(has[k * Z :][:Z])]
    assert list(fg.names) == kept
    half = {"slices": "foreground", "empty_fraction": 0.5}
    a = load(spec("nnunet", root, volume=half))
    b = load(spec("nnunet", root, volume={**half, "seed": 1}))
    n_empty = int((~has[:Z]).sum()), int((~has[Z:]).sum())
    assert len(a.names) == has.sum() + round(0.5 * n_empty[0]) + round(0.5 * n_empty[1])
    assert list(a.names) == list(load(spec("nnunet", root, volume=half)).names)  # seeded
    assert list(a.names) != list(b.names)


# --------------------------------------------------------------------------------------------
# Bad input: a clear error naming the case and the file, before any training
# --------------------------------------------------------------------------------------------


def _break(root: Path, how: str) -> str:
    """Damage case01 of an nnU-Net dataset; return a pattern its error must match."""
    img = root / "imagesTr" / "case01_0000.nii.gz"
    lab = root / "labelsTr" / "case01.nii.gz"
    image, label = case_arrays(1)
    if how == "shape":
        save(lab, label[:, :, :6])
        return r"case 'case01'.*case01_0000.nii.gz has shape \(24, 20, 16\).*\(24, 20, 6\)"
    if how == "affine":
        save(lab, label, np.diag([0.9, 0.8, 2.0, 1.0]))
        return r"case 'case01'.*different affines"
    if how == "labels":
        label[0, 0, 0] = 7
        save(lab, label)
        return r"case 'case01'.*case01.nii.gz: label values \[7\] are not declared"
    if how == "4d":
        save(img, np.stack([image, image], -1))
        return r"case 'case01'.*case01_0000.nii.gz is 4D .* where a 3D volume is expected"
    if how == "nan":
        image[3, 3, 3] = np.nan
        save(img, image)
        return r"case 'case01': .*case01_0000.nii.gz: 1 voxel\(s\) are NaN"
    if how == "truncated":
        data = img.read_bytes()
        img.write_bytes(data[: len(data) // 2])
        return r"case 'case01': .*case01_0000.nii.gz: cannot read its voxels \(corrupt"
    if how == "no label":
        lab.unlink()
        return r"case 'case01': no label .*labelsTr/case01.nii.gz"
    if how == "bad name":
        img.rename(root / "imagesTr" / "case01.nii.gz")
        return r"imagesTr/case01.nii.gz: an imagesTr file must be named <case>_<XXXX>.nii.gz"
    if how == "channel":
        return r"no channel named 'T2'; channels: 0: FLAIR"
    if how == "nan pixdim":
        nii = nib.Nifti1Image(image, AFFINE)
        nii.header["pixdim"][1:4] = [1.0, np.nan, 2.0]
        nib.save(nii, img)
        return r"case 'case01': .*case01_0000.nii.gz: voxel spacing \(pixdim\) \(1.0, nan, 2.0\)"
    meta = json.loads((root / "dataset.json").read_text())
    if how == "deep json":
        (root / "dataset.json").write_text('{"a": ' + "[" * 100_000 + "]" * 100_000 + "}")
        return r"dataset.json: cannot read as JSON: nested too deeply"
    if how == "long int json":
        (root / "dataset.json").write_text('{"numTraining": ' + "9" * 5000 + "}")
        return r"dataset.json: cannot read as JSON: Exceeds the limit \(4300 digits\)"
    if how == "huge label":
        meta["labels"]["core"] = 10**4000 - 1
        (root / "dataset.json").write_text(json.dumps(meta))
        return r"dataset.json: labels.core: must be a label value from 0 to 2\^31-1, got 9999"
    if how == "odd channel key":
        meta["channel_names"] = {"\u00b2": "FLAIR"}  # a superscript two: str.isdigit() says yes
        (root / "dataset.json").write_text(json.dumps(meta))
        return r"dataset.json: 'channel_names' key '\u00b2' is not a channel index"
    raise AssertionError(how)


@pytest.mark.parametrize(
    "how",
    [
        "shape",
        "affine",
        "labels",
        "4d",
        "nan",
        "truncated",
        "no label",
        "bad name",
        "channel",
        "nan pixdim",
        "deep json",
        "long int json",
        "huge label",
        "odd channel key",
    ],
)
def test_bad_volumes_fail_before_training_naming_case_and_file(tmp_path, how):
    root = make_nnunet(tmp_path / "ds")
    pattern = _break(root, how)
    client = {"name": "v", "source": "nnunet", "path": str(root)}
    if how == "channel":
        client["channel"] = "T2"
    cfg = tiny_config(data={"image_size": 32, "clients": [client], "cache": False})
    with pytest.raises(DataError, match=pattern):
        prepare_clients(cfg.data)


def test_volume_options_where_no_volumes_are_read_are_errors():
    synthetic = {"name": "a", "source": "synthetic", "style": "mri"}
    with pytest.raises(ConfigError, match=r"data.clients\[0\].volume: slices 3D volumes"):
        tiny_config(data={"clients": [{**synthetic, "volume": {"axis": 0}}]})
    with pytest.raises(ConfigError, match=r"data.clients\[0\].channel: a channel name"):
        tiny_config(
            data={"clients": [{"name": "a", "source": "folder", "path": "x", "channel": "T1"}]}
        )
    nn = {"name": "a", "source": "nnunet", "path": "x"}
    with pytest.raises(ConfigError, match=r"volume.window: intensity=ct needs a HU window"):
        tiny_config(data={"clients": [{**nn, "volume": {"intensity": "ct"}}]})
    with pytest.raises(ConfigError, match=r"mask_dir: source=nnunet reads its layout's own"):
        tiny_config(data={"clients": [{**nn, "mask_dir": "labels"}]})
    with pytest.raises(ConfigError, match=r"volume.empty_fraction: only used with slices"):
        tiny_config(data={"clients": [{**nn, "volume": {"empty_fraction": 0.2}}]})
    with pytest.raises(ConfigError, match=r"volume.labels: must be >= 1 .*got \(0,\)"):
        tiny_config(data={"clients": [{**nn, "volume": {"labels": [0]}}]})


def test_a_ct_channel_without_a_window_is_refused(tmp_path):
    root = make_nnunet(tmp_path / "ds", channels=("CT",))
    with pytest.raises(DataError, match=r"channel 'CT' is CT: it needs volume.window"):
        load(spec("nnunet", root))
    # At size 24 the 24 x 20 planes are only padded, not resampled: the closed form, voxel for
    # voxel ((HU - (level - width / 2)) / width, clipped to [0, 1]).
    raw = load_volumes(spec("nnunet", root, volume={"window": (100.0, 200.0)}), root, 24, 10**8)
    image, _ = case_arrays(0)
    want = np.clip(image[:, :, 5] / 200.0, 0, 1)
    assert np.allclose(raw.images[5][:, 2:22], want, atol=1e-6)


def test_slices_go_into_the_cache_and_a_changed_volume_is_reread(tmp_path):
    root = make_nnunet(tmp_path / "ds")
    age(root)  # a source modified in the last seconds is read but never stored
    cfg = DataConfig(image_size=32, cache_dir=str(tmp_path / "cache"))
    s = spec("nnunet", root)
    first = load_raw(s, cfg)
    key, _, _ = cache_key(s, cfg)
    assert (tmp_path / "cache" / f"{key}.npz").is_file()
    assert np.array_equal(load_raw(s, cfg).images, first.images)
    assert first.masks[:Z].any()
    save(root / "labelsTr" / "case00.nii.gz", np.zeros((24, 20, Z), np.uint8))  # relabelled
    age(root, hours=1)
    assert cache_key(s, cfg)[0] != key
    changed = load_raw(s, cfg)
    assert not changed.masks[:Z].any()  # the edited case is read again, not served stale
    assert np.array_equal(changed.masks[Z:], first.masks[Z:])


def test_a_linked_dataset_relabelled_is_reread_not_served_stale(tmp_path):
    # The usual nnU-Net practice: imagesTr and labelsTr link to where the files live.
    real = make_nnunet(tmp_path / "store")
    root = tmp_path / "ds"
    root.mkdir()
    (root / "dataset.json").write_text((real / "dataset.json").read_text())
    for sub in ("imagesTr", "labelsTr"):
        (root / sub).symlink_to(real / sub, target_is_directory=True)
    age(real)
    age(root)
    cfg = DataConfig(image_size=32, cache_dir=str(tmp_path / "cache"))
    s = spec("nnunet", root)
    first = load_raw(s, cfg)
    assert first.masks.any()
    for k in range(4):  # every case relabelled, through the link
        save(real / "labelsTr" / f"case{k:02d}.nii.gz", np.zeros((24, 20, Z), np.uint8))
    age(real, hours=1)
    assert not load_raw(s, cfg).masks.any()
    # a link re-pointed at other files of the same sizes and times is a change too
    other = make_nnunet(tmp_path / "other")
    age(other, hours=1)
    (root / "labelsTr").unlink()
    (root / "labelsTr").symlink_to(other / "labelsTr", target_is_directory=True)
    assert load_raw(s, cfg).masks.any()


@pytest.mark.parametrize("given", ["../other/b0.nii.gz", "/tmp/b0.nii.gz", "./a/../../b.nii.gz"])
@pytest.mark.parametrize("key", ["image", "label"])
def test_msd_paths_that_leave_the_dataset_are_refused(tmp_path, given, key):
    root = make_msd(tmp_path / "Task01", n=2)
    meta = json.loads((root / "dataset.json").read_text())
    meta["training"][1][key] = given
    (root / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match=rf"training\[1\]\.{key} '{given}' leads outside"):
        load(spec("msd", root, channel="FLAIR"))


# --------------------------------------------------------------------------------------------
# Predict: slices back into the volume
# --------------------------------------------------------------------------------------------


class Threshold(torch.nn.Module):
    """A stand-in model whose logits are the normalised image minus 1: bright voxels are tumour,
    the zero letterbox padding is not."""

    def __init__(self) -> None:
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :1] - 1.0


def _vol(image: np.ndarray, zooms: tuple[float, ...]) -> Volume:
    return Volume(image, AFFINE, zooms, nib.Nifti1Header(), Path("x.nii.gz"))


@pytest.mark.parametrize("size", [32, 64])
def test_letterboxing_is_undone_to_the_input_geometry(size):
    shape = (40, 26, 9)  # non-square planes, sliced along axis 1 (the coarsest below)
    ball = blob(shape, (20, 13, 4), 7)
    image = 100 + 200 * ball.astype(np.float32)
    cfg = tiny_config(f"data.image_size={size}", "train.precision=fp32")
    s = ClientSpec(name="v", source="volumes", path="x")
    how = VolumeInput(None, None, None, "mr")
    mask = predict_volume(Threshold(), cfg, s, _vol(image, (1.0, 2.5, 1.0)), how)
    assert mask.shape == shape and mask.dtype == np.uint8
    dice = 2 * (mask & ball).sum() / (mask.sum() + ball.sum())
    assert dice > 0.93, dice
    # No resampling when the plane fills the letterbox: the mask is the ball, voxel for voxel.
    cube = blob((size, 5, size), (size / 2, 2, size / 2), size / 4)
    exact = predict_volume(
        Threshold(), cfg, s, _vol(100 + 200 * cube.astype(np.float32), (1, 3, 1)), how
    )
    assert np.array_equal(exact, cube)


def test_restore_slices_inverts_the_axis_move():
    masks = np.zeros((5, 8, 8), np.uint8)
    masks[2, 1, 3] = 1
    from fedoap.data.volumes import PreparedVolume

    out = restore_slices(masks, PreparedVolume(np.zeros((5, 8, 8), np.float32), 1, (8, 8)))
    assert out.shape == (8, 5, 8) and out[1, 2, 3] == 1 and out.sum() == 1


# --------------------------------------------------------------------------------------------
# Real data: LGG as an nnU-Net dataset per site, a short federation, predict on a test patient
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_lgg_as_nnunet_federation_predicts_nifti_equal_to_the_in_memory_result(
    shared_data, tmp_path
):
    from typer.testing import CliRunner

    from fedoap.api import load_client_model, run_experiment
    from fedoap.cli.main import app
    from fedoap.metrics.segmentation import case_dice
    from fedoap.training import predict_logits
    from tests.volumes_lgg import SPACING, affine, lgg_volumes, write_nnunet

    root = tmp_path / "nnUNet_raw"
    vols = {}
    for site in ("CS", "FG"):
        vols[site] = lgg_volumes(shared_data / "lgg_brain_mri.npz", sites=[site])
        write_nnunet(root / f"Dataset00{len(vols)}_LGG{site}", vols[site])
    clients = [
        {"name": "cs", "source": "nnunet", "path": "Dataset001_LGGCS", "channel": "FLAIR"},
        {"name": "fg", "source": "nnunet", "path": "Dataset002_LGGFG"},
    ]
    # 128 = the slices' own size: letterboxing is the identity, so the volume the prediction
    # writes and the slices the run scores are the same pixels.
    cfg = tiny_config(
        "train.precision=fp32",
        "train.lr=0.01",
        "train.local_epochs=3",
        "federation.rounds=2",
        data={"root": str(root), "image_size": 128, "max_train_images": 64, "clients": clients},
    )
    summary = run_experiment(cfg, tmp_path / "run", progress=False)

    # Splits are by patient: every nnU-Net case lies in one split, and all its slices with it.
    data = {c.name: c for c in prepare_clients(cfg.data)}
    for name, site in (("cs", "CS"), ("fg", "FG")):
        c = data[name]
        seen = [set(c.split(s).case_ids) for s in ("train", "val", "test")]
        assert not (seen[0] & seen[1] or seen[0] & seen[2] or seen[1] & seen[2])
        assert set().union(*seen) <= set(vols[site]) and seen[2]
        for case in seen[2]:
            assert (c.test.case_ids == case).sum() == vols[site][case][0].shape[2]
    assert summary["clients"]["cs"]["n"]["train"] == 64

    # The run's own model on the test split's slices (in memory), per patient.
    _, model = load_client_model(tmp_path / "run", "cs", torch.device("cpu"))
    test = data["cs"].test
    drawn = (predict_logits(model, test.x, "fp32")[:, 0] > 0).numpy().astype(np.uint8)
    # A held-out (test-split) patient of "cs", predicted from its NIfTI volume: the one the model
    # draws most tumour in, so that the equality below is not between two empty masks.
    cases = sorted(set(test.case_ids))
    case = max(cases, key=lambda c: int(drawn[test.case_ids == c].sum()))
    src = root / "Dataset001_LGGCS" / "imagesTr" / f"{case}_0000.nii.gz"
    out = tmp_path / "pred"
    (written,) = predict_images(tmp_path / "run", "cs", [src], out)
    assert written == (out / f"{case}_0000_mask.nii.gz",)
    pred_img: Any = nib.load(written[0])
    src_img: Any = nib.load(src)
    assert pred_img.shape == src_img.shape and np.allclose(pred_img.affine, affine())
    assert pred_img.header.get_zooms() == pytest.approx(SPACING)
    assert pred_img.get_data_dtype() == np.uint8
    pred = np.asarray(pred_img.dataobj)
    label = np.asarray(nib.load(root / "Dataset001_LGGCS" / "labelsTr" / f"{case}.nii.gz").dataobj)  # type: ignore[attr-defined]

    rows = np.flatnonzero(test.case_ids == case)
    in_memory = drawn[rows]  # (Z, 128, 128)
    assert np.array_equal(np.moveaxis(pred, 2, 0), in_memory)
    assert 0 < pred.sum() < pred.size  # the model draws something: the equality is not 0 = 0
    truth = torch.from_numpy(np.moveaxis(label, 2, 0)[:, None] > 0)
    memory_dice = case_dice(torch.from_numpy(in_memory[:, None] > 0), truth, [case] * len(rows))
    file_dice = 2 * (pred * label).sum() / max(pred.sum() + label.sum(), 1)
    assert file_dice == pytest.approx(memory_dice[case], abs=1e-12)
    # 0.467 on a 2-core AMD EPYC: the masks overlap the tumour, not only each other
    assert file_dice > 0

    # A folder in, a folder out, through the command line. nnU-Net's imagesTs holds every
    # channel: a file of another channel than the model's is left out.
    folder = tmp_path / "imagesTs"
    folder.mkdir()
    for name in (f"{case}_0000.nii.gz", "other_0000.nii.gz", "other_0001.nii.gz"):
        (folder / name).symlink_to(src)
    args = ["predict", str(tmp_path / "run"), str(folder), "--client", "cs", "-o"]
    res = CliRunner().invoke(app, [*args, str(tmp_path / "all")])
    assert res.exit_code == 0, res.output
    assert res.output.count("wrote") == 2
    assert sorted(p.name for p in (tmp_path / "all").iterdir()) == [
        f"{case}_0000_mask.nii.gz",
        "other_0000_mask.nii.gz",
    ]
    again: Any = nib.load(tmp_path / "all" / f"{case}_0000_mask.nii.gz")
    assert np.array_equal(np.asarray(again.dataobj), pred)
    assert gzip.decompress(written[0].read_bytes())[:4]  # a gzip stream, as the name says


def test_data_prepare_refuses_volume_clients_rather_than_change_their_normalisation(tmp_path):
    from fedoap.data.prepare import prepare_data

    root = make_nnunet(tmp_path / "ds")
    cfg = DataConfig(image_size=32, clients=(spec("nnunet", root),))
    with pytest.raises(DataError, match="volume clients cannot be prepared as npz"):
        prepare_data(cfg, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_layouts_are_recognised_by_their_dataset_json(tmp_path):
    from fedoap.data.volumes import detect_layout

    assert detect_layout(make_nnunet(tmp_path / "nn")) == "nnunet"
    (tmp_path / "msd").mkdir()
    (tmp_path / "msd" / "dataset.json").write_text(json.dumps({"modality": {"0": "CT"}}))
    assert detect_layout(tmp_path / "msd") == "msd"
    assert detect_layout(tmp_path) is None


def test_the_docs_volume_example_is_a_valid_config():
    from fedoap.config import Config, from_dict, validate
    from tests.conftest import REPO

    text = (REPO / "docs" / "data.md").read_text()
    section = text[text.index("## 3D volumes: nnU-Net, Decathlon, NIfTI") :]
    block = section[section.index("```yaml") + len("```yaml") : section.index("```\n", 10)]

    cfg = from_dict(Config, yaml.safe_load(block))
    validate(cfg)
    liver = cfg.data.clients[1]
    assert liver.volume.labels == (2,) and liver.volume.window == (60.0, 360.0)
    assert cfg.data.clients[2].case_regex == r"^(P\d+)_"


def test_predict_on_a_4d_decathlon_image_writes_a_3d_mask_of_the_models_channel(tmp_path):
    from fedoap.api import load_client_model

    root = make_msd(tmp_path / "Task01")
    clients = [
        {"name": "a", "source": "msd", "path": str(root), "channel": "T1w"},
        {"name": "b", "source": "nnunet", "path": str(make_nnunet(tmp_path / "nn", n=6))},
    ]
    cfg = one_round(tmp_path / "run", clients)
    src = root / "imagesTr" / "b0.nii.gz"
    (out,) = predict_images(tmp_path / "run", "a", [src], tmp_path / "pred")
    img: Any = nib.load(out[0])
    assert img.shape == (24, 20, Z) and np.allclose(img.affine, AFFINE)
    # The same mask as the model on channel 1 (T1w) by hand.
    _, model = load_client_model(tmp_path / "run", "a", torch.device("cpu"))
    vol = read_volume(src)
    how = VolumeInput(1, None, "T1w", "mr")
    assert np.array_equal(
        np.asarray(img.dataobj), predict_volume(model, cfg, cfg.data.clients[0], vol, how)
    )
    # The exported ONNX model of that client, given the slices the sidecar's steps describe,
    # gives the same mask.
    import onnxruntime as ort

    from fedoap.data.volumes import prepare_volume as prep
    from fedoap.export import export_model

    res = export_model(tmp_path / "run", "a", tmp_path / "a.onnx")
    assert res.info["normalize"] == "unit" and "NIfTI" in res.info["preprocessing"]["order"][0]
    assert res.info["client_data"]["channel"] == "T1w"
    prepared = prep(vol.data[..., 1], vol.zooms, "mr", VolumeSpec(), 32, "x")
    slices = prepared.slices[:, None]
    logits = ort.InferenceSession(str(res.model)).run(None, {"image": slices})[0]
    with torch.no_grad():
        assert np.abs(logits - model(torch.from_numpy(slices)).numpy()).max() < 1e-4
    restored = restore_slices((logits[:, 0] > 0).astype(np.uint8), prepared)
    assert np.array_equal(restored, np.asarray(img.dataobj))
    # A 2D image for a volume client, or an unknown client, is refused with the reason.
    png = tmp_path / "x.png"
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(png)
    with pytest.raises(ConfigError, match="trained on 3D volumes"):
        predict_images(tmp_path / "run", "a", [png], tmp_path / "p1")
    with pytest.raises(ConfigError, match="client 'zz' is not in the run's config; clients: a, b"):
        predict_images(tmp_path / "run", "zz", [src], tmp_path / "p2")
    # An nnU-Net client given a file of another channel by name.
    other = tmp_path / "x_0001.nii.gz"
    other.symlink_to(src)
    with pytest.raises(DataError, match=r"is channel 0001 by its name, but the model was trained"):
        predict_images(tmp_path / "run", "b", [other], tmp_path / "p3")


# --------------------------------------------------------------------------------------------
# Size bounds: a small file that declares a huge volume is refused from its header
# --------------------------------------------------------------------------------------------


def header_only(path: Path, shape: tuple[int, ...]) -> Path:
    """A .nii.gz of a NIfTI header that declares ``shape`` float32 voxels, and no voxels."""
    hdr = nib.Nifti1Header()
    hdr.set_data_shape(shape)
    hdr.set_data_dtype(np.float32)
    path.write_bytes(gzip.compress(hdr.binaryblock + b"\0" * 4))
    return path


@pytest.mark.parametrize("shape", [(2000, 2000, 150), (7000, 7000, 7000)], ids=str)
def test_a_volume_declaring_too_many_voxels_is_refused_before_reading(tmp_path, shape, monkeypatch):
    path = header_only(tmp_path / "bomb.nii.gz", shape)
    assert path.stat().st_size < 200

    def no_read(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the voxels were read")

    monkeypatch.setattr(nib.arrayproxy.ArrayProxy, "__array__", no_read)
    with pytest.raises(
        DataError,
        match=r"bomb\.nii\.gz: shape .* voxels, more than the limit of "
        r"300,000,000 \(data\.max_volume_voxels",
    ):
        read_volume(path)


def test_the_voxel_bound_reaches_training_data(tmp_path):
    root = make_nnunet(tmp_path / "ds", n=2)
    cfg = DataConfig(image_size=32, cache=False, max_volume_voxels=24 * 20 * Z - 1)
    with pytest.raises(DataError, match=r"case00_0000\.nii\.gz: shape .*data\.max_volume_voxels"):
        load_raw(spec("nnunet", root), cfg)
    assert load_raw(spec("nnunet", root), dataclasses.replace(cfg, max_volume_voxels=24 * 20 * Z))


def test_a_4th_axis_too_long_for_channels_is_refused_before_reading(tmp_path):
    path = header_only(tmp_path / "series.nii.gz", (32, 32, 8, 30000))
    with pytest.raises(DataError, match=r"series\.nii\.gz: shape .*: a 4th axis of 30,000 is not"):
        read_volume(path)
