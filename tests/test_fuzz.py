"""Seeded fuzzing of ``fedoap run``: corrupt a valid npz and a valid config at random.

Every outcome must be a clean run (exit 0, every saved weight finite) or one ``error:`` line
with exit code 2. Never a traceback, never exit 0 with non-finite weights. The cases are drawn
from a fixed seed, so a failure reproduces; ``FEDOAP_FUZZ_CASES`` raises their number for a
longer hunt (``FEDOAP_FUZZ_CASES=400 pytest tests/test_fuzz.py``).
"""

from __future__ import annotations

import copy
import os
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from fedoap.cli.main import app
from fedoap.federation.checkpoint import load_tensors

CASES = int(os.environ.get("FEDOAP_FUZZ_CASES", "24"))
cli = CliRunner()

#: A valid one-client config small enough that a clean run takes about a second.
BASE: dict[str, Any] = {
    "method": "fedoap",
    "data": {
        "image_size": 16,
        "clients": [{"name": "a", "source": "npz", "path": "a.npz"}],
        "cache": False,
    },
    "model": {"width": 2, "depth": 2, "heads": 1},
    "train": {"batch_size": 8, "precision": "fp32", "lr": 0.003},
    "federation": {"rounds": 1},
    "finetune": {"epochs": 1},
}

#: Replacement values for a config key: wrong types, out of range, non-finite, huge.
ODD_VALUES: list[Any] = [
    -1,
    0,
    1,
    2**62,
    -(2**62),
    1e300,
    -1e-300,
    0.5,
    3.5,
    float("nan"),
    float("inf"),
    "",
    "x",
    "1e999",
    None,
    True,
    False,
    [],
    {},
    [1, 2],
    {"a": 1},
    "2024-01-01",
]

#: Keys whose valid values can make a clean run slow (compiling on a CPU): left alone.
SLOW_KEYS = {("train", "compile"), ("train", "compile_mode")}


def valid_arrays(rng: np.random.Generator, n: int = 24, size: int = 20) -> dict[str, Any]:
    masks = np.zeros((n, size, size), np.uint8)
    for i in range(n):
        r, c = rng.integers(2, size - 8, 2)
        masks[i, r : r + 6, c : c + 6] = 1
    images = rng.integers(0, 120, (n, size, size)).astype(np.uint8) + 100 * masks
    return {
        "images": images,
        "masks": masks,
        "case_ids": np.array([f"p{i // 2}" for i in range(n)]),
    }


# ------------------------------------------------------------------ npz corruptions


def array_corruption(rng: np.random.Generator, arrays: dict[str, Any]) -> str:
    """Change one array in a way a bad export could; returns what was done."""
    imgs = arrays["images"]
    kind = rng.integers(16)
    if kind == 0:
        arrays["images"] = imgs.astype(np.float32) * np.float32(1.5e36)  # finite, up to 3.3e38
    elif kind == 1:
        arrays["images"] = imgs.astype(np.float64) * 1e300
    elif kind == 2:
        f = imgs.astype(np.float32)
        f[rng.integers(len(f)), 3, 3] = rng.choice([np.nan, np.inf, -np.inf])
        arrays["images"] = f
    elif kind == 3:
        arrays["images"] = imgs[:, :, 0]  # (N, H): one dimension short
    elif kind == 4:
        arrays["images"] = imgs.astype(np.complex64)
    elif kind == 5:
        arrays["images"] = imgs > 100  # bool
    elif kind == 6:
        arrays["images"] = imgs[:0]
        arrays["masks"] = arrays["masks"][:0]
        arrays["case_ids"] = arrays["case_ids"][:0]
    elif kind == 7:
        arrays["masks"] = arrays["masks"] * 2  # values {0, 2}
    elif kind == 8:
        arrays["masks"] = arrays["masks"][:, :-1]
    elif kind == 9:
        arrays["case_ids"] = arrays["case_ids"][:-3]
    elif kind == 10:
        del arrays["masks"]
    elif kind == 11:
        arrays["images"] = imgs.astype(np.int64) * (2**55)
    elif kind == 12:
        arrays["images"] = imgs[:, :1, :1]
        arrays["masks"] = arrays["masks"][:, :1, :1]
    elif kind == 13:
        arrays["images"] = np.array([object()] * len(imgs), dtype=object)
    elif kind == 14:
        arrays["case_ids"] = np.array(["same"] * len(imgs))  # one case: cannot be split
    else:
        arrays["masks"] = arrays["masks"].astype(np.float32) * 0.5
    return f"array corruption {kind}"


def byte_corruption(rng: np.random.Generator, path: Path) -> str:
    raw = bytearray(path.read_bytes())
    kind = rng.integers(5)
    if kind == 0:
        for _ in range(int(rng.choice([1, 8, 64]))):
            raw[rng.integers(len(raw))] ^= 1 << int(rng.integers(8))
    elif kind == 1:
        raw = raw[: rng.integers(len(raw))]
    elif kind == 2:
        start = int(rng.integers(len(raw)))
        raw[start : start + int(rng.integers(1, 200))] = b"\0" * len(raw[start : start + 200])
    elif kind == 3:
        raw = bytearray(b"this is not an npz file\n" * 3)
    else:
        # A header that declares a huge array: the shape field of the first .npy member.
        i = raw.find(b"'shape': (")
        if i >= 0:
            j = raw.find(b")", i)
            raw[i + 10 : j] = b"99999999, 99999, 9999"[: j - i - 10].ljust(j - i - 10, b" ")
    path.write_bytes(bytes(raw))
    return f"byte corruption {kind}"


def write_npz(rng: np.random.Generator, path: Path) -> str:
    arrays = valid_arrays(rng)
    what = "valid npz"
    roll = rng.random()
    if roll < 0.45:
        what = array_corruption(rng, arrays)
    np.savez(path, **arrays)  # object arrays are pickled into it, as a careless export does
    if 0.45 <= roll < 0.8:
        what = byte_corruption(rng, path)
    assert zipfile.is_zipfile(path) or "byte" in what
    return what


def write_folder(rng: np.random.Generator, root: Path) -> str:
    """A folder client (images/, masks/ as PNG pairs) with at most one random fault."""
    from PIL import Image

    arrays = valid_arrays(rng, n=18)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i, (img, mask) in enumerate(zip(arrays["images"], arrays["masks"], strict=True)):
        Image.fromarray(img).save(root / "images" / f"p{i // 2}_{i}.png")
        Image.fromarray(mask * 255).save(root / "masks" / f"p{i // 2}_{i}.png")
    victim = sorted((root / "images").iterdir())[int(rng.integers(18))]
    mask = root / "masks" / victim.name
    kind = int(rng.integers(10))
    if kind == 0:
        victim.write_bytes(victim.read_bytes()[: int(rng.integers(8, 60))])  # truncated
    elif kind == 1:
        victim.write_text("not an image")
    elif kind == 2:
        Image.new("1", (13000, 13000)).save(victim)  # ~20 KB that decodes to 169 MP
    elif kind == 3:
        Image.fromarray(np.zeros((7, 9), np.uint8)).save(mask)  # mask of another size
    elif kind == 4:
        Image.fromarray(np.full((20, 20), 3, np.uint8)).save(mask)  # mask values {3}
    elif kind == 5:
        mask.unlink()
    elif kind == 6:
        Image.fromarray(rng.integers(0, 65535, (20, 20)).astype(np.uint16)).save(victim)
    elif kind == 7:
        Image.fromarray(rng.integers(0, 255, (20, 20, 4)).astype(np.uint8), "RGBA").save(victim)
    elif kind == 8:
        raw = bytearray(victim.read_bytes())
        raw[int(rng.integers(len(raw)))] ^= 0xFF
        victim.write_bytes(bytes(raw))
    else:
        return "valid folder"
    return f"folder corruption {kind} ({victim.name})"


# ------------------------------------------------------------------ config corruptions


def leaf_keys(node: Any, prefix: tuple = ()) -> list[tuple]:
    if isinstance(node, dict):
        return [k for key, v in node.items() for k in leaf_keys(v, (*prefix, key))]
    if isinstance(node, list):
        return [k for i, v in enumerate(node) for k in leaf_keys(v, (*prefix, i))]
    return [prefix]


def corrupt_config(rng: np.random.Generator, full: dict[str, Any]) -> tuple[str, str]:
    """A config text with one random fault; returns (yaml text, what was done)."""
    cfg = copy.deepcopy(full)
    kind = rng.integers(6)
    keys = [k for k in leaf_keys(cfg) if tuple(k[:2]) not in SLOW_KEYS]
    key = keys[rng.integers(len(keys))]
    parent = cfg
    for part in key[:-1]:
        parent = parent[part]
    if kind <= 2:
        value = ODD_VALUES[rng.integers(len(ODD_VALUES))]
        parent[key[-1]] = value
        what = f"{'.'.join(map(str, key))}={value!r}"
    elif kind == 3:
        del parent[key[-1]]
        what = f"deleted {'.'.join(map(str, key))}"
    elif kind == 4:
        parent[f"unknown_{rng.integers(100)}"] = 1
        what = "unknown key"
    else:
        text = yaml.safe_dump(cfg, sort_keys=False)
        chars = list(text)
        for _ in range(int(rng.integers(1, 6))):
            chars[rng.integers(len(chars))] = str(rng.choice(list(":-[]{}&*!|>'\"#\t\n x9")))
        return "".join(chars), "text corruption"
    return yaml.safe_dump(cfg, sort_keys=False, allow_unicode=True), what


def full_config() -> dict[str, Any]:
    """BASE with every default filled in, so that any key can be corrupted."""
    from fedoap.config import Config, from_dict

    return from_dict(Config, BASE).to_dict()


# ------------------------------------------------------------------ the test


def check_outcome(res: Any, run_dir: Path, what: str) -> str:
    if res.exit_code == 0:
        best = sorted((run_dir / "checkpoints" / "best").glob("*.safetensors"))
        assert best, what
        for f in [*best, run_dir / "checkpoints" / "last.safetensors"]:
            tensors, _ = load_tensors(f)
            for k, v in tensors.items():
                assert not v.is_floating_point() or bool(v.isfinite().all()), (what, f, k)
        return "clean run"
    assert res.exception is None or isinstance(res.exception, SystemExit), (
        what,
        res.exception,
        res.output,
    )
    assert res.exit_code == 2, (what, res.exit_code, res.output)
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in res.output, (what, res.output)
    return errors[0]


@pytest.mark.parametrize("case", range(CASES))
def test_corrupted_npz_or_config_gives_a_clean_run_or_a_one_line_error(tmp_path, case):
    rng = np.random.default_rng([2026, 10, case])
    what_data = write_npz(rng, tmp_path / "a.npz")
    full = full_config()
    full["data"]["root"] = str(tmp_path)
    if what_data == "valid npz" or rng.random() < 0.3:
        text, what_cfg = corrupt_config(rng, full)
    else:
        text, what_cfg = yaml.safe_dump(full, sort_keys=False), "valid config"
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(text)
    what = f"case {case}: {what_data}; {what_cfg}"
    run_dir = tmp_path / "run"
    res = cli.invoke(app, ["run", "-c", str(cfg_path), "-o", str(run_dir), "-q"])
    outcome = check_outcome(res, run_dir, what)
    print(f"{what} -> {outcome}")


@pytest.mark.parametrize("case", range(max(CASES // 3, 1)))
def test_corrupted_image_folder_gives_a_clean_run_or_a_one_line_error(tmp_path, case):
    rng = np.random.default_rng([2026, 11, case])
    what = f"case {case}: " + write_folder(rng, tmp_path / "site")
    full = full_config()
    full["data"]["root"] = str(tmp_path)
    full["data"]["clients"][0].update(source="folder", path="site", case_regex=r"(p\d+)_\d+")
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(full, sort_keys=False))
    run_dir = tmp_path / "run"
    res = cli.invoke(app, ["run", "-c", str(cfg_path), "-o", str(run_dir), "-q"])
    print(f"{what} -> {check_outcome(res, run_dir, what)}")
