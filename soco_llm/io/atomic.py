"""Atomic writes: the one place in the project that writes to a temporary name and renames it into
place, so a crash or a kill never leaves a half-written file or folder at the real path; and the one
place that cleans up what a killed writer left behind (`clean_stale`).

Names: a temporary file or folder for NAME is `.NAME.soco-tmp-PID-START-RAND`, and a folder moved aside
while it is replaced is `.NAME.soco-old-PID-START-RAND`. START is the writer's start time in whole
seconds, so that a PID reused by another process (common in containers) is not taken for the writer.

Folder renames (`atomic_dir`): without overwrite the final rename is exclusive (Linux renameat2
RENAME_NOREPLACE, macOS renamex_np RENAME_EXCL; elsewhere the path is reserved with an exclusive mkdir
and the folder renamed onto the empty reservation), so a folder that appeared meanwhile is never
replaced. With overwrite the new and the old folder are swapped in one step (RENAME_EXCHANGE /
RENAME_SWAP), so the path always holds one of them; where the filesystem cannot swap, the old folder is
renamed aside and the new one into place, and a kill between the two leaves the old one aside, which
`clean_stale` (run by every later `atomic_dir` beside it, and by `soco clean`) moves back.
"""

from __future__ import annotations

import ctypes
import errno
import json
import logging
import os
import re
import secrets
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import psutil
from safetensors.torch import save_file

from ..errors import SocoError
from .disk import refused_writes

log = logging.getLogger(__name__)

_STALE = re.compile(r"\.(?P<name>.+)\.soco-(?P<kind>tmp|old)-(?P<pid>\d+)-(?P<start>\d+)-[0-9a-f]+")
_UNSUPPORTED = {errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV}


def _start_time(pid: int) -> int | None:
    """A process's start time in whole seconds; None if it is gone, -1 if it exists but may not be read."""
    try:
        return round(psutil.Process(pid).create_time())
    except psutil.NoSuchProcess:  # zombies too: a process that has exited writes nothing more
        return None
    except psutil.Error:
        return -1


def _alive(pid: int, start: int) -> bool:
    actual = _start_time(pid)
    # ±1 s: the start time is derived from clock ticks and rounds either way
    return actual is not None and (actual == -1 or abs(actual - start) <= 1)


def _temp_path(path: Path, kind: str = "tmp") -> Path:
    """A name of the pattern above, beside `path`, owned by this process."""
    pid = os.getpid()
    return path.with_name(f".{path.name}.soco-{kind}-{pid}-{_start_time(pid)}-{secrets.token_hex(4)}")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            path.unlink()
        except FileNotFoundError:
            pass


def _native_rename():
    """(rename(src, dst, flag) -> errno, NOREPLACE flag, EXCHANGE flag), or None where the C library has none."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except (OSError, TypeError):  # no C library loaded by name (Windows): the portable path
        return None
    if sys.platform.startswith("linux") and hasattr(libc, "renameat2"):
        fn, at_fdcwd = libc.renameat2, -100
        fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]

        def call(src: bytes, dst: bytes, flag: int) -> int:
            return fn(at_fdcwd, src, at_fdcwd, dst, flag)
        noreplace, exchange = 1, 2
    elif sys.platform == "darwin" and hasattr(libc, "renamex_np"):
        fn = libc.renamex_np
        fn.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_uint]

        def call(src: bytes, dst: bytes, flag: int) -> int:
            return fn(src, dst, flag)
        noreplace, exchange = 4, 2  # RENAME_EXCL, RENAME_SWAP
    else:
        return None

    def rename(src: Path, dst: Path, flag: int) -> int:
        return 0 if call(os.fsencode(src), os.fsencode(dst), flag) == 0 else ctypes.get_errno()

    return rename, noreplace, exchange


_NATIVE = _native_rename()


def _rename_flagged(src: Path, dst: Path, exchange: bool) -> bool:
    """One native rename with NOREPLACE or EXCHANGE; False where the platform or filesystem has no such
    rename (the caller falls back), OSError (FileExistsError, FileNotFoundError, ...) when it failed."""
    if _NATIVE is None:
        return False
    rename, noreplace_flag, exchange_flag = _NATIVE
    err = rename(src, dst, exchange_flag if exchange else noreplace_flag)
    if err in _UNSUPPORTED:
        return False
    if err:
        raise OSError(err, os.strerror(err), str(src), None, str(dst))
    return True


def _move_noreplace(src: Path, dst: Path) -> None:
    """Move folder `src` to `dst`, atomically refusing (FileExistsError) if `dst` exists: never a check
    followed by a rename, which a second writer could slip between."""
    if _rename_flagged(src, dst, exchange=False):
        return
    if os.name == "nt":
        os.rename(src, dst)  # Windows never renames over an existing path
        return
    os.mkdir(dst)  # the exclusive step: FileExistsError if another writer or a user got there first
    try:
        os.rename(src, dst)  # POSIX renames a folder over an empty folder, here our reservation
    except BaseException as e:
        try:
            os.rmdir(dst)  # only if still empty: anything put there meanwhile is kept
        except OSError:
            pass
        if isinstance(e, OSError) and e.errno in (errno.ENOTEMPTY, errno.EEXIST):
            # someone filled the reservation meanwhile: for the caller, the path was taken
            raise FileExistsError(e.errno, e.strerror, str(src), None, str(dst)) from e
        raise


def _replace(new: Path, out: Path) -> None:
    """Put folder `new` at `out` (overwrite): a swap in one step where possible, so `out` always holds
    the old or the new folder; `new` then holds the old one, which the caller removes."""
    for _ in range(3):  # `out` may appear or vanish between attempts, under other writers; each is atomic
        try:
            if _rename_flagged(new, out, exchange=True):
                return
        except FileNotFoundError:  # nothing at `out` to swap with
            pass
        if not os.path.lexists(out):
            try:
                _move_noreplace(new, out)
                return
            except FileExistsError:
                continue
        old = _temp_path(out, "old")
        try:
            os.rename(out, old)
        except FileNotFoundError:
            continue
        try:
            os.rename(new, out)  # a kill before this completes leaves `old` aside; clean_stale moves it back
        except BaseException:
            try:
                _move_noreplace(old, out)
            except OSError:
                pass
            raise
        _remove(old)
        return
    raise SocoError(f"output folder {str(out)!r} kept changing while it was being replaced (another writer?); "
                    "nothing was replaced, try again")


def _clean(folder: Path, name: str | None = None, dry_run: bool = False) -> list[Path]:
    """Leftovers (pattern above) in `folder` of writers that are gone; `name`: only those for that name."""
    try:
        entries = sorted(folder.iterdir())
    except OSError:  # missing, not a folder, unreadable: nothing of ours to clean
        return []
    acted = []
    for p in entries:
        m = _STALE.fullmatch(p.name)
        if not m or (name is not None and m["name"] != name) or _alive(int(m["pid"]), int(m["start"])):
            continue
        acted.append(p)
        if dry_run:
            continue
        target = p.with_name(m["name"])
        if m["kind"] == "old" and p.is_dir() and not os.path.lexists(target):
            try:  # a kill came between the two renames of a replace: the old folder is the one to keep
                _move_noreplace(p, target)
                log.warning("moved %s back to %s (a replace there was killed half-way)", p.name, target)
                continue
            except FileExistsError:  # a new folder got there meanwhile: the old one is obsolete
                pass
            except FileNotFoundError:  # another cleaner got there first
                continue
            except OSError as e:
                log.warning("could not move %s back to %s (%s); left it as it is", p, target, e)
                acted.remove(p)
                continue
        _remove(p)
        log.info("removed stale %s", p)
    return acted


def clean_stale(path: str | os.PathLike, dry_run: bool = False) -> list[Path]:
    """Clean up after killed writers: temporary files and folders, and folders moved aside, of processes
    that no longer run (never those of a live process). `path`: a folder, whose entries are scanned, or an
    output path, whose own leftovers beside it are scanned too, even when the path itself is missing.
    An old folder whose path is empty is moved back there; everything else found is removed.
    Returns what was (with dry_run: would be) removed or moved back."""
    path = Path(path)
    found = _clean(path.parent, name=path.name, dry_run=dry_run)
    if path.is_dir():
        found += _clean(path, dry_run=dry_run)
    return found


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    tmp = _temp_path(path)
    try:
        with refused_writes(path):
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_bytes(data)
            os.replace(tmp, path)
    finally:
        _remove(tmp)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))  # tables hold ×, µ and —, whatever the locale


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def atomic_save_tensors(path: str | os.PathLike, tensors: dict, metadata: dict | None = None) -> None:
    """A safetensors file of `tensors` (moved to the host, made contiguous)."""
    path = Path(path)
    tmp = _temp_path(path)
    try:
        with refused_writes(path):
            path.parent.mkdir(parents=True, exist_ok=True)
            save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)
            os.replace(tmp, path)
    finally:
        _remove(tmp)


def _exists_error(out: Path, meanwhile: bool) -> SocoError:
    when = " while this one was being written (another process?); it was left as it is and nothing was " \
           "written" if meanwhile else ""
    return SocoError(f"output folder {str(out)!r} {'appeared' if meanwhile else 'already exists'}{when}; "
                     "pass --overwrite (overwrite=True) to replace it, or choose another output")


@contextmanager
def atomic_dir(out: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside `out`; move it into place only if the block succeeds.

    Without `overwrite` an `out` that exists, now or by the time the block ends, is never replaced
    (SocoError). With it, `out` holds the old or the new folder at every moment where the filesystem can
    swap two folders (see the module docstring)."""
    out = Path(out)
    with refused_writes(out):
        out.parent.mkdir(parents=True, exist_ok=True)
    _clean(out.parent)  # first, so a folder a killed replace left aside is back before `out` is looked at
    if os.path.lexists(out) and not overwrite:
        raise _exists_error(out, meanwhile=False)  # early, before any work; the final rename checks again
    tmp = _temp_path(out)
    with refused_writes(out):
        os.mkdir(tmp)
    try:
        with refused_writes(out):  # a full disk or a read-only folder met while writing: one line
            yield tmp
            if overwrite:
                _replace(tmp, out)
            else:
                try:
                    _move_noreplace(tmp, out)
                except FileExistsError:
                    raise _exists_error(out, meanwhile=True) from None
    finally:
        _remove(tmp)  # after a swap it holds the old folder
