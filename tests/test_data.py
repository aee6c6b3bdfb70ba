"""Data loading, validation of bad input, and patient-level splits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fedoap.config import ClientSpec, DataConfig, SplitConfig
from fedoap.data import DataError, prepare_clients
from fedoap.data.sources import load_folder, load_npz
from fedoap.data.splits import cap_cases, split_by_case
from fedoap.data.synthetic import STYLES, generate_client


def write_npz(path: Path, n=12, size=16, **override):
    rng = np.random.default_rng(0)
    arrays = {
        "images": rng.integers(0, 255, (n, size, size), dtype=np.uint8),
        "masks": (rng.random((n, size, size)) > 0.8).astype(np.uint8),
        "case_ids": np.array([f"p{i // 2}" for i in range(n)]),
    }
    arrays.update(override)
    np.savez(path, **{k: v for k, v in arrays.items() if v is not None})
    return path


def write_pair(root: Path, stem: str, size=(20, 16), mask_size=None, mask_value=1, ext=".png"):
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    img = np.full(size[::-1], 100, np.uint8)
    img[2:5, 2:5] = 200
    Image.fromarray(img).save(root / "images" / f"{stem}{ext}")
    m = np.zeros((mask_size or size)[::-1], np.uint8)
    m[2:5, 2:5] = mask_value
    Image.fromarray(m).save(root / "masks" / f"{stem}.png")


def data_cfg(tmp_path: Path, *clients: ClientSpec, size=16) -> DataConfig:
    return DataConfig(root=str(tmp_path), clients=tuple(clients), image_size=size)


# ---------------------------------------------------------------------------- good input


def test_npz_roundtrip(tmp_path):
    write_npz(tmp_path / "a.npz")
    raw = load_npz(tmp_path / "a.npz")
    assert raw.images.shape == (12, 16, 16) and raw.masks.dtype == np.uint8
    assert set(raw.case_ids) == {f"p{i}" for i in range(6)}


def test_folder_pairs_matched_by_name_not_order(tmp_path):
    # Masks are written in a different order and one differs in content: pairing must follow
    # names even though sorted/unsorted listings would pair them differently.
    for stem in ["b", "a", "c"]:
        write_pair(tmp_path, stem)
    special = np.zeros((16, 20), np.uint8)
    special[10:14, 10:14] = 1
    Image.fromarray(special).save(tmp_path / "masks" / "b.png")
    raw = load_folder(tmp_path)
    assert list(raw.names) == ["a", "b", "c"]
    b = list(raw.names).index("b")
    assert raw.masks[b, 10:14, 10:14].all() and raw.masks[b].sum() == 16


def test_folder_case_regex_and_suffix(tmp_path):
    root = tmp_path / "lgg"
    for case in ("TCGA_A", "TCGA_B"):
        for i in (1, 2):
            (root / case).mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.full((8, 8, 3), 50, np.uint8)).save(root / case / f"{case}_{i}.tif")
            Image.fromarray(np.zeros((8, 8), np.uint8)).save(root / case / f"{case}_{i}_mask.tif")
    raw = load_folder(
        root, image_dir=".", mask_dir=".", mask_suffix="_mask", case_regex=r"^(.*)_\d+$", channel=1
    )
    assert raw.images.shape == (4, 8, 8)
    assert sorted(set(raw.case_ids)) == ["TCGA_A", "TCGA_B"]


def test_255_masks_are_accepted_with_a_note(tmp_path):
    write_pair(tmp_path, "a", mask_value=255)
    raw = load_folder(tmp_path)
    assert set(np.unique(raw.masks)) <= {0, 1} and raw.masks.sum() == 9
    assert any("255-valued mask converted" in n for n in raw.notes)
    write_npz(tmp_path / "m.npz", masks=np.full((12, 16, 16), 255, np.uint8))
    assert "255-valued" in load_npz(tmp_path / "m.npz").notes[0]


def test_folder_images_are_letterboxed(tmp_path):
    write_pair(tmp_path, "a", size=(40, 20))
    raw = load_folder(tmp_path, resize_to=16)
    assert raw.images.shape == (1, 16, 16)
    assert raw.images[0, :4].max() == 0 and raw.images[0, -4:].max() == 0  # zero padding top/bottom


def test_raw_public_layouts_from_shared_data(shared_data):
    busi = load_folder(
        shared_data / "raw_samples" / "Dataset_BUSI_with_GT",
        image_dir=".",
        mask_dir=".",
        mask_suffix="_mask",
        resize_to=64,
    )
    assert len(busi.images) == 12
    assert any("merged 2 masks" in n for n in busi.notes) or any("merged" in n for n in busi.notes)
    kvasir = load_folder(shared_data / "raw_samples" / "Kvasir-SEG", resize_to=64)
    assert len(kvasir.images) == 6 and any("lossy mask thresholded" in n for n in kvasir.notes)
    lgg = load_folder(
        shared_data / "raw_samples" / "kaggle_3m",
        image_dir=".",
        mask_dir=".",
        mask_suffix="_mask",
        case_regex=r"^(.*)_\d+$",
        channel=1,
        resize_to=64,
    )
    assert len(set(lgg.case_ids)) < len(lgg.images)


# ---------------------------------------------------------------------------- bad input


def test_missing_file_names_it(tmp_path):
    cfg = data_cfg(tmp_path, ClientSpec(name="x", path="nope.npz"))
    with pytest.raises(DataError, match=r"client 'x': data file not found: .*nope\.npz"):
        prepare_clients(cfg)


def test_corrupt_npz_names_it(tmp_path):
    p = write_npz(tmp_path / "a.npz")
    p.write_bytes(p.read_bytes()[:200])
    with pytest.raises(DataError, match=r"a\.npz: cannot read as \.npz"):
        load_npz(p)


def test_truncated_image_names_it(tmp_path):
    write_pair(tmp_path, "a", size=(64, 64))
    img = tmp_path / "images" / "a.png"
    img.write_bytes(img.read_bytes()[:60])
    with pytest.raises(DataError, match=r"images/a\.png: cannot decode image"):
        load_folder(tmp_path)


def test_mask_size_mismatch_names_the_mask(tmp_path):
    write_pair(tmp_path, "a", size=(20, 16), mask_size=(16, 16))
    with pytest.raises(
        DataError, match=r"masks/a\.png: mask size 16x16 differs from its image a\.png \(20x16\)"
    ):
        load_folder(tmp_path)
    write_npz(tmp_path / "b.npz", masks=np.zeros((12, 8, 8), np.uint8))
    with pytest.raises(DataError, match=r"b\.npz: 'masks' shape \(12, 8, 8\) does not match"):
        load_npz(tmp_path / "b.npz")


def test_mask_values_outside_01(tmp_path):
    write_pair(tmp_path, "a", mask_value=2)
    with pytest.raises(
        DataError,
        match=r"masks/a\.png: mask values must be in \{0,1\}.*found 2 distinct values: 0, 2",
    ):
        load_folder(tmp_path)
    write_npz(tmp_path / "b.npz", masks=np.full((12, 16, 16), 3, np.uint8))
    with pytest.raises(DataError, match=r"b\.npz: mask values"):
        load_npz(tmp_path / "b.npz")


def test_nan_in_images(tmp_path):
    images = np.random.default_rng(0).random((12, 16, 16)).astype(np.float32)
    images[5, 3, 3] = np.nan
    write_npz(tmp_path / "a.npz", images=images)
    with pytest.raises(
        DataError, match=r"a\.npz: images contain NaN .* 1 image\(s\), first at index 5"
    ):
        load_npz(tmp_path / "a.npz")


def test_empty_client(tmp_path):
    write_npz(
        tmp_path / "a.npz",
        n=0,
        images=np.zeros((0, 16, 16), np.uint8),
        masks=np.zeros((0, 16, 16), np.uint8),
        case_ids=np.array([], dtype=str),
    )
    with pytest.raises(DataError, match=r"a\.npz: the client has no images"):
        load_npz(tmp_path / "a.npz")
    (tmp_path / "f" / "images").mkdir(parents=True)
    (tmp_path / "f" / "masks").mkdir()
    with pytest.raises(DataError, match=r"no images found"):
        load_folder(tmp_path / "f")


def test_unmatched_image_or_mask(tmp_path):
    write_pair(tmp_path, "a")
    (tmp_path / "masks" / "a.png").rename(tmp_path / "masks" / "z.png")
    with pytest.raises(DataError, match=r"images/a\.png: no mask named 'a\.\*'"):
        load_folder(tmp_path)


def test_too_few_cases_to_split(tmp_path):
    write_npz(tmp_path / "a.npz", case_ids=np.array(["p0"] * 6 + ["p1"] * 6))
    with pytest.raises(DataError, match=r"client 'x'.*2 case\(s\) cannot be split"):
        prepare_clients(data_cfg(tmp_path, ClientSpec(name="x", path="a.npz")))


# ---------------------------------------------------------------------------- splits


def test_patient_level_splits_never_share_a_case(shared_data):
    cfg = DataConfig(
        root=str(shared_data),
        clients=(
            ClientSpec(name="lgg", path="lgg_brain_mri.npz"),
            ClientSpec(name="cvc", path="cvc_clinicdb_polyp.npz"),
        ),
        max_train_images=300,
        max_val_images=100,
    )
    for client in prepare_clients(cfg):
        sets = {s: set(client.split(s).case_ids) for s in ("train", "val", "test")}
        assert not sets["train"] & sets["val"]
        assert not sets["train"] & sets["test"]
        assert not sets["val"] & sets["test"]
        assert len(client.train) <= 300 and len(client.val) <= 100
        assert len(client.test) > 0


def test_split_fractions_and_determinism():
    ids = np.repeat([f"c{i}" for i in range(40)], 3)
    a = split_by_case(ids, SplitConfig(0.5, 0.25, 0.25, seed=3))
    b = split_by_case(ids, SplitConfig(0.5, 0.25, 0.25, seed=3))
    c = split_by_case(ids, SplitConfig(0.5, 0.25, 0.25, seed=4))
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["test"], c["test"])
    assert [len(set(ids[a[k]])) for k in ("train", "val", "test")] == [20, 10, 10]
    assert sorted(np.concatenate(list(a.values())).tolist()) == list(range(120))


def test_val_cap_keeps_whole_cases():
    ids = np.repeat([f"c{i}" for i in range(10)], 5)
    idx = cap_cases(np.arange(50), ids, 12, seed=0)
    kept = set(ids[idx])
    assert len(idx) <= 12 and len(idx) == 5 * len(kept)


# ---------------------------------------------------------------------------- synthetic


def test_synthetic_is_deterministic_and_well_formed():
    for style in STYLES:
        a = generate_client(style, 20, 32, "k", seed=1)
        b = generate_client(style, 20, 32, "k", seed=1)
        assert np.array_equal(a.images, b.images) and np.array_equal(a.masks, b.masks)
        assert a.images.shape == (20, 32, 32) and a.images.dtype == np.uint8
        assert set(np.unique(a.masks)) <= {0, 1}
        assert a.masks.any()
    c = generate_client("mri", 20, 32, "k", seed=2)
    assert not np.array_equal(c.images, generate_client("mri", 20, 32, "k", seed=1).images)


def test_synthetic_styles_differ_in_intensity_and_lesion_size():
    from scipy.ndimage import binary_dilation

    stats = {}
    for style in STYLES:
        c = generate_client(style, 60, 64, style)
        img = c.images.astype(float)
        m = c.masks.astype(bool)
        # Surroundings: a 4-px ring outside each lesion (not the black background).
        ring = np.stack([binary_dilation(x, iterations=4) for x in m]) & ~m
        size = m.reshape(60, -1).mean(1)[m.reshape(60, -1).any(1)].mean()
        stats[style] = (img[m].mean() - img[ring].mean(), size)
    contrast = {s: v[0] for s, v in stats.items()}
    # Tumours are brighter than their surroundings in MRI, darker in ultrasound and CT.
    assert contrast["mri"] > 0 and contrast["ultrasound"] < 0 and contrast["ct"] < 0
    sizes = {s: v[1] for s, v in stats.items()}
    assert sizes["endoscopy"] > 2 * sizes["ct"]


# ---------------------------------------------------------------------------- where: sites


def test_where_selects_rows_and_keeps_cases_whole(tmp_path):
    n = 24
    site = np.array(["A"] * 10 + ["B"] * 8 + ["C"] * 6)
    write_npz(tmp_path / "m.npz", n=n, site=site)
    raw = load_npz(tmp_path / "m.npz", where={"site": ["A", "C"]})
    assert len(raw.images) == 16 and set(raw.case_ids) == {
        f"p{i // 2}" for i in [*range(10), *range(18, 24)]
    }
    assert "16 of 24 images where site=['A', 'C']" in raw.notes[0]
    only_b = load_npz(tmp_path / "m.npz", where={"site": "B"})
    assert list(only_b.names) == [f"{i:06d}" for i in range(10, 18)]


def test_where_errors_name_the_file_and_what_is_there(tmp_path):
    write_npz(tmp_path / "m.npz", n=12, site=np.array(["A"] * 12), year=np.arange(12))
    with pytest.raises(DataError, match=r"m.npz: where \{'site': 'Z'\} selects no image.*'A'"):
        load_npz(tmp_path / "m.npz", where={"site": "Z"})
    with pytest.raises(DataError, match=r"m.npz: where.hospital: the file has no array"):
        load_npz(tmp_path / "m.npz", where={"hospital": "A"})
    assert len(load_npz(tmp_path / "m.npz", where={"year": [3, 4]}).images) == 2  # ints as text


def test_where_is_refused_where_it_means_nothing():
    from fedoap.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"data.clients\[0\].where: selects rows of an npz"):
        load_config(
            None, ["data.clients=[{name: a, source: synthetic, style: mri, where: {s: 1}}]"]
        )
    with pytest.raises(ConfigError, match=r"where.site: must be a value or a list"):
        load_config(None, ["data.clients=[{name: a, path: x.npz, where: {site: {a: 1}}}]"])


def test_lgg_sites_match_the_tcga_institutions(shared_data):
    expected = {"CS": (358, 16), "DU": (1878, 45), "FG": (640, 14), "HT": (1029, 34), "EZ": (24, 1)}
    for site, (slices, patients) in expected.items():
        raw = load_npz(shared_data / "lgg_brain_mri.npz", where={"site": site})
        assert (len(raw.images), len(set(raw.case_ids))) == (slices, patients), site


# ---------------------------------------------------------------------------- data size


def test_max_train_cases_draws_nested_patients_and_leaves_val_and_test_alone(tmp_path):
    # 40 patients of 3 images each; a 40/15/45 split gives 16 training patients.
    n = 120
    write_npz(tmp_path / "a.npz", n=n, case_ids=np.array([f"p{i // 3:02d}" for i in range(n)]))
    split = SplitConfig(train=0.4, val=0.15, test=0.45, seed=3)

    def load(k):
        cfg = DataConfig(
            root=str(tmp_path),
            clients=(ClientSpec(name="a", path="a.npz"),),
            image_size=16,
            split=split,
            max_train_cases=k,
        )
        return prepare_clients(cfg)[0]

    full = load(None)
    assert full.case_counts() == {"train": 16, "val": 6, "test": 18}
    kept = {k: set(load(k).train.case_ids) for k in (2, 4, 8, 16, 99)}
    assert [len(v) for v in kept.values()] == [2, 4, 8, 16, 16]
    assert kept[2] < kept[4] < kept[8] < kept[16] == set(full.train.case_ids)
    two = load(2)
    assert len(two.train) == 6  # whole patients: all their images
    for s in ("val", "test"):  # untouched
        assert list(two.split(s).names) == list(full.split(s).names)


def test_the_split_seed_can_follow_the_run_seed():
    from fedoap.config import Config

    fixed = Config(seed=4)
    assert fixed.data.split.seed == 0
    follow = Config(seed=4, data=DataConfig(split=SplitConfig(follow_run_seed=True)))
    assert follow.data.split.seed == 4
    # The resolved config reads back to itself, and a new run seed moves the split with it.
    from fedoap.config import apply_overrides, from_dict

    again = from_dict(Config, apply_overrides(follow.to_dict(), ["seed=7"]))
    assert again.data.split.seed == 7 and again.digest() != follow.digest()
    assert from_dict(Config, follow.to_dict()) == follow
