"""SoCo: learn the singular spectrum, prune by learned scores, compensate. Our reconstruction.

This package owns what is SoCo's own; the parts any learned method shares are in `soco_llm/learned/`
(the spectral layer, the size model, the cut and re-cut, the run folder) and `core/trainer.py`.

1. Decompose every target linear once (plain or whitened basis, `basis.py`) into a SpectralLinear
   with a score per component (start 1 = keep all) and a deviation d (start 0).
2. Train scores and deviations (`train.py`) by KL to the dense model's next-token distribution
   (cached top-k teacher log-probs, `core/teacher.py`), under a scheduled parameter budget met
   every step by a global gate threshold (`schedule.py`):
     stage 1  rapid compression: the budget falls from "keep all" to the target;
     stage 2  alternating refinement: the budget swings around the target (pressure, then
              recovery) with shrinking amplitude while scores re-rank;
     stage 3  decisive sparsification: the gate temperature anneals and a polarisation term
              drives every gate to 0 or 1, so the hard cut changes the model little.
3. Cut globally by learned importance until the exact budget is met, fold √(σ·s) into both
   factors and d into the bias (`learned/cut.py`): an ordinary LowRankLinear model.
4. Heal (the recipe's last stage, `SoCoConfig.heal_defaults`, run by `compress()` and the CLI alike).

Whole-model (`whole_model.py`) or one block at a time (`blockwise.py`), picked by the handler (`handler.py`).
"""

from ..base import register
from .config import SoCoConfig
from .handler import compress_soco

register(SoCoConfig, compress_soco)

__all__ = ["SoCoConfig", "compress_soco"]
