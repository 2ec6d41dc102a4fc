"""`SoCoConfig`: every constant of a SoCo run, its checks, its presets, its calibration sizes and its recipe
(whole-model runs heal after the cut by default, in the CLI and in `compress()` alike)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ...checks import Rule, above, at_least, between, one_of
from ...errors import SocoError
from ...learned.config import LearnedConfig
from ..base import CalibrationConfig


@dataclass
class SoCoConfig(LearnedConfig):
    """Every constant of a SoCo run. Stage lengths must add up to `steps`; a stage of 0 is off."""

    method: ClassVar[str] = "soco"
    # quick: under a fifth of the training tokens (60 steps of 2×256 instead of 160 of 4×256).
    presets: ClassVar[dict[str, dict]] = {"quick": dict(steps=60, batch_size=2, num_samples=64)}
    # Ranges beside the annotated types (checks.py), all checked before anything is loaded.
    rules: ClassVar[dict[str, Rule]] = {
        **{k: CalibrationConfig.rules[k] for k in ("batch_size", "seq_len", "num_samples", "seed")},
        "basis": one_of("whitened", "plain"), "straight_through": one_of("all", "stage3", "off"),
        "steps": at_least(1), "stage_steps": at_least(0), "whiten_samples": at_least(1),
        "lr_scores": above(0), "lr_bias": at_least(0), "temperature": above(0), "final_temperature": above(0),
        # The stage-2 budget swings to target·(1 ± amplitude): an amplitude of 1 would ask for nothing.
        "alternate_every": at_least(1), "alternate_amplitude": between(0, 1, high_open=True),
        "size_weight": at_least(0), "polarize_weight": at_least(0), "sparsity_weight": at_least(0),
    }

    basis: str = "whitened"  # "whitened" (SVD-LLM style) or "plain" (the paper's SVD of W)
    cap_basis: bool = True  # train only the components a compressed layer could ever keep
    steps: int = 160
    stage_steps: list[int] | None = None  # default: 25 % / 45 % / 30 % of steps
    batch_size: int = 4
    seq_len: int = 256
    num_samples: int = 256  # training windows; fewer over-fit (64 gave train KL 0.64 vs 1.22 held out)
    whiten_samples: int | None = 64  # the first windows, for XᵀX of the whitened basis (None: all)
    lr_scores: float = 5e-3
    lr_bias: float = 1e-3
    # Forward the hard cut at the step's budget, gradients through the soft gate (straight-through):
    # "all" stages, "stage3" only, or "off" (train the soft-gated model throughout).
    straight_through: str = "all"
    blockwise: bool = False  # one decoder block at a time against the dense block (blockwise.py); steps per block
    temperature: float = 0.3  # gate temperature (in log-importance units) in stages 1-2
    final_temperature: float = 0.02  # reached at the end of stage 3
    alternate_every: int = 4  # stage 2: steps per half-swing of the budget
    alternate_amplitude: float = 0.05  # stage 2: relative budget swing at its start
    size_weight: float = 10.0  # λ_c: two-sided quadratic on (soft ratio − scheduled ratio)
    polarize_weight: float = 0.5  # λ_p: Σh(1−h) penalty, ramped in over stage 3
    sparsity_weight: float = 0.01  # λ_s: L1 on the scores of gated-off components in stage 3

    @property
    def adds_bias(self) -> bool:
        return self.deviation

    @property
    def needs(self) -> frozenset[str]:
        """Training windows always; XᵀX for the whitened basis."""
        return frozenset({"windows", "xtx"} if self.basis == "whitened" else {"windows"})

    def calibration(self, source: str = "bundled", seed: int = 0, num_samples: int | None = None,
                    seq_len: int | None = None, batch_size: int | None = None) -> CalibrationConfig:
        """SoCo trains on its own windows: `num_samples` of `seq_len` tokens, drawn with its seed."""
        return CalibrationConfig(source, self.num_samples, self.seq_len, self.seed, self.batch_size)

    def stages(self) -> list[int]:
        if self.stage_steps is not None:
            return list(self.stage_steps)
        s1, s2 = round(0.25 * self.steps), round(0.45 * self.steps)
        return [s1, s2, self.steps - s1 - s2]

    def validate(self) -> None:
        super().validate()  # every field's type and range first: the checks below compare valid numbers
        st = self.stages()
        if len(st) != 3 or any(s < 0 for s in st) or sum(st) != self.steps:
            raise SocoError(f"stage_steps {st} must be three non-negative lengths adding up to steps={self.steps}")
        if self.final_temperature > self.temperature:
            raise SocoError(f"final_temperature ({self.final_temperature}) must be <= temperature "
                            f"({self.temperature}): stage 3 anneals the gates from one to the other")

    def heal_defaults(self) -> dict:
        # Healing is part of SoCo's recipe, by measurement (benchmarks/results/heal/): 60 steps at lr 3e-5
        # lowered the perplexity of both held-out texts at 0.2, 0.4 and 0.6, where lr 1e-4 raised PubMedQA's
        # at 0.4 (SoCo's cut is already near the dense model: a large step over-fits the calibration text).
        # A block-wise run is for models whose whole-model training does not fit, and caches no teacher: off.
        # So is a --quick run (its settings are the preset's): a short run asked for, `soco export` of one too.
        quick = self.preset == "quick" or all(getattr(self, k) == v for k, v in self.presets["quick"].items())
        return {} if self.blockwise or quick else {"steps": 60, "lr": 3e-5}

    def teacher_windows(self) -> tuple[int, int, int, int] | None:
        """A whole-model run caches the teacher of its training windows; a block-wise run needs none."""
        return None if self.blockwise else super().teacher_windows()

    def block_sequential_refusal(self) -> str | None:
        return None if self.blockwise else "whole-model SoCo needs the whole model; add --set blockwise=true"

    @classmethod
    def recut_refusal(cls, meta: dict) -> str | None:
        if meta["config"].get("blockwise") is True:
            return ("it is a blockwise run: its blocks were cut one by one at the trained ratio, so it cannot be cut "
                    "at another; train a whole-model run (blockwise=false) for that")
        return None
