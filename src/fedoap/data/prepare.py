"""``fedoap data prepare``: a compact, portable copy of every client's preprocessed data.

Each client is read, validated and letterboxed to ``data.image_size`` exactly as a run reads it
(:func:`fedoap.data.dataset.load_raw`), then written as ``OUT/<client>.npz`` in the format of
``../shared/data`` (compressed). ``OUT/clients.yaml`` holds a ready ``data`` section pointing at
those files. Loading a prepared file gives the same arrays as loading the original: its images are
already ``image_size`` square, so they are not letterboxed a second time.

The point is to carry data to another machine (a GPU host that accepts a few tens of MB) without
the originals or the seconds of letterboxing they cost on every load.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from fedoap.config import VOLUME_SOURCES, DataConfig
from fedoap.data.cache import save_npz_atomic
from fedoap.data.dataset import load_raw
from fedoap.data.errors import DataError
from fedoap.data.sources.raw import RawClient
from fedoap.errors import FedoapError
from fedoap.fileio import atomic_write_text, check_output_dir

#: The data section written beside the prepared files.
CLIENTS_FILE = "clients.yaml"


class OutputExistsError(FedoapError, FileExistsError):
    """The output folder already holds files and ``force`` was not given."""


@dataclass(frozen=True)
class PreparedClient:
    """One written client file."""

    name: str
    path: Path
    images: int
    use_rgb: bool  # stored as ``images_rgb`` (the client entry needs ``use_rgb: true``)
    nbytes: int


def _arrays(raw: RawClient) -> tuple[dict[str, np.ndarray], bool]:
    """The arrays to store for ``raw`` and whether its images are stored as ``images_rgb``.

    Grayscale repeated to three channels (``data.channels=3``) is stored once: loading repeats it
    again, to the same array, at a third of the size. True colour goes to ``images_rgb``, the only
    (N, H, W, 3) array the npz reader accepts.
    """
    images = raw.images
    rgb = images.ndim == 4
    if rgb and all(np.array_equal(images[..., 0], images[..., c]) for c in (1, 2)):
        images, rgb = images[..., 0], False
    arrays = {
        "images_rgb" if rgb else "images": images,
        "masks": raw.masks,
        "case_ids": raw.case_ids,
        "names": raw.names,
    }
    return arrays, rgb


def _clients_yaml(
    cfg: DataConfig, out: Path, written: list[PreparedClient], config_path: Path | None
) -> str:
    entries: list[dict[str, object]] = []
    for c in written:
        entry: dict[str, object] = {"name": c.name, "path": c.path.name}
        if c.use_rgb:
            entry["use_rgb"] = True
        entries.append(entry)
    flow = yaml.safe_dump(entries, default_flow_style=True, width=1 << 20, sort_keys=False).strip()
    origin = f" from {config_path}" if config_path is not None else ""
    size = cfg.image_size
    header = (
        f"# Written by `fedoap data prepare`{origin}:\n"
        f"# every client letterboxed to {size}x{size} (data.channels={cfg.channels}).\n"
        "# data.root must name this folder (change it on another machine). Paste the data\n"
        "# section into a config, or override it on the command line:\n"
        f"#   fedoap run -c CONFIG data.root={out} data.image_size={size} \\\n"
        f"#     'data.clients={flow}'\n"
        f"# Keep data.image_size={size}: any other size letterboxes these images a second time.\n"
    )
    section = {
        "data": {
            "root": str(out),
            "image_size": size,
            "channels": cfg.channels,
            "clients": entries,
        }
    }
    return header + yaml.safe_dump(section, sort_keys=False)


def prepare_data(
    cfg: DataConfig, out: Path, force: bool = False, config_path: Path | None = None
) -> list[PreparedClient]:
    """Write ``out/<client>.npz`` for every client of ``cfg`` and ``out/clients.yaml``.

    Every client is loaded and validated before anything is written, so bad data leaves no
    half-filled folder. Raises :class:`~fedoap.errors.OutputError` if ``out`` is a file or cannot
    be written, :class:`OutputExistsError` if ``out`` holds files and ``force`` is
    off (with ``force``, files of the same name are replaced and others left alone), and
    :class:`~fedoap.data.errors.DataError` naming the client for bad data.
    """
    check_output_dir(out)  # a file, or a folder that cannot be written: before any data is read
    if out.is_dir() and any(out.iterdir()) and not force:
        raise OutputExistsError(
            f"{out} is not empty; choose a new folder or pass --force to write into it "
            "(files of the same name are replaced)"
        )
    for spec in cfg.clients:
        if spec.source in VOLUME_SOURCES:
            # Its slices are normalised per volume and pass to the network as they are; an npz
            # client's images are normalised per image (data.normalize), so the copy would
            # train on other inputs.
            raise DataError(
                f"client '{spec.name}': source={spec.source}: volume clients cannot be prepared "
                "as npz yet (their slices are normalised per volume, an npz client's per image); "
                "carry the volume dataset itself"
            )
    loaded: list[tuple[str, RawClient]] = []
    for spec in cfg.clients:
        try:
            loaded.append((spec.name, load_raw(spec, cfg)))
        except DataError as err:
            raise DataError(f"client '{spec.name}': {err}") from None
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, raw in loaded:
        arrays, rgb = _arrays(raw)
        path = out / f"{name}.npz"
        save_npz_atomic(path, arrays, compressed=True)
        written.append(PreparedClient(name, path, len(raw.images), rgb, path.stat().st_size))
    # Last: a folder without clients.yaml is visibly unfinished.
    atomic_write_text(out / CLIENTS_FILE, _clients_yaml(cfg, out, written, config_path))
    return written
