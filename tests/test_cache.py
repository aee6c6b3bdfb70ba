"""The preprocessed data cache and `fedoap data prepare`: hits, misses, corruption, portability."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from typer.testing import CliRunner

from fedoap.cli.main import app
from fedoap.config import ClientSpec, DataConfig, load_config
from fedoap.data import cache
from fedoap.data.cache import cache_key, cached_raw
from fedoap.data.dataset import ClientData, Split, _load_raw_uncached, load_raw
from fedoap.data.errors import DataError
from fedoap.data.prepare import CLIENTS_FILE, OutputExistsError, prepare_data
from fedoap.data.sources import RawClient
from tests.conftest import tiny_config

ARRAYS = ("images", "masks", "case_ids", "names")
HOUR_NS = 3600 * 10**9


def write_npz(path: Path, n: int = 12, size: int = 20, seed: int = 0, **override) -> Path:
    rng = np.random.default_rng(seed)
    arrays = {
        "images": rng.integers(0, 255, (n, size, size), dtype=np.uint8),
        "masks": (rng.random((n, size, size)) > 0.8).astype(np.uint8) * 255,  # noted on load
        "case_ids": np.array([f"p{i // 2}" for i in range(n)]),
    }
    arrays.update(override)
    np.savez(path, **arrays)
    return age(path)


def age(path: Path, hours: float = 1.0) -> Path:
    """Date a source back: one modified in the last seconds is never stored (RACY_SECONDS)."""
    t = time.time_ns() - int(hours * HOUR_NS)
    for p in [path, *path.rglob("*")] if path.is_dir() else [path]:
        os.utime(p, ns=(t, t))
    return path


class Counting:
    """The uncached loader, counting its calls: a hit must not call it."""

    def __init__(self, spec: ClientSpec, cfg: DataConfig) -> None:
        self.spec, self.cfg, self.calls = spec, cfg, 0

    def __call__(self) -> RawClient:
        self.calls += 1
        return _load_raw_uncached(self.spec, self.cfg)


def load(spec: ClientSpec, cfg: DataConfig) -> tuple[RawClient, int]:
    build = Counting(spec, cfg)
    return cached_raw(spec, cfg, build), build.calls


def assert_same(a: RawClient, b: RawClient) -> None:
    for name in ARRAYS:
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype and x.shape == y.shape, name
        np.testing.assert_array_equal(x, y, err_msg=name)


def entries(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.npz")) if folder.is_dir() else []


def npz_cfg(tmp_path: Path, size: int = 16, **kw) -> tuple[ClientSpec, DataConfig]:
    spec = ClientSpec(name="a", path="a.npz")
    cfg = DataConfig(
        root=str(tmp_path),
        clients=(spec,),
        image_size=size,
        cache_dir=str(tmp_path / "cache"),
        **kw,
    )
    return spec, cfg


# ------------------------------------------------------------------------------- hits


def test_second_load_is_a_hit_and_replays_the_build_notes(tmp_path):
    write_npz(tmp_path / "a.npz")
    spec, cfg = npz_cfg(tmp_path)

    first, calls1 = load(spec, cfg)
    second, calls2 = load(spec, cfg)

    assert (calls1, calls2) == (1, 0)
    assert_same(first, second)
    assert second.masks.max() == 1
    # The build's notes (255-valued masks, letterbox 20 -> 16) come back, and nothing else: a
    # summary must not depend on whether the data came from the cache.
    assert second.notes == first.notes and len(first.notes) == 2
    assert len(entries(tmp_path / "cache")) == 1
    assert not list((tmp_path / "cache").glob("*.tmp"))


def test_load_raw_goes_through_the_cache(tmp_path):
    write_npz(tmp_path / "a.npz")
    spec, cfg = npz_cfg(tmp_path)
    direct = _load_raw_uncached(spec, cfg)
    load_raw(spec, cfg)
    hit = load_raw(spec, cfg)
    assert_same(direct, hit)
    assert hit.notes == direct.notes


def test_hit_is_much_faster_than_letterboxing_lgg(shared_data, tmp_path):
    spec = ClientSpec(name="lgg", path="lgg_brain_mri.npz")
    cfg = DataConfig(root=str(shared_data), image_size=96, cache_dir=str(tmp_path))

    t0 = time.perf_counter()
    cold, calls = load(spec, cfg)  # reads 128^2, letterboxes 3929 images to 96^2, stores
    t_cold = time.perf_counter() - t0
    t_hits = []
    for _ in range(3):
        t0 = time.perf_counter()
        hit, hit_calls = load(spec, cfg)
        t_hits.append(time.perf_counter() - t0)
        assert hit_calls == 0

    assert calls == 1
    assert_same(cold, hit)
    assert hit.images.shape == (3929, 96, 96)
    # Measured: 3.7-4 s cold, 0.12-0.25 s hit on two cores. 20% leaves room for a busy machine.
    assert min(t_hits) < 0.2 * t_cold, (t_cold, t_hits)


# ------------------------------------------------------------------------------- misses


def test_touched_source_is_a_miss(tmp_path):
    path = write_npz(tmp_path / "a.npz")
    spec, cfg = npz_cfg(tmp_path)
    load(spec, cfg)
    age(path, hours=2)  # same bytes, other mtime

    again, calls = load(spec, cfg)

    assert calls == 1
    assert len(entries(tmp_path / "cache")) == 2  # the old key is left behind, never looked up


def test_changed_source_is_rebuilt_with_the_new_content(tmp_path):
    path = write_npz(tmp_path / "a.npz", seed=0)
    spec, cfg = npz_cfg(tmp_path)
    old, _ = load(spec, cfg)
    write_npz(path, seed=1, n=14)  # new content, dated back (so storable) to another mtime

    new, calls = load(spec, cfg)

    assert calls == 1
    assert len(new.images) == 14
    assert_same(new, _load_raw_uncached(spec, cfg))
    assert not np.array_equal(old.images[:12], new.images[:12])


def write_pair(root: Path, stem: str, value: int) -> None:
    for sub in ("images", "masks"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    img = np.full((16, 20), value, np.uint8)
    mask = np.zeros((16, 20), np.uint8)
    mask[2:6, 3:9] = 1
    Image.fromarray(img).save(root / "images" / f"{stem}.png")
    Image.fromarray(mask).save(root / "masks" / f"{stem}.png")


def test_a_file_added_to_a_folder_source_is_a_miss(tmp_path):
    folder = tmp_path / "pairs"
    for i in range(3):
        write_pair(folder, f"c{i}", 50 + i)
    age(folder)
    spec = ClientSpec(name="f", source="folder", path="pairs")
    cfg = DataConfig(
        root=str(tmp_path), clients=(spec,), image_size=16, cache_dir=str(tmp_path / "c")
    )
    first, _ = load(spec, cfg)
    _, calls_hit = load(spec, cfg)
    write_pair(folder, "c3", 90)
    age(folder)

    after, calls = load(spec, cfg)

    assert (calls_hit, calls) == (0, 1)
    assert len(first.images) == 3 and len(after.images) == 4


def test_recently_modified_source_is_read_but_not_stored(tmp_path):
    np.savez(
        tmp_path / "a.npz",
        images=np.zeros((6, 16, 16), np.uint8),
        masks=np.zeros((6, 16, 16), np.uint8),
    )
    spec, cfg = npz_cfg(tmp_path)
    _, calls1 = load(spec, cfg)
    _, calls2 = load(spec, cfg)
    assert (calls1, calls2) == (1, 1)
    assert entries(tmp_path / "cache") == []


def test_key_covers_settings_code_and_synthetic_name(tmp_path, monkeypatch):
    write_npz(tmp_path / "a.npz")
    spec, cfg = npz_cfg(tmp_path)
    key = cache_key(spec, cfg)[0]
    assert cache_key(spec, replace(cfg, image_size=32))[0] != key
    assert cache_key(spec, replace(cfg, channels=3))[0] != key
    assert cache_key(replace(spec, use_rgb=True), cfg)[0] != key
    # Another spelling of the same file is the same entry; another client name reading it, too.
    (tmp_path / "x").mkdir()
    moved = replace(cfg, root=str(tmp_path / "x" / ".."))
    assert cache_key(ClientSpec(name="b", path="a.npz"), moved)[0] == key
    # The generator seeds with the client name, so synthetic clients never share an entry.
    s1 = ClientSpec(name="s1", source="synthetic", style="mri", num_images=6)
    s2 = ClientSpec(name="s2", source="synthetic", style="mri", num_images=6)
    assert cache_key(s1, cfg)[0] != cache_key(s2, cfg)[0]

    load(spec, cfg)
    monkeypatch.setattr(cache, "code_fingerprint", lambda: "edited loader")
    assert cache_key(spec, cfg)[0] != key
    _, calls = load(spec, cfg)
    assert calls == 1


# ------------------------------------------------------------------------------- corruption


def flip_data_bytes(entry: Path) -> None:
    data = bytearray(entry.read_bytes())
    mid = len(data) // 2  # images and masks are nearly all of the file: this is array data
    for i in range(mid, mid + 64):
        data[i] ^= 0xFF
    entry.write_bytes(bytes(data))


def truncate(entry: Path) -> None:
    data = entry.read_bytes()
    entry.write_bytes(data[: len(data) * 2 // 3])


def tamper(entry: Path) -> None:
    """A well-formed zip whose images changed but whose meta (and digest) did not: only the
    digest can catch it, the zip CRCs are right."""
    with np.load(entry) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["images"] = arrays["images"].copy()
    arrays["images"][0, 0, 0] ^= 1
    np.savez(entry, **arrays)


def drop_names(entry: Path) -> None:
    with np.load(entry) as z:
        arrays = {k: z[k] for k in z.files if k != "names"}
    np.savez(entry, **arrays)


@pytest.mark.parametrize("damage", [flip_data_bytes, truncate, tamper, drop_names])
def test_corrupt_entry_is_reported_and_rebuilt(tmp_path, damage: Callable[[Path], None]):
    write_npz(tmp_path / "a.npz", n=40, size=64)
    spec, cfg = npz_cfg(tmp_path, size=48)
    good, _ = load(spec, cfg)
    (entry,) = entries(tmp_path / "cache")
    damage(entry)

    rebuilt, calls = load(spec, cfg)

    assert calls == 1
    assert_same(rebuilt, good)
    assert any(f"cache entry {entry} is corrupt" in n and "rebuilt" in n for n in rebuilt.notes)
    # The entry was overwritten with a good one.
    healed, calls = load(spec, cfg)
    assert calls == 0
    assert_same(healed, good)
    assert not any("is corrupt" in n for n in healed.notes)


# ------------------------------------------------------------------------------- off and failing


def test_cache_false_never_writes(tmp_path):
    write_npz(tmp_path / "a.npz")
    spec, cfg = npz_cfg(tmp_path, cache=False)
    _, calls1 = load(spec, cfg)
    _, calls2 = load(spec, cfg)
    load_raw(spec, cfg)
    assert (calls1, calls2) == (1, 1)
    assert not (tmp_path / "cache").exists()


def test_unwritable_cache_dir_is_a_note_not_a_failure(tmp_path):
    write_npz(tmp_path / "a.npz")
    blocker = tmp_path / "cache"
    blocker.write_text("a file where the cache folder should be")  # fails even as root
    spec, cfg = npz_cfg(tmp_path)

    raw, calls = load(spec, cfg)

    assert calls == 1
    assert_same(raw, _load_raw_uncached(spec, cfg))
    assert any("not writable" in n and "not cached" in n for n in raw.notes)


def test_data_error_propagates_and_nothing_is_cached(tmp_path):
    write_npz(tmp_path / "a.npz", masks=np.full((12, 20, 20), 3, np.uint8))
    spec, cfg = npz_cfg(tmp_path)
    with pytest.raises(DataError) as direct:
        _load_raw_uncached(spec, cfg)
    for _ in range(2):
        with pytest.raises(DataError) as cached:
            load_raw(spec, cfg)
        assert str(cached.value) == str(direct.value)
    assert entries(tmp_path / "cache") == []


# ------------------------------------------------------------------------------- prepare


def prepared_cfg(out: Path) -> DataConfig:
    return load_config(out / CLIENTS_FILE, ["data.cache=false"]).data


def assert_prepared_matches(cfg: DataConfig, out: Path) -> None:
    again = prepared_cfg(out)
    assert again.root == str(out) and again.image_size == cfg.image_size
    assert [c.name for c in again.clients] == [c.name for c in cfg.clients]
    for spec, spec2 in zip(cfg.clients, again.clients, strict=True):
        original = _load_raw_uncached(spec, cfg)
        prepared = _load_raw_uncached(spec2, again)
        assert_same(original, prepared)
        assert not any("letterboxed" in n for n in prepared.notes)  # no second letterbox


def test_prepare_reloads_to_identical_arrays(tmp_path):
    write_npz(tmp_path / "a.npz", size=20)  # letterboxed 20 -> 32, 255-valued masks
    base = tiny_config().data
    cfg = replace(base, root=str(tmp_path), clients=(*base.clients, ClientSpec("a", path="a.npz")))
    out = tmp_path / "prep"

    written = prepare_data(cfg, out)

    assert [w.name for w in written] == ["mri", "us", "ct", "a"]
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [CLIENTS_FILE, "mri.npz", "us.npz", "ct.npz", "a.npz"]
    )
    with np.load(out / "a.npz", allow_pickle=False) as z:
        assert set(z.files) == set(ARRAYS)
        assert z["images"].shape == (12, 32, 32) and z["images"].dtype == np.uint8
        assert set(np.unique(z["masks"])) <= {0, 1}
    assert_prepared_matches(cfg, out)


def test_prepare_rgb_gray_and_float_clients_at_three_channels(tmp_path):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 255, (8, 20, 20, 3), dtype=np.uint8)
    write_npz(tmp_path / "rgb.npz", n=8, images_rgb=rgb)
    write_npz(tmp_path / "gray.npz", n=8)
    write_npz(tmp_path / "float.npz", n=8, images=rng.random((8, 20, 20)).astype(np.float32))
    clients = (
        ClientSpec("rgb", path="rgb.npz", use_rgb=True),
        ClientSpec("gray", path="gray.npz"),
        ClientSpec("float", path="float.npz"),
    )
    cfg = DataConfig(root=str(tmp_path), clients=clients, image_size=16, channels=3, cache=False)
    out = tmp_path / "prep"

    written = {w.name: w for w in prepare_data(cfg, out)}

    assert written["rgb"].use_rgb and not written["gray"].use_rgb
    with np.load(out / "gray.npz") as z:
        assert z["images"].shape == (8, 16, 16)  # stored once, repeated again on load
    with np.load(out / "float.npz") as z:
        assert z["images"].dtype == np.float32
    with np.load(out / "rgb.npz") as z:
        assert z["images_rgb"].shape == (8, 16, 16, 3) and "images" not in z.files
    assert_prepared_matches(cfg, out)


def test_prepare_refuses_a_non_empty_folder(tmp_path):
    cfg = tiny_config().data
    out = tmp_path / "prep"
    out.mkdir()
    (out / "keep.txt").write_text("mine")

    with pytest.raises(OutputExistsError, match="not empty"):
        prepare_data(cfg, out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]

    prepare_data(cfg, out, force=True)
    assert (out / "keep.txt").read_text() == "mine" and (out / CLIENTS_FILE).is_file()


def test_prepare_bad_data_writes_nothing(tmp_path):
    write_npz(tmp_path / "bad.npz", masks=np.full((12, 20, 20), 3, np.uint8))
    base = tiny_config().data
    cfg = replace(
        base, root=str(tmp_path), clients=(*base.clients, ClientSpec("bad", path="bad.npz"))
    )
    with pytest.raises(DataError, match="client 'bad'"):
        prepare_data(cfg, tmp_path / "prep")
    assert not (tmp_path / "prep").exists()


def test_cli_data_prepare(tmp_path):
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(tiny_config().to_dict()))
    out = tmp_path / "prep"
    cli = CliRunner()

    res = cli.invoke(
        app, ["data", "prepare", "-c", str(cfg_path), "-o", str(out), "data.image_size=48"]
    )
    assert res.exit_code == 0, res.output
    assert "total" in res.output and "MiB" in res.output
    assert prepared_cfg(out).image_size == 48

    again = cli.invoke(app, ["data", "prepare", "-c", str(cfg_path), "-o", str(out)])
    assert again.exit_code == 2 and "not empty" in again.output
    forced = cli.invoke(app, ["data", "prepare", "-c", str(cfg_path), "-o", str(out), "--force"])
    assert forced.exit_code == 0, forced.output


# ------------------------------------------------------------------------------- device moves


def test_split_and_client_to_device():
    x, y = torch.randn(4, 1, 8, 8), torch.ones(4, 1, 8, 8)
    ids = np.array(["a", "a", "b", "b"])
    s = Split(x=x, y=y, case_ids=ids, names=ids)
    c = ClientData(name="c", train=s, val=s, test=s, notes=["n"])

    assert s.to("cpu") is s and s.to(torch.device("cpu")) is s and c.to("cpu") is c
    # "meta" is a device every machine has: a real move without a GPU.
    moved = c.to("meta")
    assert moved is not c and moved.name == "c" and moved.notes == ["n"]
    for split in (moved.train, moved.val, moved.test):
        assert split.x.device.type == "meta" and split.y.device.type == "meta"
        assert split.x.shape == x.shape and split.case_ids is ids
    assert moved.train.to("meta") is moved.train
