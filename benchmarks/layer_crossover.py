"""One linear layer three ways: dense W·x, factored B·(A·x), merged (B·A)·x, across token counts.

    python benchmarks/layer_crossover.py                       # SmolLM2-135M shapes, ratio 0.4
    python benchmarks/layer_crossover.py --threads 2 --markdown benchmarks/results/layer_crossover_cpu.md

The merged form rebuilds B·A on every call, as `LowRankLinear` does when `merge_min_tokens`
is set; the table says which form is fastest at each token count (see soco_llm/core/layer.py).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the harness beside this file, however it is loaded
from harness.environment import hardware_info  # noqa: E402
from harness.outputs import emit  # noqa: E402
from harness.tables import crossover_table  # noqa: E402
from harness.timing import layer_crossover, layer_timing_options  # noqa: E402

# (out, in) of SmolLM2-135M's decoder linears: q/o, k/v, gate/up, down
DEFAULT_SHAPES = ["576x576", "192x576", "1536x576", "576x1536"]


def _shape(text: str) -> tuple[int, int]:
    try:
        m, n = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"shape must look like OUTxIN, e.g. 576x1536; got {text!r}") from None
    return m, n


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", type=_shape, nargs="+", default=[_shape(s) for s in DEFAULT_SHAPES])
    layer_timing_options(p, tokens=[1, 8, 32, 128, 512, 2048], min_run_time=0.2)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    hw = hardware_info("cpu")
    rows = layer_crossover(args.shapes, args.ratio, args.tokens, args.threads, args.min_run_time)
    text = (crossover_table(rows) + f"\nfloat32, batch 1, ratio {args.ratio} (uniform rank), median µs per call "
            f"(torch.utils.benchmark). {hw['cpu']}, torch {hw['torch']}, {torch.get_num_threads()} thread(s), "
            f"1-min load average {hw.get('load_average_1min')}.\n")
    emit(text, args.markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
