"""`LearnedConfig`: what every learned method's config declares to the run layer, beside its own settings.

A learned method trains spectral layers (`spectral.py`) in a run folder (`run_folder.py`) and cuts them
(`cut.py`). Its config subclasses this one and so gets, with no code in the CLI:
- the run-folder settings `run_dir`, `resume`, `checkpoint_every` and the preflight that checks the folder;
- `deviation`: whether each layer trains a deviation d (a bias added to its output, costing m parameters);
- `teacher_windows()`: the windows and top-k of the dense teacher its run caches and hands back
  (`MethodResult.teacher`), so healing reuses it instead of computing it again;
- `recut_refusal(meta)`: why a finished run cannot be cut at another ratio (None: it can, `recut.py`);
- `cli_options`: its fields the `soco compress` parser offers as options.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..checks import SEED, Rule, at_least
from ..methods.base import CompressionConfig
from .run_state import check_run_dir


@dataclass
class LearnedConfig(CompressionConfig):
    """Settings every learned method shares: its run folder, its deviation d and its teacher."""

    rules: ClassVar[dict[str, Rule]] = {"seed": SEED, "checkpoint_every": at_least(1), "teacher_topk": at_least(1)}
    cli_options: ClassVar[dict[str, str]] = {
        "run_dir": "a learned method's run folder: checkpoints, basis, teacher (default: OUT.run)"}

    seed: int = 0
    deviation: bool = True  # train a deviation d per layer: a bias added to its output
    teacher_topk: int = 128  # teacher log-probs kept per token (the rest is one bucket)
    checkpoint_every: int = 20
    run_dir: str | None = None  # checkpoints, basis and teacher cache; None = no checkpoints
    resume: bool = False

    def teacher_windows(self) -> tuple[int, int, int, int] | None:
        """(windows, window length, seed, top-k) of the dense teacher this run caches and hands back in
        `MethodResult.teacher`; None when it caches none. Default: its calibration windows."""
        calib = self.calibration()
        return calib.num_samples, calib.seq_len, calib.seed, self.teacher_topk

    @classmethod
    def recut_refusal(cls, meta: dict) -> str | None:
        """Why the finished run recorded in `meta` (run.json) cannot be cut at another ratio; None: it can."""
        return None

    def preflight(self) -> None:
        """The run folder must be usable as asked (fresh, or resumable with --resume); see run_state.py."""
        check_run_dir(self)

    def record(self, ratio: float, history: list[dict] | None = None, run_dir=None) -> dict:
        """The config as a report records it: cut at `ratio`, with the last training step and the run folder."""
        config = self.to_dict()
        config["ratio"] = ratio
        if history:
            config["final_train"] = history[-1]
        config["run_dir"] = str(run_dir) if run_dir else None
        return config
