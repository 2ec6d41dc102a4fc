"""What a method is: a config dataclass plus the handler registered for its type.

`register(config_cls, handler)` is the one registry: `compress()` finds the handler by
`type(config)` (as torchao's `quantize_` does), `config_for` and the CLI find config classes by
their `method` name. Adding a method is one config class and one handler, registered once.
A config declares what calibration it `needs`, its calibration sizes (`calibration`), named
`presets` of its own fields and the fields the CLI offers as options (`cli_options`), its recipe's
healing (`heal_defaults`), the teacher its run caches (`teacher_windows`) and whether it runs block
by block from disk (`block_sequential_refusal`). Learned methods subclass
`learned.config.LearnedConfig`, which adds the run folder and the re-cut.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Callable, ClassVar

import torch
from torch import nn

from ..checks import SEED, Rule, at_least, between, check_fields
from ..core.adapter import Target
from ..core.budget import LayerRank
from ..core.teacher import Teacher
from ..errors import SocoError


@dataclass
class CalibrationConfig:
    """Where calibration text comes from and how it is cut into token windows."""

    source: str = "bundled"  # "bundled", "wikitext2", "c4", "ptb", or a path to a text file
    num_samples: int = 32
    seq_len: int = 512
    seed: int = 0
    batch_size: int = 8

    # A window holds at least one prediction (two tokens). Methods that take these settings as their own
    # fields (SoCo) reuse these rules, and so do the CLI options that fill them.
    rules: ClassVar[dict[str, Rule]] = {"num_samples": at_least(1), "seq_len": at_least(2), "seed": SEED,
                                        "batch_size": at_least(1)}

    def validate(self) -> None:
        check_fields(self, "calibration ")


@dataclass
class CompressionConfig:
    """Settings every method shares. `ratio` is the fraction of decoder-linear parameters removed."""

    method: ClassVar[str] = ""
    presets: ClassVar[dict[str, dict]] = {}  # named sets of field values, e.g. SoCo's "quick"
    # Fields `soco compress` offers as options of their own (--field-name VALUE), with their help text; any
    # field is also reachable with --set. The parser collects these from every registered config.
    cli_options: ClassVar[dict[str, str]] = {}
    # Ranges or choices of fields, beside the types their annotations give (checks.py); a subclass adds its own.
    rules: ClassVar[dict[str, Rule]] = {
        "ratio": between(0, 1, low_open=True, high_open=True, note="the fraction of parameters removed"),
        "rank_multiple": at_least(1)}

    ratio: float = 0.4
    # Module-name patterns (suffix or regex) inside the decoder blocks; None = every linear.
    target_modules: list[str] | None = None
    exclude_modules: list[str] | None = None
    # Feed each block the outputs of the already-compressed earlier blocks.
    sequential: bool = False
    # Ranks rounded to a multiple of this (tensor-core-friendly shapes); the budget is still never exceeded.
    # 1 (no rounding) is the default on every device: on the CPU, ranks padded to 16 decoded no faster
    # (session 3); the GPU default waits for a measurement on a GPU (none lent yet): try 8 or 64 there.
    rank_multiple: int = 1
    # The named preset the settings started from (`config_for`), which a method's recipe may read: SoCo's
    # "quick" run does not heal, whatever single value of it is changed.
    preset: str | None = None

    @property
    def needs(self) -> frozenset[str]:
        """What the method reads from calibration windows: "windows" (the tokens themselves) and/or the
        statistics "xtx", "abs_mean", "fisher". Empty: data-free."""
        return frozenset({"windows"}) if self.sequential else frozenset()

    def heal_defaults(self) -> dict:
        """The recipe's last stage: the healing settings (HealConfig fields) this method gets where the user gives
        none, in `compress()` and in the CLI alike. Default none, so no healing: the method's paper result is
        what it is without it."""
        return {}

    def teacher_windows(self) -> tuple[int, int, int, int] | None:
        """(windows, window length, seed, top-k) of the dense teacher this method's run caches and hands back in
        `MethodResult.teacher`; None: it caches none (healing then computes its own before the cut)."""
        return None

    def block_sequential_refusal(self) -> str | None:
        """Why this config cannot run in the block-sequential pipeline (blocks read one at a time from disk,
        `core/streamed.py`); None: it can (its handler walks the blocks with `BlockRunner`, one at a time)."""
        return f"{self.method} is not run block by block in this version"

    def calibration(self, source: str = "bundled", seed: int = 0, num_samples: int | None = None,
                    seq_len: int | None = None, batch_size: int | None = None) -> CalibrationConfig:
        """The calibration windows this config wants: the sizes given, else 32 windows of 512 in batches of 8."""
        d = CalibrationConfig()
        return CalibrationConfig(source, d.num_samples if num_samples is None else num_samples,
                                 d.seq_len if seq_len is None else seq_len, seed,
                                 d.batch_size if batch_size is None else batch_size)

    def validate(self) -> None:
        """Every field's type and range (cheap: runs before any model is loaded); subclasses add cross-field checks."""
        check_fields(self, f"{self.method} setting " if self.method else "")
        if self.preset is not None and self.preset not in self.presets:
            raise SocoError(f"{self.method or 'this method'} has no preset {self.preset!r}"
                            + (f"; presets: {', '.join(sorted(self.presets))}" if self.presets else ""))
        for field in ("target_modules", "exclude_modules"):
            for pattern in getattr(self, field) or []:
                try:
                    re.compile(pattern)
                except re.error as e:
                    raise SocoError(f"{field} pattern {pattern!r} is not a valid regular expression ({e}); "
                                    "give a module name such as q_proj or a regex such as 'mlp\\..*'") from None

    def preflight(self) -> None:
        """Checks of the files this config will use (SoCo: its run folder): read-only and cheap, so the CLI
        runs them before loading anything. Nothing to check for a method without files of its own."""

    @property
    def adds_bias(self) -> bool:
        """Whether a compressed layer gets a bias of its own (it counts in the budget, `budget.bias_cost`)."""
        return False

    def to_dict(self) -> dict:
        return {"method": self.method, **dataclasses.asdict(self)}


@dataclass
class MethodResult:
    """What a handler hands back to `compress()`: the ranks it cut to, the config as recorded, extra tensors, and
    the dense teacher it trained against (with its windows), which healing reuses."""

    rows: list[LayerRank]
    config: dict
    tensors: dict[str, dict[str, torch.Tensor]] = dataclasses.field(default_factory=dict)
    teacher: Teacher | None = None


# handler(model, config, targets, calibration windows or None, calibration config) -> MethodResult
Handler = Callable[[nn.Module, CompressionConfig, list[Target], "torch.Tensor | None", CalibrationConfig],
                   MethodResult]

METHODS: dict[str, type[CompressionConfig]] = {}
_HANDLERS: dict[type[CompressionConfig], Handler] = {}


def register(config_cls: type[CompressionConfig], handler: Handler) -> None:
    """Make a method known: `compress()` runs `handler` for configs of this type, `config_for` finds it by name."""
    METHODS[config_cls.method] = config_cls
    _HANDLERS[config_cls] = handler


def handler_for(config: CompressionConfig) -> Handler:
    for cls in type(config).__mro__:  # a subclass of a registered config inherits its handler
        if cls in _HANDLERS:
            return _HANDLERS[cls]
    raise SocoError(f"no handler registered for {type(config).__name__}; call soco_llm.methods.register first")


def config_for(method: str, preset: str | None = None, /, **kwargs) -> CompressionConfig:
    """Build and validate the config of a method by name, e.g. config_for("svd-llm", ratio=0.4).

    `preset`: one of the config class's named presets; explicit settings override it, and the config records
    its name (the field `preset`).
    """
    if method not in METHODS:
        raise SocoError(f"unknown method {method!r}; choose one of: {', '.join(sorted(METHODS))}")
    cls = METHODS[method]
    if preset is not None:
        if preset not in cls.presets:
            raise SocoError(f"method {method!r} has no preset {preset!r}"
                            + (f"; presets: {', '.join(sorted(cls.presets))}" if cls.presets else ""))
        kwargs = {**cls.presets[preset], "preset": preset, **kwargs}
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(kwargs) - known
    if unknown:
        raise SocoError(f"method {method!r} has no setting(s) {sorted(unknown)}; known: {sorted(known)}")
    cfg = cls(**kwargs)
    cfg.validate()
    return cfg


def config_from_dict(d: dict) -> CompressionConfig:
    d = dict(d)
    return config_for(d.pop("method", ""), **d)
