"""Run by tests/test_soco_ddp.py under torchrun: a tiny SoCo run whose scores are saved by rank 0."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

import soco_llm  # noqa: E402
from soco_llm import SoCoConfig  # noqa: E402
from soco_llm.runtime import init_distributed  # noqa: E402
from tiny import random_windows, tiny_model  # noqa: E402

torch.set_num_threads(1)
run_dir = sys.argv[1]
model = tiny_model("llama")
init_distributed()  # the caller sets the distributed context, as the CLI does
cfg = SoCoConfig(ratio=0.4, steps=8, batch_size=4, checkpoint_every=100, run_dir=run_dir)
soco_llm.compress(model, cfg, random_windows(12, 32), heal_config=soco_llm.HealConfig())
