"""Client datasets in memory, ready for training: the glue between sources, splits, transforms.

A 128x128 client of a few thousand images is a few hundred MB as float32, so whole splits live in
memory as tensors and a batch is an index operation: data loading is never the bottleneck.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from fedoap.config import VOLUME_SOURCES, ClientSpec, DataConfig
from fedoap.data.cache import cached_raw
from fedoap.data.errors import DataError
from fedoap.data.paths import resolve_path
from fedoap.data.sources.folder import load_folder
from fedoap.data.sources.npz import load_npz
from fedoap.data.sources.raw import RawClient
from fedoap.data.splits import SPLITS, cap_cases, cap_images, first_cases, split_by_case
from fedoap.data.synthetic import generate_client
from fedoap.data.transforms import letterbox, normalize

#: Under ``normalize: zscore``, float images with a larger |value| get a note: each image is
#: divided by its largest |value| before z-scoring (:func:`fedoap.data.transforms.normalize`).
IMAGE_VALUE_NOTE_LIMIT = 1e6

#: ``normalize: unit`` passes float images to the network unscaled; beyond this |value| they are
#: no unit-range intensities (and beyond 3.4e38 not even float32), so the run is refused.
UNIT_VALUE_LIMIT = 1e3


@dataclass
class Split:
    """One split of one client: normalised images and masks as tensors."""

    x: torch.Tensor  # (N, C, H, W) float32
    y: torch.Tensor  # (N, 1, H, W) float32 in {0, 1}
    case_ids: np.ndarray  # (N,)
    names: np.ndarray  # (N,)

    def __len__(self) -> int:
        return self.x.shape[0]

    def to(self, device: torch.device | str) -> Split:
        """This split with ``x`` and ``y`` on ``device`` (one copy each); ``self`` if already there.

        ``case_ids`` and ``names`` are host arrays and are shared, not copied.
        """
        device = torch.device(device)
        if _is_on(self.x, device) and _is_on(self.y, device):
            return self
        return Split(
            x=self.x.to(device), y=self.y.to(device), case_ids=self.case_ids, names=self.names
        )


@dataclass
class ClientData:
    name: str
    train: Split
    val: Split
    test: Split
    notes: list[str] = field(default_factory=list)

    def split(self, which: str) -> Split:
        if which not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {which!r}")
        return getattr(self, which)

    def sizes(self) -> dict[str, int]:
        return {s: len(self.split(s)) for s in SPLITS}

    def case_counts(self) -> dict[str, int]:
        """Cases (patients, videos) per split."""
        return {s: len(np.unique(self.split(s).case_ids)) for s in SPLITS}

    def to(self, device: torch.device | str) -> ClientData:
        """This client with its three splits on ``device``; ``self`` if they are already there."""
        moved = {s: self.split(s).to(device) for s in SPLITS}
        if all(moved[s] is self.split(s) for s in SPLITS):
            return self
        return ClientData(name=self.name, notes=self.notes, **moved)


def _is_on(t: torch.Tensor, device: torch.device) -> bool:
    """Whether ``t.to(device)`` would be a no-op. A tensor always reports an index (``cuda:0``)
    while ``cuda`` means the current device, so ``t.device == device`` alone is not enough."""
    if t.device.type != device.type:
        return False
    if device.index is None:
        return device.type != "cuda" or t.device.index == torch.cuda.current_device()
    return t.device.index == device.index


def load_raw(spec: ClientSpec, cfg: DataConfig) -> RawClient:
    """Read one client's data as arrays at ``cfg.image_size``; errors name the client and file.

    Served from the on-disk cache (:mod:`fedoap.data.cache`) while the source, these settings and
    the loading code are unchanged, unless ``cfg.cache`` is off.
    """
    return cached_raw(spec, cfg, lambda: _load_raw_uncached(spec, cfg))


def _load_raw_uncached(spec: ClientSpec, cfg: DataConfig) -> RawClient:
    """:func:`load_raw` without the cache: read, validate, letterbox."""
    if spec.source == "synthetic":
        assert spec.style is not None
        return generate_client(spec.style, spec.num_images, cfg.image_size, spec.name, spec.seed)
    assert spec.path is not None
    path = resolve_path(cfg.root, spec.path)
    if spec.source in VOLUME_SOURCES:
        from fedoap.data.volumes.loader import load_volumes  # local: volume sources only

        raw = load_volumes(spec, path, cfg.image_size, cfg.max_image_pixels, cfg.max_volume_voxels)
    elif spec.source == "npz":
        raw = load_npz(
            path, use_rgb=spec.use_rgb, max_pixels=cfg.max_image_pixels, where=spec.where
        )
    else:
        raw = load_folder(
            path,
            channels=cfg.channels,
            image_dir=spec.image_dir,
            mask_dir=spec.mask_dir,
            mask_suffix=spec.mask_suffix,
            case_regex=spec.case_regex,
            channel=spec.channel,
            resize_to=cfg.image_size,
            max_pixels=cfg.max_image_pixels,
        )
    has_rgb = raw.images.ndim == 4
    if cfg.channels == 3 and not has_rgb:
        raw.images = np.repeat(raw.images[..., None], 3, axis=-1)
    if cfg.channels == 1 and has_rgb:
        raise DataError(f"{path}: RGB images but data.channels=1")
    if raw.images.shape[1:3] != (cfg.image_size, cfg.image_size):
        raw.images = np.stack([letterbox(im, cfg.image_size, is_mask=False) for im in raw.images])
        raw.masks = np.stack([letterbox(m, cfg.image_size, is_mask=True) for m in raw.masks])
        raw.notes.append(f"{path}: letterboxed to {cfg.image_size}x{cfg.image_size}")
    return raw


def check_value_range(raw: RawClient, where: str, mode: str) -> None:
    """Refuse float images ``normalize: unit`` cannot use; note those z-scoring rescales.

    Depends on ``data.normalize``, which the cache key leaves out, so it runs after the cache, on
    every load. Appends to ``raw.notes``.
    """
    if raw.images.dtype.kind != "f" or raw.images.size == 0:
        return
    largest = float(max(raw.images.max(), -raw.images.min()))  # no |images| copy
    if mode == "unit" and largest > UNIT_VALUE_LIMIT:
        raise DataError(
            f"{where}: float image values up to {largest:.2g} lie outside [-1e3, 1e3], and "
            "normalize: unit passes float images unscaled; use data.normalize=zscore"
        )
    if mode == "zscore" and largest > IMAGE_VALUE_NOTE_LIMIT:
        raw.notes.append(
            f"{where}: image values up to {largest:.2g} (beyond ±1e6); each image is divided by "
            "its largest |value| before z-scoring, which leaves z-scores unchanged"
        )


def image_normalization(spec: ClientSpec, cfg: DataConfig) -> str:
    """How a client's images are normalised per image on their way to the network:
    ``data.normalize``, except for volume sources, whose slices come normalised per volume
    (:func:`fedoap.data.volumes.normalise_volume`) and pass as they are (``unit`` on float)."""
    return "unit" if spec.source in VOLUME_SOURCES else cfg.normalize


def make_client(spec: ClientSpec, cfg: DataConfig) -> ClientData:
    raw = load_raw(spec, cfg)
    mode = image_normalization(spec, cfg)
    if spec.source == "synthetic":
        where = f"client '{spec.name}'"
    else:
        path = resolve_path(cfg.root, spec.path or "")
        if spec.source not in VOLUME_SOURCES:
            check_value_range(raw, str(path), cfg.normalize)
        where = f"client '{spec.name}': {path}"
    idx = split_by_case(raw.case_ids, cfg.split, where)
    seed = cfg.split.seed
    idx["train"] = first_cases(idx["train"], raw.case_ids, cfg.max_train_cases, seed + 3)
    idx["train"] = cap_images(idx["train"], cfg.max_train_images, seed)
    idx["val"] = cap_cases(idx["val"], raw.case_ids, cfg.max_val_images, seed + 1)
    idx["test"] = cap_cases(idx["test"], raw.case_ids, cfg.max_test_images, seed + 2)
    splits = {}
    for name, sel in idx.items():
        splits[name] = Split(
            x=normalize(raw.images[sel], mode),
            y=torch.from_numpy(raw.masks[sel].astype(np.float32)).unsqueeze(1),
            case_ids=raw.case_ids[sel],
            names=raw.names[sel],
        )
    return ClientData(name=spec.name, notes=raw.notes, **splits)


def prepare_clients(cfg: DataConfig) -> list[ClientData]:
    """Load, validate and split every client. Raises :class:`DataError` before any training."""
    clients = []
    for spec in cfg.clients:
        try:
            clients.append(make_client(spec, cfg))
        except DataError as err:
            # make_client already names the client in errors of its own (the split's).
            prefix = f"client '{spec.name}': "
            msg = str(err)
            raise DataError(msg if msg.startswith(prefix) else prefix + msg) from None
    return clients


def _concat(splits: list[Split]) -> Split:
    return Split(
        x=torch.cat([s.x for s in splits]),
        y=torch.cat([s.y for s in splits]),
        case_ids=np.concatenate([s.case_ids for s in splits]),
        names=np.concatenate([s.names for s in splits]),
    )


def pool_training_sets(clients: list[ClientData]) -> ClientData:
    """All clients' training splits in one (the privacy-breaking ``centralized`` reference).

    Validation and test stay per client; the pooled ones are there only to fill the type.
    """
    return ClientData(
        name="pooled",
        train=_concat([c.train for c in clients]),
        val=_concat([c.val for c in clients]),
        test=_concat([c.test for c in clients]),
    )
