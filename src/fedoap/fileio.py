"""Atomic file writes: write a temporary file, flush it to disk, rename it over the target.

A process killed mid-write leaves the old file or the new one, never a torn one. The temporary
file is created exclusively under a random name (:func:`exclusive_temp`), so a symbolic link
planted where it will be written cannot redirect the write to another file; the rename replaces
the target's own directory entry, so a target that is a symbolic link is replaced, never written
through. And :func:`check_output_dir`: a command's output folder is checked before any work
starts; :func:`acquire_lock` and :func:`release_lock`: an advisory lock file one process at a
time may hold.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import secrets
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, BinaryIO

from fedoap.errors import OutputError, UnsafeNameError

#: Every temporary file fedoap writes ends in this (``RunDir.remove_stale_temporaries``).
TMP_SUFFIX = ".tmp"


def exclusive_temp(path: Path) -> tuple[int, Path]:
    """Create ``.<name>.<random>.tmp`` beside ``path`` and return its open descriptor and path.

    ``O_CREAT | O_EXCL | O_NOFOLLOW``: the call fails rather than open a file that already
    exists or follow a symbolic link, and the random part makes the name unpredictable. The mode
    is 0666 less the umask, as for any file the user creates (not mkstemp's 0600: prepared data
    and run folders are meant to be shared)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    for _ in range(100):
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}{TMP_SUFFIX}")
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"{path.parent}: no free temporary name for {path.name}")


@contextlib.contextmanager
def atomic_writer(path: Path) -> Iterator[BinaryIO]:
    """A binary file to write ``path``'s new content to. On a clean exit it is flushed to disk
    and renamed over ``path``; on an error it is deleted and ``path`` is left as it was."""
    fd, tmp = exclusive_temp(path)
    try:
        with os.fdopen(fd, "wb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_with(path: Path, write: Callable[[str], None]) -> None:
    """For writers that take only a file name (safetensors' ``save_file``): ``write`` fills an
    exclusively created temporary file, which is then flushed and renamed over ``path``."""
    fd, tmp = exclusive_temp(path)
    os.close(fd)
    try:
        write(str(tmp))
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    with atomic_writer(path) as fh:
        fh.write(data)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def open_append(path: Path, text: bool = False) -> Any:
    """Open a log file to append to, created if need be, never through a symbolic link
    (``O_NOFOLLOW``: a link planted at ``path`` is an ``OSError``, not a write elsewhere)."""
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(path, flags, 0o666)
    return os.fdopen(fd, "a" if text else "ab")


def save_figure(fig: Any, path: Path, dpi: int) -> None:
    """A matplotlib figure saved as PNG through :func:`atomic_writer`."""
    with atomic_writer(path) as fh:
        fig.savefig(fh, format="png", dpi=dpi)


def check_output_dir(path: Path, option: str = "--out") -> None:
    """Raise :class:`OutputError`, naming ``option`` and ``path``, unless ``path`` is a folder
    that can be written, or a folder that can be created.

    Refused: ``path`` exists and is not a folder; an existing component above it is a file; the
    nearest existing folder (``path`` itself, or the ancestor it would be created in) is not
    writable (``os.access``, then an empty folder created and removed there, since access() says
    yes to root even where nothing can be created). Leaves nothing behind, so commands call it
    before loading any data or model.
    """
    given = Path(path)
    here = Path(os.path.abspath(given))
    for p in (here, *here.parents):
        if os.path.lexists(p):
            nearest = p
            break
    else:  # pragma: no cover - the root of the file system always exists
        return
    if not nearest.exists():  # a symbolic link to nothing
        raise OutputError(f"{option} {given}: {nearest} is a broken symbolic link")
    if not nearest.is_dir():
        if nearest == here:
            raise OutputError(f"{option} {given}: exists and is not a folder")
        raise OutputError(f"{option} {given}: {nearest} is a file, not a folder")
    where = "" if nearest == here else f" ({nearest} is where it would be created)"
    if not os.access(nearest, os.W_OK | os.X_OK):
        raise OutputError(f"{option} {given}: not writable{where}")
    # access() says yes to root almost everywhere, also where nothing can be created (/proc,
    # /sys): create and remove an empty folder to be sure.
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".fedoap-write-check-", dir=nearest))
    except OSError as err:
        reason = err.strerror or type(err).__name__
        raise OutputError(f"{option} {given}: not writable{where}: {reason}") from None


def output_stem(path: Path) -> str:
    """A file's name without its extension; ``.nii.gz`` counts as one (``ct.nii.gz`` -> ``ct``);
    a folder (a DICOM series) keeps its whole name."""
    if path.is_dir():
        return path.name
    if path.name.lower().endswith(".nii.gz"):
        return path.name[: -len(".nii.gz")]
    return path.stem


def mirrored_outputs(
    inputs: Sequence[Path], out_dir: Path, suffixes: Sequence[str], force: bool = False
) -> list[tuple[Path, ...]]:
    """For each input, its output files ``out_dir/<rel>/<stem><suffix>``, one per suffix.

    ``<rel>`` is the input's folder relative to the deepest folder holding every input (the
    common path of the resolved parents): inputs in one folder give flat outputs, ``s1/x.png``
    and ``s2/x.png`` give ``s1/x_mask.png`` and ``s2/x_mask.png``. Writes nothing; raises
    :class:`OutputError` naming the files when two inputs would write the same output (the same
    file given twice, ``x.png`` beside ``x.jpg``; names are compared ignoring case, as some file
    systems do), when an output would replace one of the inputs, or when an output exists and
    ``force`` is off. A folder an output needs is checked with :func:`check_output_dir`.
    """
    paths = [Path(p) for p in inputs]
    if not paths:
        return []
    parents = [p.parent.resolve() for p in paths]
    common = Path(os.path.commonpath(parents))
    base = out_dir.resolve()
    sources = {str(d / p.name).casefold(): p for p, d in zip(paths, parents, strict=True)}
    claimed: dict[str, tuple[Path, Path]] = {}  # output (casefolded) -> (input, its folder)
    result: list[tuple[Path, ...]] = []
    for p, parent in zip(paths, parents, strict=True):
        rel = parent.relative_to(common)
        outs = tuple(out_dir / rel / f"{output_stem(p)}{s}" for s in suffixes)
        for out in outs:
            key = str(base / rel / out.name).casefold()
            if key in claimed:
                other, other_parent = claimed[key]
                if (other_parent / other.name) == (parent / p.name):
                    raise OutputError(f"{other} and {p} are the same file; give it once")
                raise OutputError(
                    f"{other} and {p} would both be written to {out}; rename one of them, or "
                    "give them in separate commands with different --out folders"
                )
            if key in sources:
                raise OutputError(
                    f"{out} would replace the input {sources[key]}; choose another --out"
                )
            claimed[key] = (p, parent)
        result.append(outs)
    for folder in sorted({o.parent for outs in result for o in outs}):
        check_output_dir(folder)
    existing = [o for outs in result for o in outs if os.path.lexists(o)]
    if existing and not force:
        more = f" (and {len(existing) - 1} more)" if len(existing) > 1 else ""
        raise OutputError(
            f"{existing[0]}{more} already exists; pass --force to replace, or choose another --out"
        )
    for o in existing:
        if o.is_dir():
            raise OutputError(f"{o} is a folder; --force replaces files only")
    return result


class LockedError(BlockingIOError):
    """:func:`acquire_lock`: another open file holds the lock. ``pid`` is the process id its
    holder wrote into the file (None where it has not written one yet)."""

    def __init__(self, path: Path, pid: int | None) -> None:
        super().__init__(errno.EWOULDBLOCK, "locked by another process", str(path))
        self.pid = pid


def acquire_lock(path: Path) -> int:
    """Take the exclusive advisory lock (``flock``) of the file ``path``, created if need be,
    without waiting; return its open descriptor, which holds the lock until
    :func:`release_lock`. Raises :class:`LockedError` if another open file holds it.

    The lock is the kernel's: a holder that dies, even by SIGKILL, releases it, and a file left
    behind is simply locked again. After locking, the descriptor is checked to still be the file
    at ``path``: a holder removes the file on release (:func:`release_lock`), and whoever had
    opened the removed file and then locked it holds a lock nobody else sees, so it tries again
    on the new one. The holder's process id is written into the file, for error messages.
    ``O_NOFOLLOW``: a symbolic link planted at ``path`` is an ``OSError``, never followed.
    """
    flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0)
    while True:
        fd = os.open(path, flags, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = _holder(fd)
            os.close(fd)
            raise LockedError(path, pid) from None
        except BaseException:
            os.close(fd)
            raise
        if _is_file_at(fd, path):
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            return fd
        os.close(fd)  # released and removed by its holder meanwhile: lock the one there now


def release_lock(fd: int, path: Path) -> None:
    """Remove the lock file ``path`` if it is still the one ``fd`` locks (so that no lock file
    outlives its run), then close ``fd``, which releases the lock. Removing it while still
    holding the lock is what keeps :func:`acquire_lock`'s check sound."""
    try:
        if _is_file_at(fd, path):
            os.unlink(path)
    finally:
        os.close(fd)


def _is_file_at(fd: int, path: Path) -> bool:
    try:
        here = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (here.st_dev, here.st_ino) == (mine.st_dev, mine.st_ino)


def _holder(fd: int) -> int | None:
    """The process id written in a lock file (None if it is empty or not a number)."""
    text = os.pread(fd, 32, 0).decode(errors="replace").strip()
    return int(text) if text.isdigit() else None


#: A name that becomes one component of a file or folder name (a regime's figures folder, a
#: method's figure, a benchmark cell's folder): letters, digits and ``. _ + -``, starting with a
#: letter, a digit or ``_`` (so never ``..``, a hidden file, or something a command line reads as
#: an option), at most 128 characters. Every name fedoap's own specs use fits: ``fedoap+sg``,
#: ``cases-02``, ``fedoap.median.sign_flip``.
SAFE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._+-]{0,127}")
SAFE_NAME_RULE = "1 to 128 letters, digits and . _ + - (starting with a letter, a digit or _)"


def safe_name(value: str, what: str, source: str | Path) -> str:
    """``value``, unchanged, where it matches :data:`SAFE_NAME`; else :class:`UnsafeNameError`, a
    one-line message that names ``source`` (the file, and where in it), ``what`` the value is,
    and the value itself (``repr``: a newline in it stays on the line)."""
    if not SAFE_NAME.fullmatch(value):
        raise UnsafeNameError(
            f"{source}: {what} {value!r} cannot be part of a file name; use {SAFE_NAME_RULE}"
        )
    return value
