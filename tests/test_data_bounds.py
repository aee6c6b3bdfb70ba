"""Bounds on what a data file may make fedoap do: decompression bombs, hostile or corrupt ``.npz``
members, image values that overflow float32, and error messages that name the file once."""

from __future__ import annotations

import dataclasses
import inspect
import io
import os
import re
import struct
import time
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from fedoap.config import ClientSpec, DataConfig
from fedoap.data import DataError, prepare_clients
from fedoap.data.sources import load_npz, read_image
from fedoap.data.transforms import normalize
from tests.test_data import data_cfg, write_npz, write_pair


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def write_png_bomb(path: Path, side: int, rows: int | None = None) -> Path:
    """A 1-bit greyscale PNG of side x side zeros: ~20 KB on disk for 13000^2 (169 MB decoded).

    ``rows`` writes only the first rows (a truncated image) where the rest cannot matter.
    """
    row = bytes(1 + (side + 7) // 8)  # filter byte + packed bits
    packer = zlib.compressobj(9)
    data = b"".join(packer.compress(row) for _ in range(side if rows is None else rows))
    data += packer.flush()
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)  # 1 bit, greyscale
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", data)
        + _png_chunk(b"IEND", b"")
    )
    return path


@pytest.fixture
def no_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if PIL starts decoding pixel data (the allocation the bound must prevent)."""

    def load(self: ImageFile.ImageFile) -> None:
        raise AssertionError(f"decoded {self.size[0]}x{self.size[1]} pixels")

    monkeypatch.setattr(ImageFile.ImageFile, "load", load)


# ---------------------------------------------------------------------------- image size bound


def test_png_bomb_is_refused_from_its_header(tmp_path, no_decoding):
    path = write_png_bomb(tmp_path / "bomb.png", 13000)
    assert path.stat().st_size < 64_000  # small on disk, 169 MB decoded
    t0 = time.perf_counter()
    with pytest.raises(DataError) as info:
        read_image(path, channels=1)  # the default bound: 50 MP
    assert time.perf_counter() - t0 < 0.5
    msg = str(info.value)
    assert msg.startswith(f"{path}: ")
    assert "13000x13000" in msg and "169,000,000" in msg and "50,000,000" in msg
    assert "data.max_image_pixels" in msg


def test_png_beyond_pils_own_limit_is_a_data_error(tmp_path, no_decoding):
    # 900 MP is past PIL's hard limit (2 x Image.MAX_IMAGE_PIXELS): PIL raises
    # DecompressionBombError inside Image.open, before the pixel data is read, so only the first
    # rows are written.
    path = write_png_bomb(tmp_path / "huge.png", 30000, rows=10)
    with pytest.raises(DataError) as info:
        read_image(path, channels=1)
    msg = str(info.value)
    assert msg.startswith(f"{path}: ") and "900,000,000" in msg
    assert "data.max_image_pixels" in msg
    assert not isinstance(info.value, Image.DecompressionBombError)


def test_read_image_bound_is_keyword_with_default():
    param = inspect.signature(read_image).parameters["max_pixels"]
    assert param.kind is inspect.Parameter.KEYWORD_ONLY and param.default == 50_000_000
    assert DataConfig().max_image_pixels == 50_000_000


def test_max_image_pixels_reaches_folder_and_npz_readers(tmp_path):
    for stem in ("a", "b", "c"):
        write_pair(tmp_path / "f", stem, size=(20, 16))  # 320 pixels
    write_npz(tmp_path / "b.npz")  # 16x16 = 256 pixels
    for spec, name in [
        (ClientSpec(name="f", source="folder", path="f"), "a.png"),
        (ClientSpec(name="n", path="b.npz"), "b.npz"),
    ]:
        cfg = DataConfig(
            root=str(tmp_path), clients=(spec,), image_size=16, max_image_pixels=200, cache=False
        )
        with pytest.raises(DataError, match=r"data\.max_image_pixels") as info:
            prepare_clients(cfg)
        msg = str(info.value)
        assert msg.startswith(f"client '{spec.name}': ") and name in msg and "200" in msg
        # At the bound itself the data is accepted.
        ok = DataConfig(
            root=str(tmp_path), clients=(spec,), image_size=16, max_image_pixels=320, cache=False
        )
        assert len(prepare_clients(ok)) == 1


# ---------------------------------------------------------------------------- npz files


def test_npz_that_is_not_a_zip(tmp_path):
    text = tmp_path / "notes.npz"
    text.write_text("this is not an archive\n")
    bare = tmp_path / "bare.npz"
    np.save(bare.with_suffix(".npy"), np.zeros((2, 4, 4), np.uint8))
    bare.with_suffix(".npy").rename(bare)  # a bare .npy array under an .npz name
    for path in (text, bare):
        with pytest.raises(DataError) as info:
            load_npz(path)
        msg = str(info.value)
        assert msg == f"{path}: not a valid .npz file (not a zip archive of .npy arrays)"


def test_empty_zip_reports_missing_arrays(tmp_path):
    path = tmp_path / "empty.npz"
    with zipfile.ZipFile(path, "w"):
        pass
    assert path.read_bytes()[:4] == b"PK\x05\x06"
    with pytest.raises(DataError, match=r"empty\.npz: missing array\(s\)"):
        load_npz(path)


def test_pickled_arrays_are_never_loaded(tmp_path):
    images = np.empty((12,), dtype=object)
    images[:] = [np.zeros((16, 16), np.uint8)] * 12
    for key, value in [("images", images), ("case_ids", np.array(["p0", 1, None], dtype=object))]:
        path = write_npz(tmp_path / f"{key}.npz", **{key: value})
        with pytest.raises(DataError) as info:
            load_npz(path)
        msg = str(info.value)
        assert msg.startswith(f"{path}: ") and f"'{key}'" in msg
        assert "pickled (object)" in msg and "allow_pickle" not in msg


def _npz_with_member(path: Path, member: str, payload: bytes) -> Path:
    """An npz with valid masks and ``member`` holding ``payload`` verbatim."""
    with zipfile.ZipFile(path, "w") as zf:
        buf = io.BytesIO()
        np.lib.format.write_array(buf, np.zeros((2, 4, 4), np.uint8))
        zf.writestr("masks.npy", buf.getvalue())
        zf.writestr(member, payload)
    return path


def _npy_header(shape: tuple[int, ...], descr: str = "|u1") -> bytes:
    buf = io.BytesIO()
    header = {"descr": descr, "fortran_order": False, "shape": shape}
    np.lib.format.write_array_header_1_0(buf, header)
    return buf.getvalue()


def test_npz_header_claiming_a_huge_shape_allocates_nothing(tmp_path):
    # 10^14 bytes declared, 32 present: reading it as declared would ask for 100 TB.
    payload = _npy_header((10**6, 10**4, 10**4)) + bytes(32)
    path = _npz_with_member(tmp_path / "liar.npz", "images.npy", payload)
    with pytest.raises(DataError) as info:
        load_npz(path)
    msg = str(info.value)
    assert msg.startswith(f"{path}: ") and "'images'" in msg and "(1000000, 10000, 10000)" in msg
    assert "32 bytes" in msg


def test_npz_images_beyond_the_pixel_bound(tmp_path):
    path = write_npz(tmp_path / "a.npz")
    with pytest.raises(DataError) as info:
        load_npz(path, max_pixels=255)
    msg = str(info.value)
    assert msg.startswith(f"{path}: ") and "16x16" in msg and "256" in msg and "255" in msg
    assert "data.max_image_pixels" in msg
    assert len(load_npz(path, max_pixels=256).images) == 12


def _patch_central_directory(path: Path, member: str, offset: int, fmt: str, value: int) -> None:
    """Overwrite one field of ``member``'s central-directory record (and its local header)."""
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo(member)
    local_offset = {8: 6, 10: 8}[offset]  # flags and method sit 2 bytes earlier in local headers
    struct.pack_into(fmt, data, info.header_offset + local_offset, value)
    start = data.find(b"PK\x01\x02")  # the first central-directory record
    while start >= 0:
        name_len = struct.unpack_from("<H", data, start + 28)[0]
        if data[start + 46 : start + 46 + name_len] == member.encode():
            struct.pack_into(fmt, data, start + offset, value)
            break
        start = data.find(b"PK\x01\x02", start + 4)
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["encrypted", "unknown_method", "corrupt_deflate", "oom"])
def test_npz_zip_damage_names_the_file(tmp_path, monkeypatch, damage):
    path = tmp_path / "a.npz"
    rng = np.random.default_rng(0)
    arrays = {
        "images": rng.integers(0, 4, (12, 16, 16), dtype=np.uint8),
        "masks": np.zeros((12, 16, 16), np.uint8),
    }
    np.savez_compressed(path, **arrays)
    if damage == "encrypted":  # a flipped flag bit: zipfile raises RuntimeError
        _patch_central_directory(path, "images.npy", 8, "<H", 0x1)
    elif damage == "unknown_method":  # zipfile raises NotImplementedError
        _patch_central_directory(path, "images.npy", 10, "<H", 99)
    elif damage == "corrupt_deflate":  # zlib.error from inside the deflate stream
        with zipfile.ZipFile(path) as zf:
            info = zf.getinfo("images.npy")
        data = bytearray(path.read_bytes())
        start = info.header_offset + 30 + len(info.filename) + len(info.extra)
        data[start : start + info.compress_size] = b"\xff" * info.compress_size
        path.write_bytes(bytes(data))
    else:

        def no_memory(*args: object, **kwargs: object) -> None:
            raise MemoryError

        monkeypatch.setattr(np.lib.format, "read_array", no_memory)
    with pytest.raises(DataError) as info:
        load_npz(path)
    msg = str(info.value)
    assert msg.startswith(f"{path}: ") and "allow_pickle" not in msg


BAD_DTYPES = [
    np.zeros((12, 16, 16), np.complex64),
    np.zeros((12, 16, 16), "datetime64[s]"),
    np.zeros((12, 16, 16), "timedelta64[s]"),
    np.full((12, 16, 16), "0"),
    np.full((12, 16, 16), b"0"),
]


# A long-double mask of {0,1} is harmless (checked and cast to uint8); long-double images are
# refused because torch cannot hold them.
@pytest.mark.parametrize(
    "key, bad",
    [(k, b) for k in ("images", "masks") for b in BAD_DTYPES]
    + [("images", np.zeros((12, 16, 16), np.longdouble))],
    ids=lambda v: v if isinstance(v, str) else str(v.dtype),
)
def test_npz_dtypes_that_cannot_hold_images_or_masks(tmp_path, key, bad):
    if bad.dtype == np.longdouble and np.finfo(np.longdouble).bits == 64:
        pytest.skip("long double is float64 on this platform")
    path = write_npz(tmp_path / "a.npz", **{key: bad})
    with pytest.raises(DataError) as info:
        load_npz(path)
    msg = str(info.value)
    assert msg.startswith(f"{path}: ") and f"'{key}'" in msg and str(bad.dtype) in msg


def test_bool_images_are_refused_bool_masks_accepted(tmp_path):
    path = write_npz(tmp_path / "a.npz", images=np.zeros((12, 16, 16), bool))
    with pytest.raises(DataError, match=r"'images'.*bool"):
        load_npz(path)
    masks = np.zeros((12, 16, 16), bool)
    masks[:, 2:5, 2:5] = True
    raw = load_npz(write_npz(tmp_path / "b.npz", masks=masks))
    assert raw.masks.dtype == np.uint8 and raw.masks.sum() == 12 * 9


def test_float_masks_in_01_or_0255_still_accepted(tmp_path):
    for scale in (1.0, 255.0):
        masks = np.zeros((12, 16, 16), np.float32)
        masks[:, 2:5, 2:5] = scale
        raw = load_npz(write_npz(tmp_path / f"m{scale:g}.npz", masks=masks))
        assert raw.masks.dtype == np.uint8 and raw.masks.sum() == 12 * 9


# ---------------------------------------------------------------------------- image values


def _old_zscore(images: np.ndarray) -> torch.Tensor:
    """The formula normalize() used before it guarded against overflow."""
    x = torch.from_numpy(np.ascontiguousarray(images)).float()
    x = x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    std = x.std(dim=(1, 2, 3), keepdim=True)
    return (x - mean) / std.clamp_min(1e-6)


def test_zscore_unchanged_on_ordinary_images():
    rng = np.random.default_rng(0)
    cases = [
        rng.integers(0, 256, (5, 16, 16), dtype=np.uint8),
        rng.integers(0, 256, (5, 16, 16, 3), dtype=np.uint8),
        rng.normal(3, 2, (5, 16, 16)).astype(np.float32),
        rng.normal(-1e4, 1e3, (5, 8, 8)),
        rng.integers(-1024, 3000, (5, 16, 16), dtype=np.int16),
        np.full((2, 8, 8), 7, np.uint8),  # constant: zeros
        np.zeros((2, 8, 8), np.float32),
    ]
    for images in cases:
        new, old = normalize(images, "zscore"), _old_zscore(images)
        assert new.dtype == torch.float32 and new.shape == old.shape
        torch.testing.assert_close(new, old, atol=1e-5, rtol=1e-5)
    assert not normalize(cases[-2], "zscore").any() and not normalize(cases[-1], "zscore").any()


def test_zscore_cannot_overflow():
    images = np.random.default_rng(0).random((4, 16, 16)).astype(np.float32)
    images[1] = 0.25  # constant
    ref = normalize(images, "zscore")
    for scaled in (images * np.float32(3e37), images.astype(np.float64) * 1e300):
        assert np.isfinite(scaled).all()
        out = normalize(scaled, "zscore")
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def _float_client(tmp_path: Path, name: str, scale: float, dtype: type, size: int) -> Path:
    rng = np.random.default_rng(1)
    images = rng.random((12, size, size))
    images[:, 2:6, 2:6] += 2.0
    return write_npz(tmp_path / name, size=size, images=(images * scale).astype(dtype))


@pytest.mark.parametrize("size", [16, 20])  # 20: letterboxed to 16 as well
def test_huge_float_images_train_like_ordinary_ones(tmp_path, size):
    def client(name: str, scale: float, dtype: type) -> DataConfig:
        path = _float_client(tmp_path, name, scale, dtype, size)
        old = time.time() - 60  # old enough to be cached (fedoap.data.cache.RACY_SECONDS)
        os.utime(path, (old, old))
        return data_cfg(tmp_path, ClientSpec(name="a", path=name))

    (ref,) = prepare_clients(client("ref.npz", 1.0, np.float32))
    assert not any("beyond" in n for n in ref.notes)
    for name, scale, dtype in [("f32.npz", 3e37, np.float32), ("f64.npz", 1e300, np.float64)]:
        cfg = client(name, scale, dtype)
        with np.load(tmp_path / name) as z:
            largest = float(np.abs(z["images"]).max())
        for _ in range(2):  # built, then read back from the cache
            (got,) = prepare_clients(cfg)
            for split in ("train", "val", "test"):
                x = got.split(split).x
                assert torch.isfinite(x).all()
                torch.testing.assert_close(x, ref.split(split).x, atol=1e-4, rtol=1e-4)
            (note,) = [n for n in got.notes if "beyond" in n]
            hit = re.fullmatch(
                re.escape(f"{tmp_path / name}: image values up to ")
                + r"(\S+)"
                + re.escape(
                    " (beyond ±1e6); each image is divided by its largest |value| before "
                    "z-scoring, which leaves z-scores unchanged"
                ),
                note,
            )
            assert hit is not None, note
            # Letterboxing (size 20) may overshoot the file's largest value a little.
            assert largest * 0.9 <= float(hit.group(1)) <= largest * 1.3


def test_unit_normalisation_refuses_large_float_images(tmp_path):
    path = _float_client(tmp_path, "a.npz", 5e3, np.float32, 16)
    cfg = DataConfig(
        root=str(tmp_path), clients=(ClientSpec(name="a", path="a.npz"),), image_size=16
    )
    unit = dataclasses.replace(cfg, normalize="unit")
    with pytest.raises(DataError) as info:
        prepare_clients(unit)
    msg = str(info.value)
    assert msg.startswith(f"client 'a': {path}: ") and "data.normalize=zscore" in msg
    assert len(prepare_clients(cfg)) == 1  # zscore is fine
    _float_client(tmp_path, "b.npz", 1.0, np.float32, 16)
    small = dataclasses.replace(unit, clients=(ClientSpec(name="b", path="b.npz"),))
    assert len(prepare_clients(small)) == 1


# ---------------------------------------------------------------------------- messages


def test_split_error_names_the_client_once(tmp_path):
    path = write_npz(tmp_path / "a.npz", case_ids=np.array(["p0"] * 6 + ["p1"] * 6))
    with pytest.raises(DataError) as info:
        prepare_clients(data_cfg(tmp_path, ClientSpec(name="a", path="a.npz")))
    msg = str(info.value)
    assert msg.startswith("client 'a': ") and msg.count("client 'a'") == 1
    assert str(path) in msg and "2 case(s) cannot be split" in msg
