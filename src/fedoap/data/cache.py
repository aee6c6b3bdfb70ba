"""On-disk cache of each client's preprocessed arrays: read and letterbox once, load many times.

Reading a client and letterboxing a few thousand images with PIL takes seconds (3.7 s for LGG at
96x96 on two cores), and the Flower ClientApp builds its client on every message.
:func:`cached_raw` stores what :func:`fedoap.data.dataset.load_raw` returns as one uncompressed
``<cache dir>/<key>.npz`` and reads it back in a fraction of that time while nothing it depends
on has changed.

The key is a sha256 over everything the arrays depend on: the client's loading options, the
resolved source path, ``data.image_size`` and ``data.channels``, a fingerprint of the source
(size and mtime of the file, or of every file under the folder, links followed),
:data:`CACHE_VERSION` and the bytes of the modules that compute the arrays. A changed source or a
changed loader therefore never finds a stale entry: it looks up a new key and rebuilds. Entries no
longer looked up are left behind; delete the cache folder to reclaim the space.

Every entry carries a sha256 digest of its arrays, checked on every read. A truncated, corrupt or
tampered entry is rebuilt and overwritten, never used. Only data that passed validation is stored,
so a bad source raises the same :class:`~fedoap.data.errors.DataError` with or without the cache.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import struct
import time
import zipfile
import zlib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from fedoap.config import VOLUME_SOURCES, ClientSpec, DataConfig
from fedoap.data.paths import resolve_path
from fedoap.data.sources.raw import RawClient
from fedoap.fileio import atomic_writer

#: Bump when the entry format or the meaning of a key input changes.
CACHE_VERSION = 1

#: Modules whose code decides the cached arrays; editing one of them invalidates every entry.
#: A folder stands for every ``.py`` file under it, so a module added to it is covered too.
CODE_MODULES = ("sources", "transforms.py", "synthetic.py", "paths.py", "dataset.py", "volumes")

#: The arrays of a :class:`RawClient`, stored under these names (plus the JSON string ``meta``).
ARRAYS = ("images", "masks", "case_ids", "names")

#: A source modified this recently is read but not stored. File systems stamp mtimes with a coarse
#: clock (a kernel tick, up to seconds on network and FAT file systems), so a file rewritten with
#: the same size within one tick of being read would keep its key: the "racy git" problem.
RACY_SECONDS = 2.0

#: Environment variable naming the cache folder when ``data.cache_dir`` is not set.
CACHE_DIR_ENV = "FEDOAP_CACHE_DIR"

# Everything a torn or tampered zip can raise while np.load parses it.
_READ_ERRORS = (
    OSError,
    ValueError,
    EOFError,
    KeyError,
    RuntimeError,  # zipfile: "encrypted", "compression method not supported" (a flipped flag)
    zipfile.BadZipFile,
    struct.error,
    zlib.error,
)


class CorruptEntryError(Exception):
    """A cache entry cannot be read, misses an array, or its arrays do not match their digest."""


def cache_dir(cfg: DataConfig) -> Path:
    """``data.cache_dir``, else ``$FEDOAP_CACHE_DIR``, else ``~/.cache/fedoap``."""
    if cfg.cache_dir is not None:
        return Path(cfg.cache_dir).expanduser()
    env = os.environ.get(CACHE_DIR_ENV)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "fedoap"


@functools.cache
def code_fingerprint() -> str:
    """sha256 of the source of :data:`CODE_MODULES`, read once per process (the code it runs)."""
    here = Path(__file__).resolve().parent
    h = hashlib.sha256()
    for name in CODE_MODULES:
        path = here / name
        files = sorted(path.rglob("*.py")) if path.is_dir() else [path]
        for f in files:
            rel = f.relative_to(here).as_posix()
            h.update(rel.encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()


def source_fingerprint(path: Path) -> list[Any]:
    """What a change of the source changes: size and mtime of the file, or of every file under the
    folder as ``[relative path, resolved path, size, mtime_ns]`` (sorted). Symbolic links are
    followed, files and folders alike, as the readers follow them: an nnU-Net dataset whose
    ``imagesTr`` links elsewhere is fingerprinted by the files it reads, and a link re-pointed
    to another file changes the fingerprint. ``["missing"]`` if there is nothing."""
    if path.is_file():
        st = path.stat()
        return ["file", str(path.resolve()), st.st_size, st.st_mtime_ns]
    if path.is_dir():
        files = []
        seen: set[str] = set()  # folders already walked (resolved): a link loop ends here
        for folder, dirs, names in os.walk(path, followlinks=True):
            real = os.path.realpath(folder)
            if real in seen:
                dirs[:] = []
                continue
            seen.add(real)
            dirs.sort()
            for name in sorted(names):
                p = Path(folder) / name
                if p.is_file():
                    st = p.stat()
                    rel = str(p.relative_to(path))
                    files.append([rel, os.path.realpath(p), st.st_size, st.st_mtime_ns])
        files.sort()
        return ["dir", files]
    return ["missing"]


def _newest_mtime_ns(fingerprint: list[Any]) -> int:
    if fingerprint[0] == "file":
        return int(fingerprint[3])
    if fingerprint[0] == "dir":
        return max((int(f[3]) for f in fingerprint[1]), default=0)
    return 0


def cache_key(spec: ClientSpec, cfg: DataConfig) -> tuple[str, dict[str, Any], list[Any] | None]:
    """The entry's key (sha256 hex), its inputs (JSON-able, stored for humans) and the source
    fingerprint it was computed from (None for a synthetic client)."""
    path = None if spec.source == "synthetic" else resolve_path(cfg.root, spec.path or "")
    fingerprint = None if path is None else source_fingerprint(path)
    inputs: dict[str, Any] = {
        "version": CACHE_VERSION,
        "code": code_fingerprint(),
        "source": spec.source,
        "path": None if path is None else str(path.resolve()),
        # The generator seeds its RNG with the client name and writes it into case ids and names;
        # a file's arrays do not depend on it, so two clients reading one file share an entry.
        "name": spec.name if spec.source == "synthetic" else None,
        "use_rgb": spec.use_rgb,
        "where": {
            k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in spec.where.items()
        },
        "image_dir": spec.image_dir,
        "mask_dir": spec.mask_dir,
        "mask_suffix": spec.mask_suffix,
        "case_regex": spec.case_regex,
        "channel": spec.channel,
        "volume": dataclasses.asdict(spec.volume) if spec.source in VOLUME_SOURCES else None,
        "style": spec.style,
        "num_images": spec.num_images,
        "seed": spec.seed,
        "image_size": cfg.image_size,
        "channels": cfg.channels,
        # A folder's fingerprint lists every file: keep its digest, so the stored meta stays small.
        "source_fingerprint": None
        if fingerprint is None
        else hashlib.sha256(json.dumps(fingerprint).encode()).hexdigest(),
        "source_files": None
        if fingerprint is None
        else (len(fingerprint[1]) if fingerprint[0] == "dir" else int(fingerprint[0] == "file")),
    }
    key = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()
    return key, inputs, fingerprint


def array_digest(arrays: Mapping[str, np.ndarray]) -> str:
    """sha256 over each array's name, dtype, shape and bytes (about 0.1 s for 150 MB)."""
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name}|{a.dtype.str}|{a.shape}|".encode())
        h.update(a.reshape(-1).view(np.uint8).data)  # the buffer itself, no copy
    return h.hexdigest()


def save_npz_atomic(path: Path, arrays: Mapping[str, np.ndarray], compressed: bool = False) -> None:
    """Write an ``.npz`` to a temporary file beside ``path``, fsync it, rename it over ``path``.

    A killed process leaves the old file or the new one, never a torn one. The temporary name is
    unique, so processes writing the same entry at once (parallel clients) do not collide: the last
    rename wins and every version is complete.
    """
    with atomic_writer(path) as fh:
        save = np.savez_compressed if compressed else np.savez
        save(fh, allow_pickle=False, **arrays)


def read_entry(path: Path, key: str) -> RawClient:
    """Load and verify one entry. Raises :class:`FileNotFoundError` if there is none and
    :class:`CorruptEntryError` if it cannot be trusted."""
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [n for n in (*ARRAYS, "meta") if n not in z.files]
            if missing:
                raise CorruptEntryError(f"missing array(s) {missing}")
            arrays = {n: z[n] for n in ARRAYS}
            meta = json.loads(str(z["meta"]))
    except (FileNotFoundError, CorruptEntryError):
        raise
    except _READ_ERRORS as err:
        raise CorruptEntryError(f"unreadable: {type(err).__name__}: {err}") from err
    if not isinstance(meta, dict) or meta.get("version") != CACHE_VERSION or meta.get("key") != key:
        raise CorruptEntryError("its metadata does not belong to this key")
    if array_digest(arrays) != meta.get("digest"):
        raise CorruptEntryError("its arrays do not match their digest")
    notes = meta.get("notes")
    if not isinstance(notes, list) or not all(isinstance(n, str) for n in notes):
        raise CorruptEntryError("its notes are not a list of strings")
    return RawClient(**arrays, notes=list(notes))


def write_entry(path: Path, raw: RawClient, key: str, inputs: Mapping[str, Any]) -> None:
    """Store ``raw`` under ``key`` (uncompressed: loading must be fast, and most of the bytes are
    images that compress poorly next to the cost of decompressing them on every load)."""
    arrays = {n: getattr(raw, n) for n in ARRAYS}
    meta = {
        "version": CACHE_VERSION,
        "key": key,
        "inputs": dict(inputs),
        "notes": list(raw.notes),
        "digest": array_digest(arrays),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    save_npz_atomic(path, {**arrays, "meta": np.array(json.dumps(meta))})


def cached_raw(spec: ClientSpec, cfg: DataConfig, build: Callable[[], RawClient]) -> RawClient:
    """``build()``'s result for this client, from the cache when it holds a valid entry.

    On a miss (or a corrupt entry) ``build()`` runs and its result is stored; its errors propagate
    and nothing is stored. A hit replays the build's notes, and only those: a run's
    ``summary.json`` is the same whether its data came from the cache or not.
    ``data.cache=False`` calls ``build()`` and touches nothing. A cache folder that cannot be
    written costs the speed-up, never the run: the result is returned with a note.
    """
    if not cfg.cache:
        return build()
    started_ns = time.time_ns()
    key, inputs, fingerprint = cache_key(spec, cfg)
    entry = cache_dir(cfg) / f"{key}.npz"
    cache_notes: list[str] = []
    try:
        raw = read_entry(entry, key)
    except FileNotFoundError:
        pass
    except CorruptEntryError as err:
        cache_notes.append(f"cache entry {entry} is corrupt ({err}); rebuilt")
    else:
        return raw

    raw = build()
    if _storable(raw, inputs["path"], fingerprint, started_ns):
        try:
            write_entry(entry, raw, key, inputs)
        except OSError as err:
            cache_notes.append(f"data cache {entry.parent} is not writable ({err}); not cached")
    raw.notes.extend(cache_notes)
    return raw


def _storable(
    raw: RawClient, path: str | None, fingerprint: list[Any] | None, started_ns: int
) -> bool:
    """Whether the build can be stored under the key computed before it ran."""
    if any(getattr(raw, n).dtype.hasobject for n in ARRAYS):
        return False  # np.load(allow_pickle=False) could never read it back
    if path is None or fingerprint is None:
        return True
    # Changed while being read: the arrays may belong to neither version.
    if source_fingerprint(Path(path)) != fingerprint:
        return False
    return _newest_mtime_ns(fingerprint) < started_ns - int(RACY_SECONDS * 1e9)
