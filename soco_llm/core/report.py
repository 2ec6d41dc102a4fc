"""What a compression did: `CompressionReport` (ratios, ranks per layer, sizes, time, config)."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field

from torch import nn

from .budget import RATIO_DEFINITION, LayerRank, achieved_ratio, rank_table

log = logging.getLogger(__name__)


def model_params(model: nn.Module) -> int:
    """Unique parameters of the whole model (tied embeddings counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


@dataclass
class CompressionReport:
    method: str
    target_ratio: float
    achieved_ratio: float
    layers: list[dict]
    model_params_before: int
    model_params_after: int
    seconds: float
    config: dict = field(default_factory=dict)
    ratio_definition: str = RATIO_DEFINITION
    # Tensors to save beside the model, e.g. SoCo's trained scores; not part of to_dict().
    tensors: dict = field(default_factory=dict, repr=False)

    @classmethod
    def of(cls, method: str, ratio: float, rows: list[LayerRank], before: int, model: nn.Module, seconds: float,
           config: dict) -> "CompressionReport":
        """The report of `model` after it was cut to `rows` (its params counted now)."""
        return cls(method=method, target_ratio=ratio, achieved_ratio=achieved_ratio(rows), layers=rank_table(rows),
                   model_params_before=before, model_params_after=model_params(model), seconds=seconds,
                   config=config)

    @property
    def ranks(self) -> dict[str, int]:
        return {row["name"]: row["rank"] for row in self.layers}

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "tensors"}

    def summary(self) -> str:
        dense = sum(1 for r in self.layers if r["rank"] == 0)
        return (f"{self.method}: target ratio {self.target_ratio:.3f}, achieved {self.achieved_ratio:.4f} "
                f"over {len(self.layers)} decoder linears ({dense} left dense); whole model "
                f"{self.model_params_before / 1e6:.2f}M -> {self.model_params_after / 1e6:.2f}M params")
