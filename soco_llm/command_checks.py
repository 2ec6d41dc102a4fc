"""The checks a `soco` subcommand makes before its work, beside its options' own: the output folder (a folder
that can be written, that is no input and holds none, replaced only when asked and only if it is a model folder)
and the evaluation window a loaded model can read."""

from __future__ import annotations

from pathlib import Path

from .data import BUNDLED_SOURCES, HF_DATASETS
from .errors import SocoError
from .eval.perplexity import EVAL_SEQ_LEN
from .io import disk
from .models import fit_window


def read_paths(args) -> list[str]:
    """The files and folders a command reads, beside its model: text files of --calib and --eval-data."""
    sources = [getattr(args, "calib", None), *(getattr(args, "eval_data", None) or [])]
    return [s for s in sources if s and s not in BUNDLED_SOURCES + HF_DATASETS]


def check_out(out: str, overwrite: bool, *inputs) -> None:
    """The output folder can be written as asked, checked before any work: not a file or a dangling link, not an
    input and holding none (--overwrite would delete it), writable where it is to be made, and with --overwrite
    only a model folder (or an empty one) is replaced, never a folder of other files."""
    path = Path(out)
    if not out.strip():
        raise SocoError("--out is empty; give the output folder's path")
    if path.is_symlink() and not path.exists():
        raise SocoError(f"--out {out!r} is a symbolic link to nothing; remove the link or choose another --out")
    if path.exists() and not path.is_dir():
        raise SocoError(f"--out {out!r} is a file; give a folder path")
    for given in inputs:
        if given is None or not Path(given).exists():
            continue
        source = Path(given).resolve()
        if source == path.resolve():
            raise SocoError(f"--out {out!r} is also an input of this command; write to another folder")
        if source.is_relative_to(path.resolve()):
            raise SocoError(f"--out {out!r} holds {given!r}, an input of this command, which writing there would "
                            "delete; write to another folder")
    ancestor = disk.nearest_folder(path)
    if not ancestor.is_dir():
        raise SocoError(f"--out {out!r} cannot be made: {str(ancestor)!r} is a file")
    if path.exists() and not overwrite:
        raise SocoError(f"output folder {out!r} already exists; pass --overwrite to replace it")
    if path.exists() and any(path.iterdir()) and not (path / "config.json").is_file():
        raise SocoError(f"--overwrite replaces model folders only, and {out!r} holds no config.json; "
                        "delete it yourself or choose another --out")
    disk.check_writable(path, "--out")


def fit_eval_window(model, args) -> None:
    """--eval-seq-len as the model can read it: by default 512 tokens, or fewer for a model that reads fewer."""
    given = args.eval_seq_len is not None
    args.eval_seq_len = fit_window(model, args.eval_seq_len if given else EVAL_SEQ_LEN, "--eval-seq-len", given)
