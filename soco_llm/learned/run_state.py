"""What a learned method's run folder holds, read-only, and whether a command may use it.

run.json records a run's config, model and status ("running" until the cut is saved, then "done");
the trainer's checkpoint.json its last saved step (`core/trainer.py`); block-*.safetensors the blocks a block-wise run finished.
`LearnedConfig.preflight` asks before anything is loaded and `run_folder.prepare` asks again as the run
starts, so a plain rerun after a crash or Ctrl-C is told exactly what to do rather than refused
blankly, and an interrupted run says what it kept.
"""

from __future__ import annotations

from pathlib import Path

from ..core.trainer import checkpoint_step
from ..errors import SocoError, first_line
from ..io.read import read_json

RUN_FILE = "run.json"
SCORES_FILE = "soco_scores.safetensors"
BASIS_FILE = "basis.safetensors"
TEACHER_FILE = "teacher.safetensors"
STATUSES = ("running", "done")
# Settings that may differ between a run and its resumption.
RESUMABLE = ("resume", "run_dir", "checkpoint_every")


def kept_config(cfg) -> dict:
    """The settings run.json records: those a resumption must repeat."""
    return {k: v for k, v in cfg.to_dict().items() if k not in RESUMABLE}


def start_over(run_dir: Path) -> str:
    """What to do about a damaged file of a run folder."""
    return f"the run folder is damaged: delete it (rm -r {run_dir}) to start over"


def _read_json(path: Path, what: str, run_dir: Path):
    return read_json(path, f"the {what} is damaged; delete the run folder (rm -r {run_dir}) to start over")


def read_meta(run_dir: str | Path) -> dict | None:
    """run.json of a run folder (None when there is none), checked to be a run record."""
    run_dir = Path(run_dir)
    path = run_dir / RUN_FILE
    if not path.is_file():
        return None
    meta = _read_json(path, "run record", run_dir)
    if not isinstance(meta, dict) or not isinstance(meta.get("config"), dict) or meta.get("status") not in STATUSES:
        raise SocoError(f"{path} is not a run record (it needs a 'config' object and a status of "
                        f"{' or '.join(STATUSES)}); delete the run folder (rm -r {run_dir}) to start over")
    return meta


_SAFETENSORS_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "F64": "float64"}


def run_dtype(run_dir: Path, meta: dict) -> str | None:
    """The dtype a run trained in (its basis is stored in it): run.json's, or for a folder written before it
    was recorded there, the basis file's (its header only). None when neither says."""
    if isinstance(meta.get("dtype"), str):
        return meta["dtype"]
    path = run_dir / BASIS_FILE
    if not path.is_file():
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            key = next((k for k in f.keys() if k.endswith("::left")), None)
            return None if key is None else _SAFETENSORS_DTYPES.get(f.get_slice(key).get_dtype())
    except Exception as e:  # noqa: BLE001 - any unreadable header is a damaged file
        raise SocoError(f"{path} is unreadable ({first_line(e)}); delete "
                        f"the run folder (rm -r {run_dir}) to start over") from None


def check_run_dtype(run_dir: Path, meta: dict, dtype: str) -> None:
    """A run's cached basis, checkpoints and teacher go on only in the dtype they were made in."""
    made = run_dtype(run_dir, meta)
    if made is not None and made != dtype:
        raise SocoError(f"run folder {str(run_dir)!r} was made in {made}, this model is in {dtype}; resume with "
                        f"--dtype {made}, or choose another --run-dir")


def describe(run_dir: Path, steps: int | None = None) -> str:
    """What an unfinished run kept, as the tail of a sentence: 'the checkpoint at step 108 of 160'."""
    step = checkpoint_step(run_dir)
    if step is not None:
        return f"the checkpoint at step {step}" + (f" of {steps}" if steps else "")
    blocks = len(list(run_dir.glob("block-*.safetensors")))
    if blocks:
        return f"{blocks} finished block{'s' if blocks > 1 else ''}"
    if (run_dir / BASIS_FILE).is_file() and (run_dir / TEACHER_FILE).is_file():
        return "its cached basis and teacher (no training step yet)"
    return "no training yet"


def check_run_dir(cfg) -> None:
    """Raise, saying what to do, when `cfg`'s run folder cannot be used as asked (fresh, or --resume)."""
    if cfg.run_dir is None:
        return
    run_dir = Path(cfg.run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise SocoError(f"run folder {str(run_dir)!r} is a file; choose another --run-dir")
    meta = read_meta(run_dir)
    if meta is None:
        # Our own leftovers (hidden temp files of a killed write) are no reason to refuse; a user's files are.
        if run_dir.is_dir() and any(not p.name.startswith(".") for p in run_dir.iterdir()):
            raise SocoError(f"{str(run_dir)!r} exists and is not a run folder (no {RUN_FILE}); choose another "
                            "--run-dir or empty it")
        return
    if cfg.resume:
        keep, made = kept_config(cfg), meta["config"]
        # `preset` is recorded since this version: a run recorded without it resumes under any preset name.
        differ = sorted(k for k in set(keep) | set(made) if keep.get(k) != made.get(k)
                        and (k != "preset" or k in made))
        if differ:
            shown = ", ".join(f"{k}={made.get(k)!r} (now {keep.get(k)!r})" for k in differ)
            raise SocoError(f"run folder {str(run_dir)!r} was made with other settings: {shown}; resume with the "
                            "settings it was made with, or choose another --run-dir")
        return
    if meta["status"] == "done":
        raise SocoError(f"run folder {str(run_dir)!r} already holds a finished run; pass --resume to save its result "
                        f"again, cut it at another ratio with `soco export --from {run_dir} --ratio R --out DIR`, "
                        "or choose another --run-dir")
    raise SocoError(f"run folder {str(run_dir)!r} holds an unfinished run that kept {describe(run_dir, cfg.steps)}; "
                    f"pass --resume to continue it, or delete the folder (rm -r {run_dir}) to start over")
