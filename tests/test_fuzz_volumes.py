"""Seeded fuzzing of 3D inputs: NIfTI headers, dataset.json and DICOM tags.

The companion of ``tests/test_fuzz.py`` for the volume sources. A tiny valid nnU-Net or Decathlon
dataset, or a DICOM series, gets one random fault, and the outcome must be a clean run (exit 0,
every saved weight finite) or one ``error:`` line with exit code 2 that names the damaged file;
read directly, a series gives a volume of finite numbers or a ``DataError`` naming its file or
folder. Never a traceback. Cases are drawn from a fixed seed, so a failure reproduces;
``FEDOAP_FUZZ_CASES`` raises their number for a longer hunt
(``FEDOAP_FUZZ_CASES=200 pytest tests/test_fuzz_volumes.py``).
"""

from __future__ import annotations

import copy
import gzip
import json
import math
import os
import re
import struct
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
import yaml

from fedoap.cli.main import app
from fedoap.data.dicom import read_dicom_series
from fedoap.data.errors import DataError
from fedoap.data.volumes import read_volume
from tests.test_fuzz import BASE, check_outcome, cli
from tests.test_volumes import (
    Z,
    case_arrays,
    header_only,
    load,
    make_msd,
    make_nnunet,
    save,
    spec,
)

#: Cases per fuzz test (three times as many DICOM series, a quarter as many predictions): the
#: default runs the whole file in about 25 s on our two cores.
CASES = int(os.environ.get("FEDOAP_FUZZ_CASES", "16"))

# pydicom warns of every malformed value it reads, and feeding it those is the point here.
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

NAN, INF = float("nan"), float("inf")


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread() -> Iterator[None]:
    """Train on one thread. A clean run trains a width-2 model on 48 slices: a second thread
    does not speed it up, and beside a busy core it spin-waits (a second per run becomes ten)."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


#: NIfTI-1 header fields: (byte offset, struct format of one element) in the 348-byte header,
#: little endian as nibabel writes it here.
FIELDS: dict[str, tuple[int, str]] = {
    "sizeof_hdr": (0, "<i"),
    "dim": (40, "<h"),  # 8 of them: dim[0] the number of dimensions, dim[1..7] the sizes
    "datatype": (70, "<h"),
    "bitpix": (72, "<h"),
    "pixdim": (76, "<f"),  # 8: pixdim[0] qfac, pixdim[1..3] the voxel spacing
    "vox_offset": (108, "<f"),
    "scl_slope": (112, "<f"),
    "scl_inter": (116, "<f"),
    "qform_code": (252, "<h"),
    "sform_code": (254, "<h"),
    "quatern": (256, "<f"),  # 6: quatern_b, c, d, qoffset_x, y, z
    "srow": (280, "<f"),  # 12: srow_x, srow_y, srow_z
    "magic": (344, "4s"),
}


def put(raw: bytearray, field: str, value: Any, index: int = 0) -> str:
    """Write ``value`` into element ``index`` of a header field; returns what was done."""
    offset, fmt = FIELDS[field]
    size = struct.calcsize(fmt)
    if fmt.endswith("f"):
        struct.pack_into(fmt, raw, offset + index * size, np.float32(value))
    elif fmt.endswith("h"):
        struct.pack_into(fmt, raw, offset + index * size, int(value))
    else:
        struct.pack_into(fmt, raw, offset + index * size, value)
    return f"{field}[{index}]={value!r}"


def pick(rng: np.random.Generator, values: list[Any]) -> Any:
    return values[int(rng.integers(len(values)))]


def shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) < 50 else f"{text[:40]}... ({len(text):,} characters)"


# ------------------------------------------------------------------ NIfTI headers


def header_corruption(rng: np.random.Generator, raw: bytearray) -> str:
    """Change the header of an uncompressed NIfTI-1 file in place; returns what was done."""
    kind = int(rng.integers(15))
    if kind == 0:
        return put(raw, "dim", pick(rng, [0, -1, 1, 2, 4, 5, 7, 8, 9, 32767, -32768]))
    if kind == 1:
        size = pick(rng, [0, -1, 1, 2, 15, 17, 255, 4096, 32767, -32768])
        return put(raw, "dim", size, int(rng.integers(1, 5)))
    if kind == 2:
        codes = [0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 768, 1024, 1280, 1536, 1792, 2048]
        return put(raw, "datatype", pick(rng, [*codes, 2304, 3, 99, -1, 32767]))
    if kind == 3:
        return put(raw, "bitpix", pick(rng, [0, 1, 7, 8, 16, 24, 64, 128, -8, 32767]))
    if kind == 4:  # a consistent pair: the same bytes read as another type
        pairs = [(2, 8), (4, 16), (8, 32), (32, 64), (64, 64), (256, 8), (512, 16), (768, 32)]
        code, bits = pick(rng, [*pairs, (1024, 64), (1280, 64), (128, 24), (2048, 32), (1, 1)])
        put(raw, "bitpix", bits)
        return put(raw, "datatype", code)
    if kind == 5:
        value = pick(rng, [NAN, INF, -INF, 0.0, -1.0, -3.0, 1e-38, 1e38, 3.4e38])
        return put(raw, "pixdim", value, int(rng.integers(0, 5)))
    if kind == 6:
        value = pick(rng, [NAN, INF, -INF, 1e38, -1e38, 0.0, -1.0, 1e-38, 0.5])
        return put(raw, pick(rng, ["scl_slope", "scl_inter"]), value)
    if kind == 7:
        value = pick(rng, [0.0, 1.0, 348.0, 351.0, 353.0, 356.0, 1e6, 1e9, -352.0, NAN, INF, 1e38])
        return put(raw, "vox_offset", value)
    if kind == 8:
        value = pick(rng, [-1, 0, 1, 2, 3, 4, 5, 255, 32767, -32768])
        return put(raw, pick(rng, ["qform_code", "sform_code"]), value)
    if kind == 9:
        put(raw, "qform_code", 1)
        value = pick(rng, [NAN, INF, 1.0, 2.0, -2.0, 1e38])
        return "qform_code=1, " + put(raw, "quatern", value, int(rng.integers(6)))
    if kind == 10:
        put(raw, "sform_code", pick(rng, [1, 2, 4]))
        how = int(rng.integers(4))
        if how == 0:
            return put(raw, "srow", pick(rng, [NAN, INF, 1e38]), int(rng.integers(12)))
        if how == 1:  # a zero row: a singular matrix
            row = int(rng.integers(3))
            for i in range(4 * row, 4 * row + 3):
                put(raw, "srow", 0.0, i)
            return f"srow row {row} zero (singular)"
        if how == 2:
            for i in range(12):
                put(raw, "srow", 0.0, i)
            return "srow all zero"
        for i in range(4):  # row z = row x: singular, not zero
            struct.pack_into("<f", raw, 312 + 4 * i, struct.unpack_from("<f", raw, 280 + 4 * i)[0])
        return "srow z = srow x (singular)"
    if kind == 11:
        flips = int(pick(rng, [1, 4, 16, 64]))
        for _ in range(flips):
            raw[int(rng.integers(348))] ^= 1 << int(rng.integers(8))
        return f"{flips} bit flip(s) in the header"
    if kind == 12:
        size = pick(rng, [0, 540, 347, 349, -348, 0x5C010000])
        return put(raw, "sizeof_hdr", size)
    if kind == 13:
        return put(raw, "magic", pick(rng, [b"n+2\0", b"ni1\0", b"\0\0\0\0", b"n+1x", b"NII\0"]))
    ext = pick(rng, [b"\x01\0\0\0", b"\x01\0\0\0\x10\0\0\0\x06\0\0\0", b"\xff\xff\xff\xff"])
    raw[348 : 348 + len(ext)] = ext  # an extension flag (and header) over the first voxels
    return f"extension bytes {ext!r}"


def nnunet_client(root: Path, gz: bool) -> Path:
    """A 3-case nnU-Net dataset: the smallest that splits into train, val and test patients.
    ``gz`` False rewrites it as uncompressed ``.nii`` files (``file_ending: .nii``)."""
    make_nnunet(root, n=3)
    if not gz:
        for f in [*root.glob("*Tr/*.nii.gz")]:
            f.with_name(f.name[: -len(".gz")]).write_bytes(gzip.decompress(f.read_bytes()))
            f.unlink()
        meta = json.loads((root / "dataset.json").read_text())
        meta["file_ending"] = ".nii"
        (root / "dataset.json").write_text(json.dumps(meta))
    return root


def corrupt_nifti(rng: np.random.Generator, path: Path, how: Callable[..., str]) -> str:
    """Apply ``how`` to the header of ``path`` (gzipped or not, as it is)."""
    gz = path.name.endswith(".gz")
    raw = bytearray(gzip.decompress(path.read_bytes()) if gz else path.read_bytes())
    assert struct.unpack_from("<i", raw)[0] == 348, "FIELDS are little-endian offsets"
    what = how(rng, raw)
    path.write_bytes(gzip.compress(bytes(raw), mtime=0) if gz else bytes(raw))
    return what


def run_config(tmp_path: Path, client: dict[str, Any]) -> Path:
    cfg = copy.deepcopy(BASE)
    cfg["data"]["clients"] = [{"name": "a", **client}]
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def run_cli(tmp_path: Path, client: dict[str, Any], what: str, names: list[str]) -> str:
    """``fedoap run`` in-process; the outcome, checked, and an error names one of ``names``."""
    cfg_path = run_config(tmp_path, client)
    run_dir = tmp_path / "run"
    res = cli.invoke(app, ["run", "-c", str(cfg_path), "-o", str(run_dir), "-q"])
    outcome = check_outcome(res, run_dir, what)
    if outcome != "clean run":
        assert any(n in outcome for n in names), (what, names, outcome)
        assert len(outcome) < 1000, (what, outcome[:2000])  # one readable line
    return outcome


def nifti_case(rng: np.random.Generator, root: Path) -> tuple[str, list[str]]:
    """Damage the header of one image or label of ``root``; (what was done, the names an error
    must mention: the file, or its case)."""
    files = sorted([*root.glob("imagesTr/*.nii*"), *root.glob("labelsTr/*.nii*")])
    victim = files[int(rng.integers(len(files)))]
    if rng.random() < 0.1:  # a header alone, declaring a shape its (absent) voxels do not fill
        shape = pick(rng, [(24, 20, Z), (2000, 2000, 150), (24, 20, Z, 30000), (1, 1, 1), (7,) * 4])
        header_only(victim, shape)
        if not victim.name.endswith(".gz"):
            victim.write_bytes(gzip.decompress(victim.read_bytes()))
        what = f"{victim.parent.name}/{victim.name}: a header of shape {shape}, no voxels"
    else:
        what = f"{victim.parent.name}/{victim.name}: "
        what += corrupt_nifti(rng, victim, header_corruption)
    case = victim.name.split(".")[0].removesuffix("_0000")
    return what, [victim.name, f"case '{case}'"]


@pytest.mark.parametrize("case", range(CASES))
def test_corrupted_nifti_header_gives_a_clean_run_or_a_one_line_error(tmp_path, case):
    rng = np.random.default_rng([2026, 20, case])
    gz = bool(rng.integers(2))
    root = nnunet_client(tmp_path / "ds", gz)
    what, names = nifti_case(rng, root)
    what = f"case {case} ({'gz' if gz else 'nii'}): {what}"
    outcome = run_cli(tmp_path, {"source": "nnunet", "path": str(root)}, what, names)
    print(f"{what} -> {outcome}")


#: What the fuzzer found: nibabel's HeaderDataError (an unknown or unsupported datatype, a header
#: it reads as byte-swapped, a vox_offset inside the header, an infinite scl_inter) and
#: OverflowError (a vox_offset past a C long; a negative size, which numpy's memmap refuses)
#: escaped read_volume as tracebacks; a NaN affine failed only when predict wrote the mask.
@pytest.mark.parametrize(
    ("name", "field", "value", "index", "message"),
    [
        ("x.nii.gz", "datatype", 99, 0, r"cannot read as NIfTI .*: data code 99 not recognized"),
        ("x.nii", "datatype", 2048, 0, r"cannot read as NIfTI .*: data code 2048 not supported"),
        ("x.nii.gz", "dim", 9, 0, r"cannot read as NIfTI .*: data code 4096 not recognized"),
        ("x.nii", "vox_offset", 351.0, 0, r"cannot read as NIfTI .*: vox offset 351 too low"),
        ("x.nii.gz", "scl_inter", INF, 0, r"cannot read as NIfTI .*: .*invalid intercept inf"),
        ("x.nii", "vox_offset", 1e38, 0, r"cannot read its voxels \(corrupt or truncated\?\)"),
        # A NaN in the sform: read, predicted on, then nibabel refused to write the mask's header.
        ("x.nii.gz", "srow", NAN, 10, r"its affine \(the header's sform or qform\) is not finite"),
        (
            "x.nii",
            "dim",
            -32768,
            1,
            r"a volume must have 2 to 4 non-empty dimensions, got shape \(-32768, 20, 16\)",
        ),
    ],
)
def test_header_faults_the_fuzzer_found_are_errors_naming_the_file(
    tmp_path, name, field, value, index, message
):
    path = save(tmp_path / name, case_arrays(0)[0])
    corrupt_nifti(np.random.default_rng(0), path, lambda rng, raw: put(raw, field, value, index))
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}: {message}"):
        read_volume(path)


# ------------------------------------------------------------------ dataset.json

#: Replacement values for a dataset.json entry: wrong types, huge, deep, odd strings and paths.
ODD_JSON: list[Any] = [
    None,
    True,
    0,
    -1,
    1.5,
    2**31,
    2**63,
    10**30,
    -(10**30),
    "",
    "0",
    "x",
    "\u0661",  # an Arabic-Indic one: str.isdigit() says yes, int() reads 1
    "\u00b2",  # a superscript two: isdigit() yes, int() fails
    "\uff11",  # a full-width one
    "1e3",
    " 0",
    "0\0",
    [],
    {},
    [1, 2],
    {"a": 1},
    [[[[[[[[[[[[]]]]]]]]]]]],
    "../outside.nii.gz",
    "/etc/passwd",
    "x" * 100_000,
]

#: Odd values for a Decathlon ``training`` entry's ``image`` or ``label``.
ODD_PATHS: list[Any] = [
    None,
    1,
    "",
    " ",
    ".",
    "./imagesTr",
    "../b0.nii.gz",
    "./a/../../b0.nii.gz",
    "/etc/passwd",
    "./imagesTr/\0b0.nii.gz",
    "./imagesTr/b0.nii",
    "./imagesTr/missing.nii.gz",
    "./labelsTr/b1.nii.gz",
    "imagesTr/b0.nii.gz",  # case b0 again, spelled without ./
    ["./imagesTr/b0.nii.gz"],
    "./" + "x" * 5000 + ".nii.gz",
]

#: Odd keys for the index-keyed maps (``channel_names``, ``modality``, MSD ``labels``).
ODD_KEYS = ["", "-1", "01", "1e3", " 0", "0 ", "\u0661", "\u00b2", "\uff11", "0\0", "9" * 12, "x"]


def dataset_json_fault(rng: np.random.Generator, meta: dict[str, Any]) -> tuple[bytes, str]:
    """A valid dataset.json's ``meta`` with one random fault, as the bytes of the file, and what
    was done: in a value, a key, the structure, or the bytes."""
    kind = int(rng.integers(11))
    key = pick(rng, sorted(meta))
    what = "valid"
    if kind == 0:
        meta[key] = pick(rng, ODD_JSON)
        what = f"{key}={shown(meta[key])}"
    elif kind == 1:
        del meta[key]
        what = f"deleted {key}"
    elif kind == 2:  # a key or a value in channel_names, modality or labels
        key = pick(rng, [k for k in sorted(meta) if isinstance(meta[k], dict)])
        value = meta[key]
        inner = pick(rng, sorted(value))
        if rng.integers(2):
            odd = pick(rng, ODD_KEYS)
            value[odd] = value.pop(inner)
            what = f"{key}: key {inner!r} -> {odd!r}"
        else:
            value[inner] = pick(rng, ODD_JSON)
            what = f"{key}.{inner}={shown(value[inner])}"
    elif kind == 3 and "channel_names" in meta:  # nnU-Net region labels: a list of values
        region = pick(rng, [[1, 2], [1, -1], [], [1.5], [[1]], [True], [2**31], [1, "2"]])
        meta["labels"]["whole"] = region
        what = f"labels.whole={region!r}"
    elif kind == 3:  # the Decathlon case list
        training = meta["training"]
        k = int(rng.integers(len(training)))
        field = pick(rng, ["image", "label"])
        how = int(rng.integers(4))
        if how == 0:
            training.append(copy.deepcopy(training[k]))
            what = f"training[{k}] listed twice"
        elif how == 1:
            training[k] = pick(rng, ODD_JSON)
            what = f"training[{k}]={shown(training[k])}"
        elif how == 2:
            training[k][field] = pick(rng, ODD_PATHS)
            what = f"training[{k}].{field}={shown(training[k][field])}"
        else:
            del training[k][field]
            what = f"training[{k}].{field} deleted"
    elif kind == 4:
        depth = int(pick(rng, [50, 5000]))
        text = json.dumps(meta)[:-1] + f', "deep": {"[" * depth}{"]" * depth}}}'
        return text.encode(), f"nested {depth} deep"
    elif kind == 5:
        top = pick(rng, [[], "x", 1, None, [meta]])
        return json.dumps(top).encode(), f"top level {json.dumps(top)[:20]}"
    elif kind == 6:  # JSON keeps the last of duplicate keys
        text = json.dumps(meta)[:-1] + f', "{key}": {json.dumps(pick(rng, ODD_JSON))}}}'
        return text.encode(), f"{key} given twice"
    raw = json.dumps(meta, ensure_ascii=bool(rng.integers(2))).encode()
    if kind == 7:
        cut = int(rng.integers(len(raw)))
        return raw[:cut], f"truncated at byte {cut}"
    if kind == 8:
        at = int(rng.integers(len(raw)))
        return raw[:at] + b"\xff\xfe\xc3" + raw[at:], f"invalid UTF-8 at byte {at}"
    if kind == 9:
        at = int(rng.integers(len(raw)))
        flipped = bytes([raw[at] ^ (1 << int(rng.integers(8)))])
        return raw[:at] + flipped + raw[at + 1 :], f"bit flip at byte {at}"
    if kind == 10:
        bom = pick(rng, ["utf-8-sig", "utf-16"])
        return raw.decode().encode(bom), f"encoded as {bom}"
    return raw, what


@pytest.mark.parametrize("case", range(CASES))
def test_corrupted_dataset_json_gives_a_clean_run_or_a_one_line_error(tmp_path, case):
    rng = np.random.default_rng([2026, 21, case])
    layout = pick(rng, ["nnunet", "msd"])
    root = tmp_path / "ds"
    if layout == "nnunet":
        make_nnunet(root, n=3)
        client: dict[str, Any] = {"source": "nnunet", "path": str(root)}
    else:
        make_msd(root, n=3)
        client = {"source": "msd", "path": str(root), "channel": "FLAIR"}
    path = root / "dataset.json"
    raw, what = dataset_json_fault(rng, json.loads(path.read_text()))
    path.write_bytes(raw)
    what = f"case {case} ({layout}): {what}"
    # The error names dataset.json, or the file it led to.
    outcome = run_cli(tmp_path, client, what, [str(root)])
    print(f"{what} -> {outcome}")


@pytest.mark.parametrize(
    ("how", "message"),
    [
        # A NUL in a path: pathlib's resolve() raised ValueError (a traceback).
        ("nul", r"training\[1\]\.image must be a file's path, got './imagesTr/\\x00b1.nii.gz'"),
        # One case listed twice was read twice: its slices counted double, silently.
        ("twice", r"training\[3\] and training\[1\] are both case 'b1': list each case once"),
        # A channel name that is not a string was str()-ed into a name: "{'a': 1}".
        ("name", r"modality\.1: a channel name must be a string, got \{'a': 1\}"),
        # A long value was repeated whole in the error: a 100 KB line.
        ("long", r"'modality' must map channel indices to names, got 'xxx.*\.\.\.$"),
    ],
)
def test_dataset_json_faults_the_fuzzer_found_are_errors_naming_the_key(tmp_path, how, message):
    root = make_msd(tmp_path / "Task01", n=3)
    meta = json.loads((root / "dataset.json").read_text())
    if how == "nul":
        meta["training"][1]["image"] = "./imagesTr/\0b1.nii.gz"
    elif how == "twice":
        meta["training"].append({"image": "imagesTr/b1.nii.gz", "label": "labelsTr/b1.nii.gz"})
    elif how == "name":
        meta["modality"]["1"] = {"a": 1}
    else:
        meta["modality"] = "x" * 100_000
    (root / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match=rf"^{re.escape(str(root / 'dataset.json'))}: {message}"):
        load(spec("msd", root, channel="FLAIR"))


# ------------------------------------------------------------------ DICOM tags


def dicom_helpers() -> tuple[Any, Any]:
    """(write_series, _corrupt) of tests/test_dicom.py; skips without pydicom."""
    pytest.importorskip("pydicom", reason='needs the [dicom] extra: pip install -e ".[dicom]"')
    from tests.test_dicom import _corrupt, write_series

    return write_series, _corrupt


#: Tags of VR IS or DS (numbers as strings), whose malformed values ``_corrupt`` writes as raw
#: bytes.
NUMBER_STRING_TAGS = {
    "NumberOfFrames",
    "PixelSpacing",
    "ImageOrientationPatient",
    "ImagePositionPatient",
    "SliceThickness",
    "RescaleSlope",
    "RescaleIntercept",
}


def tag_corruption(rng: np.random.Generator, f: Path, positions: list[list[float]]) -> str:
    """One random fault in the tags (or bytes) of slice ``f``, whose series' slices lie at
    ``positions``; returns what was done."""
    import pydicom

    _, corrupt = dicom_helpers()
    kind = int(rng.integers(13))
    if kind == 0:
        key = pick(rng, ["Rows", "Columns"])
        value = pick(rng, [None, 0, 1, 5, 7, 65535])
    elif kind == 1:
        key = "NumberOfFrames"
        value = pick(rng, ["0", "1", "2", "ab", "-1", "1e3", "99999999999", 1, 2])
    elif kind == 2:
        key = "PixelSpacing"
        value = pick(rng, ["nan\\1", "inf\\1", "1", "1\\2\\3", "-1\\1", "1e400\\1", "abc", None])
    elif kind == 3:
        key = "ImageOrientationPatient"
        value = pick(
            rng,
            [
                [0, 0, 0, 0, 0, 0],
                [1, 0, 0, 0, 1],
                [2, 0, 0, 0, 2, 0],
                [1, 0, 0, 0, 0.99999, 0.001],
                [0, 1, 0, 1, 0, 0],
                "nan\\0\\0\\0\\1\\0",
                None,
            ],
        )
    elif kind == 4:
        key = "ImagePositionPatient"
        twin = pick(rng, positions)  # two slices in one place, or this one where it is
        value = pick(rng, [twin, "nan\\0\\0", "inf\\0\\0", [1e308, 0, 0], [1, 2], None])
    elif kind == 5:
        key = "SliceThickness"
        value = pick(rng, ["nan", "-1", "0", "inf", "abc", "1e400", 2.5])
    elif kind == 6:
        key = pick(rng, ["RescaleSlope", "RescaleIntercept"])
        value = pick(rng, ["nan", "inf", "1e38", "-1e38", "0", "abc", "1e400", None])
    elif kind == 7:
        key = pick(rng, ["BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation"])
        value = pick(rng, [0, 1, 2, 8, 12, 32, 64, None])
    elif kind == 8:
        key = pick(rng, ["SamplesPerPixel", "PhotometricInterpretation"])
        value = pick(rng, [0, 3]) if key == "SamplesPerPixel" else pick(rng, ["RGB", "PALETTE"])
    elif kind == 9:
        ds = pydicom.dcmread(f)
        data = ds.PixelData
        ds.PixelData = pick(rng, [b"", data[:-2], data[:-1], data + b"\0\0", data * 2])
        ds.save_as(f, enforce_file_format=True)
        return f"{f.name}: PixelData of {len(ds.PixelData)} bytes"
    elif kind == 10:
        key = "SeriesInstanceUID"
        value = pick(rng, [None, "1.2.3", "", "1." + "9" * 62])
    elif kind == 11:
        raw = f.read_bytes()
        cut = int(rng.integers(len(raw)))
        f.write_bytes(raw[:cut])
        return f"{f.name}: truncated at {cut}"
    else:
        raw = bytearray(f.read_bytes())
        for _ in range(int(pick(rng, [1, 8, 64]))):
            raw[int(rng.integers(132, len(raw)))] ^= 1 << int(rng.integers(8))
        f.write_bytes(bytes(raw))
        return f"{f.name}: bit flips"
    if isinstance(value, str) and key not in NUMBER_STRING_TAGS:
        ds = pydicom.dcmread(f)  # a string pydicom writes as it is
        setattr(ds, key, value)
        ds.save_as(f, enforce_file_format=True)
    else:
        corrupt(f, key, value)  # a malformed number string goes in as raw bytes
    return f"{f.name}: {key}={value!r}"


def dicom_case(rng: np.random.Generator, folder: Path) -> str:
    """A series of 1 to 4 slices with a fault in one or more of them."""
    import pydicom

    write_series, _ = dicom_helpers()
    write_series(folder, n=int(pick(rng, [1, 2, 4])), seed=int(rng.integers(1000)))
    files = sorted(folder.iterdir())
    positions = [[float(x) for x in pydicom.dcmread(f).ImagePositionPatient] for f in files]
    victims = rng.choice(len(files), size=int(rng.integers(1, len(files) + 1)), replace=False)
    return "; ".join(tag_corruption(rng, files[i], positions) for i in victims)


@pytest.mark.parametrize("case", range(3 * CASES))
def test_corrupted_dicom_tags_give_a_finite_volume_or_a_named_error(tmp_path, case):
    rng = np.random.default_rng([2026, 22, case])
    folder = tmp_path / "series"
    what = f"case {case}: " + dicom_case(rng, folder)
    try:
        vol = read_dicom_series(folder)
    except DataError as err:
        assert str(folder) in str(err), (what, str(err))
        outcome = f"error: {err}"
    else:
        assert np.isfinite(vol.data).all() and np.isfinite(vol.affine).all(), what
        assert all(math.isfinite(z) and z > 0 for z in vol.zooms), (what, vol.zooms)
        assert vol.data.ndim == 3, (what, vol.data.shape)
        outcome = f"volume {vol.data.shape}"
    print(f"{what} -> {outcome}")


def set_meta_vr(f: Path, tag: bytes, vr: bytes) -> None:
    """Overwrite the VR of file-meta element ``tag`` (group, element as little-endian bytes)."""
    raw = f.read_bytes()
    at = raw.index(tag, 132)
    f.write_bytes(raw[: at + 4] + vr + raw[at + 6 :])


@pytest.mark.parametrize(
    ("how", "message"),
    [
        # pydicom raised NotImplementedError and BytesLengthException from dcmread: tracebacks.
        ("meta vr", r"cannot read as DICOM .*Unknown Value Representation 'XX'"),
        ("meta length", r"cannot read as DICOM .*even multiple of bytes per value"),
        # pydicom reads a truncated file quietly: a slice without pixel data was skipped as if it
        # were a DICOMDIR, and the series lost a slice at its end.
        ("truncated", r"an image without pixel data \(a truncated file\?\)"),
        # Only the first slice's PixelSpacing was read: another slice's spacing was ignored.
        ("spacing", r"PixelSpacing \[0\.7, 0\.6\] differs from IM\d+\.dcm's \[0\.7, 0\.5\]"),
        # Rows 5 over 6 rows of pixels: pydicom dropped a row as "padding", a cropped image.
        ("rows", r"PixelData holds 10 bytes more than 5x5 \(Rows x Columns\) pixels of 16 bits"),
        # A position of 1e308 mm gave an affine that the NIfTI mask's float32 header made inf.
        ("position", r"ImagePositionPatient, .* give an affine entry of 1e\+308 mm, past"),
        # An empty PixelData read as None: "object of type 'NoneType' has no len()".
        ("empty", r"its PixelData is empty"),
    ],
)
def test_series_faults_the_fuzzer_found_are_errors_naming_the_file(tmp_path, how, message):
    import pydicom

    write_series, corrupt = dicom_helpers()
    folder = tmp_path / "s"
    write_series(folder, n=1 if how in ("rows", "position") else 2)
    f = sorted(folder.iterdir())[-1]  # with two slices, the one read second
    if how == "meta vr":
        set_meta_vr(f, b"\x02\x00\x10\x00", b"XX")  # (0002,0010) TransferSyntaxUID
    elif how == "meta length":
        set_meta_vr(f, b"\x02\x00\x00\x00", b"\0\0")  # (0002,0000): read as implicit VR
    elif how == "truncated":
        f.write_bytes(f.read_bytes()[:600])
    elif how == "spacing":
        corrupt(f, "PixelSpacing", [0.7, 0.6])
    elif how == "rows":
        corrupt(f, "Rows", 5)
    elif how == "position":
        corrupt(f, "ImagePositionPatient", [1e308, 0, 0])
    else:
        ds = pydicom.dcmread(f)
        ds.PixelData = b""
        ds.save_as(f, enforce_file_format=True)
    where = re.escape(str(folder if how == "position" else f))
    with pytest.raises(DataError, match=rf"^{where}: {message}"):
        read_dicom_series(folder)


@pytest.fixture(scope="module")
def volume_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A one-client run trained on a 3-case nnU-Net dataset (about a second)."""
    tmp = tmp_path_factory.mktemp("volume_run")
    root = nnunet_client(tmp / "ds", gz=True)
    cfg_path = run_config(tmp, {"source": "nnunet", "path": str(root)})
    res = cli.invoke(app, ["run", "-c", str(cfg_path), "-o", str(tmp / "run"), "-q"])
    assert check_outcome(res, tmp / "run", "valid") == "clean run"
    return tmp / "run"


def check_predict(res: Any, mask: Path, what: str, name: str) -> str:
    """``fedoap predict``'s outcome: ``mask`` written with a finite affine, or one ``error:``
    line (exit code 2) that names ``name``."""
    if res.exit_code == 0:
        img: Any = nib.load(mask)
        assert np.isfinite(img.affine).all(), (what, img.affine)
        return "mask written"
    assert res.exception is None or isinstance(res.exception, SystemExit), (
        what,
        res.exception,
        res.output,
    )
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert res.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error:"), (
        what,
        res.output,
    )
    assert name in lines[0], (what, lines[0])
    return lines[0]


@pytest.mark.parametrize("case", range(max(CASES // 4, 1)))
def test_predict_on_a_corrupted_series_writes_a_mask_or_one_error_line(tmp_path, volume_run, case):
    rng = np.random.default_rng([2026, 23, case])
    folder = tmp_path / "in" / "CT.1"
    what = f"case {case}: " + dicom_case(rng, folder)
    out = tmp_path / "out"
    args = ["predict", str(volume_run), str(folder), "--client", "a", "-o", str(out)]
    res = cli.invoke(app, args)
    print(f"{what} -> {check_predict(res, out / 'CT.1_mask.nii.gz', what, str(folder))}")


@pytest.mark.parametrize("case", range(max(CASES // 4, 1)))
def test_predict_on_a_corrupted_nifti_header_writes_a_mask_or_one_error_line(
    tmp_path, volume_run, case
):
    rng = np.random.default_rng([2026, 24, case])
    src = tmp_path / "in" / f"x_0000.nii{'.gz' if rng.integers(2) else ''}"
    save(src, case_arrays(case)[0])
    what = f"case {case} ({src.name}): " + corrupt_nifti(rng, src, header_corruption)
    out = tmp_path / "out"
    res = cli.invoke(app, ["predict", str(volume_run), str(src), "--client", "a", "-o", str(out)])
    print(f"{what} -> {check_predict(res, out / 'x_0000_mask.nii.gz', what, str(src))}")


# ------------------------------------------------------------------ the real exit path


def fedoap(*args: str) -> subprocess.CompletedProcess[str]:
    """The command line as a user runs it: its own process, its own exit code."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "fedoap.cli.main", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)


def assert_one_error_line(proc: subprocess.CompletedProcess[str], *names: str) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr
    lines = [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error:")]
    # nibabel logs the header problem it raises for on a line of its own (its logger's handler)
    assert len(errors) == 1 and len(lines) <= 2, lines
    assert all(n in errors[0] for n in names), (names, errors[0])
    return errors[0]


def test_a_corrupted_nifti_header_is_one_error_line_from_the_real_command(tmp_path):
    # A datatype nibabel does not know: HeaderDataError, a traceback before the fix.
    root = nnunet_client(tmp_path / "ds", gz=False)
    victim = root / "imagesTr" / "case01_0000.nii"
    corrupt_nifti(np.random.default_rng(0), victim, lambda rng, raw: put(raw, "datatype", 99))
    cfg_path = run_config(tmp_path, {"source": "nnunet", "path": str(root)})
    proc = fedoap("run", "-c", str(cfg_path), "-o", str(tmp_path / "run"), "-q")
    assert_one_error_line(proc, f"{victim}: cannot read as NIfTI", "data code 99")


def test_predict_on_a_corrupted_series_is_one_error_line_from_the_real_command(
    tmp_path, volume_run
):
    # A file-meta VR pydicom does not know: NotImplementedError, a traceback before the fix.
    write_series, _ = dicom_helpers()
    folder = tmp_path / "CT.1"
    write_series(folder)
    f = sorted(folder.iterdir())[0]
    set_meta_vr(f, b"\x02\x00\x10\x00", b"XX")
    out = str(tmp_path / "o")
    proc = fedoap("predict", str(volume_run), str(folder), "--client", "a", "-o", out)
    assert_one_error_line(proc, f"{f}: cannot read as DICOM")
