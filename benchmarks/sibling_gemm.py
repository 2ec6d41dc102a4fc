"""Sibling layers that read the same input (q/k/v; gate/up), factored: one GEMM for their A factors or one each.

    python benchmarks/sibling_gemm.py --threads 1 --markdown benchmarks/results/sibling_gemm_cpu.md

A candidate for the fast inference path (issue 13): concatenating the siblings' A factors turns their first
products into one call. The table times, per group and token count, the dense layers, the factored layers
one call each (what `LowRankLinear` runs) and the factored layers with one call for the A factors; the library
takes the candidate only if it is faster. SmolLM2-135M's shapes at the uniform rank of --ratio.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the harness beside this file, however it is loaded
from harness.environment import command_line, hardware_info  # noqa: E402
from harness.outputs import emit  # noqa: E402
from harness.timing import layer_timing_options, median_seconds  # noqa: E402
from soco_llm.core.budget import uniform_rank  # noqa: E402

# group: (out, in) of each sibling, all reading the same input (SmolLM2-135M)
GROUPS = {"q/k/v": [(576, 576), (192, 576), (192, 576)], "gate/up": [(1536, 576), (1536, 576)]}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    layer_timing_options(p, tokens=[1, 8, 128], min_run_time=0.5)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    lines = ["| group | tokens | dense µs | factored, one call each µs | one call for the A factors µs | "
             "one call / each |", "|---|---:|---:|---:|---:|---:|"]
    for name, shapes in GROUPS.items():
        ranks = [uniform_rank(m, n, args.ratio) for m, n in shapes]
        factors = [(torch.randn(r, n, generator=g), torch.randn(m, r, generator=g)) for (m, n), r in zip(shapes, ranks)]
        dense = [b @ a for a, b in factors]
        stacked = torch.cat([a for a, _ in factors])
        for tokens in args.tokens:
            x = torch.randn(1, tokens, shapes[0][1], generator=g)
            times = [1e6 * median_seconds("fn()", {"fn": fn}, args.min_run_time) for fn in (
                lambda: [F.linear(x, w) for w in dense],
                lambda: [F.linear(F.linear(x, a), b) for a, b in factors],
                lambda: [F.linear(h, b) for h, (_, b) in zip(F.linear(x, stacked).split(ranks, -1), factors)])]
            lines.append(f"| {name} (ranks {'/'.join(map(str, ranks))}) | {tokens} | {times[0]:.1f} | {times[1]:.1f} "
                         f"| {times[2]:.1f} | {times[2] / times[1]:.2f} |")
    hw = hardware_info("cpu")
    lines += ["", f"float32, batch 1, median µs per group (torch.utils.benchmark). {hw['cpu']}, torch {hw['torch']}, "
              f"{torch.get_num_threads()} thread(s), 1-min load average {hw.get('load_average_1min')}. "
              f"Command: `{command_line(__file__, argv)}`"]
    emit("\n".join(lines) + "\n", args.markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
