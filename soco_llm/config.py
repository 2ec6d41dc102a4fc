"""Typed, serialisable configs: one dataclass per compression method, one for calibration data."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import ClassVar

from .errors import SocoError


@dataclass
class CalibrationConfig:
    """Where calibration text comes from and how it is cut into token windows."""

    source: str = "bundled"  # "bundled", "wikitext2", "c4", "ptb", or a path to a text file
    num_samples: int = 32
    seq_len: int = 512
    seed: int = 0
    batch_size: int = 8

    def validate(self) -> None:
        if self.num_samples < 1 or self.seq_len < 2 or self.batch_size < 1:
            raise SocoError(
                f"calibration needs num_samples >= 1, seq_len >= 2 and batch_size >= 1 "
                f"(got {self.num_samples}, {self.seq_len}, {self.batch_size})"
            )


@dataclass
class CompressionConfig:
    """Settings every method shares. `ratio` is the fraction of decoder-linear parameters removed."""

    method: ClassVar[str] = ""
    needs: ClassVar[frozenset[str]] = frozenset()  # calibration statistics: "xtx", "abs_mean", "fisher"

    ratio: float = 0.4
    # Module-name patterns (suffix or regex) inside the decoder blocks; None = every linear.
    target_modules: list[str] | None = None
    exclude_modules: list[str] | None = None
    # Feed each block the outputs of the already-compressed earlier blocks.
    sequential: bool = False

    def validate(self) -> None:
        if not isinstance(self.ratio, (int, float)) or not math.isfinite(self.ratio) or not 0 < self.ratio < 1:
            raise SocoError(f"ratio must be in (0, 1), the fraction of parameters removed; got {self.ratio}")

    def to_dict(self) -> dict:
        return {"method": self.method, **dataclasses.asdict(self)}


@dataclass
class SVDConfig(CompressionConfig):
    """Truncated SVD of W at the uniform rank."""

    method: ClassVar[str] = "svd"


@dataclass
class FWSVDConfig(CompressionConfig):
    """Fisher-weighted SVD: rows weighted by summed squared LM-loss gradients."""

    method: ClassVar[str] = "fwsvd"
    needs: ClassVar[frozenset[str]] = frozenset({"fisher"})


@dataclass
class ASVDConfig(CompressionConfig):
    """Activation-aware SVD: input channels scaled by (mean |x|)^alpha."""

    method: ClassVar[str] = "asvd"
    needs: ClassVar[frozenset[str]] = frozenset({"abs_mean"})
    alpha: float = 0.5


@dataclass
class SVDLLMConfig(CompressionConfig):
    """Truncation-aware whitening (SVD-LLM): SVD of W·L with L Lᵀ = XᵀX."""

    method: ClassVar[str] = "svd-llm"
    needs: ClassVar[frozenset[str]] = frozenset({"xtx"})
    # Relative jitter added to XᵀX's diagonal when Cholesky fails; grows 10x per retry.
    jitter: float = 1e-6
    max_jitter_tries: int = 5


METHODS: dict[str, type[CompressionConfig]] = {c.method: c for c in (SVDConfig, FWSVDConfig, ASVDConfig, SVDLLMConfig)}


def register_method(cls: type[CompressionConfig]) -> type[CompressionConfig]:
    """Make a config class (and so its method) known to `config_for` and the CLI."""
    METHODS[cls.method] = cls
    return cls


def config_for(method: str, **kwargs) -> CompressionConfig:
    """Build the config of a method by name, e.g. config_for("svd-llm", ratio=0.4)."""
    if method not in METHODS:
        raise SocoError(f"unknown method {method!r}; choose one of: {', '.join(sorted(METHODS))}")
    known = {f.name for f in dataclasses.fields(METHODS[method])}
    unknown = set(kwargs) - known
    if unknown:
        raise SocoError(f"method {method!r} has no setting(s) {sorted(unknown)}; known: {sorted(known)}")
    cfg = METHODS[method](**kwargs)
    cfg.validate()
    return cfg


def config_from_dict(d: dict) -> CompressionConfig:
    d = dict(d)
    return config_for(d.pop("method", ""), **d)
