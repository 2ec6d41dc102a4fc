"""Whether the disk takes a write: before the work, a probe that the output's folder is writable and a check of
its free space against an estimate; during it, one line for a write the filesystem refuses (full, read-only,
no permission) instead of a traceback. `atomic.py` makes every write through `refused_writes`."""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from ..errors import SocoError

# What a write that cannot succeed raises: the OS's errors, and safetensors' own error, which wraps them in text.
_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG}
_WRITE_TEXTS = ("No space left", "StorageFull", "Read-only file system", "ReadOnlyFilesystem", "Permission denied",
                "PermissionDenied", "Disk quota", "QuotaExceeded", "File too large")


def _write_failure(e: BaseException, path: Path) -> SocoError | None:
    """One line for a write the filesystem refused (full, read-only, no permission), None for anything else."""
    if isinstance(e, OSError) and e.errno in _WRITE_ERRNOS:
        why = os.strerror(e.errno)
    else:
        why = next((t for t in _WRITE_TEXTS if t in str(e)), None)
        if why is None:
            return None
    return SocoError(f"could not write {str(path)!r}: {why}; free space or choose another place to write "
                     "(nothing was left half-written)")


@contextmanager
def refused_writes(path: Path) -> Iterator[None]:
    """Turn a write the filesystem refuses into one line naming `path`; any other error passes unchanged."""
    try:
        yield
    except SocoError:
        raise
    except Exception as e:  # noqa: BLE001 - safetensors' error type is not an OSError
        err = _write_failure(e, path)
        if err is None:
            raise
        raise err from None


def nearest_folder(path: str | os.PathLike) -> Path:
    """The folder that holds `path`, or the nearest existing ancestor where the parents are still to be made."""
    return next(p for p in Path(path).absolute().parents if p.exists())


def check_writable(path: str | os.PathLike, what: str = "the output") -> None:
    """Before any work: `path` can be made where it is asked for (its nearest existing folder takes a new file).
    Permission bits alone do not say so: root ignores them, and a read-only mount ignores root."""
    folder = nearest_folder(path)
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=f".{Path(path).name}.soco-probe-"):
            pass
    except OSError as e:
        raise SocoError(f"{what} {str(path)!r} cannot be written: {folder} is not writable ({os.strerror(e.errno)}); "
                        "choose another place") from None


def check_free_space(path: str | os.PathLike, needed: int, what: str = "the output") -> None:
    """Before the work: the disk that will hold `path` has room for an estimated `needed` bytes."""
    free = shutil.disk_usage(nearest_folder(path)).free
    if free < needed:
        raise SocoError(f"{what} {str(path)!r} needs about {needed / 2**30:.2f} GiB and its disk has "
                        f"{free / 2**30:.2f} GiB free; free space or choose another place")
