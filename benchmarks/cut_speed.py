"""SoCo's per-step host work at public model shapes: the global cut and the threshold solve, timed
against the original Python loop in the same run, with the kept sets compared.

    python benchmarks/cut_speed.py                                   # every shape, ratio 0.4, CPU
    python benchmarks/cut_speed.py --markdown benchmarks/results/cut_speed_cpu.md --json benchmarks/results/cut_speed_cpu.json

Importances are random (log-normal) over the capped bases SoCo trains (max useful rank per layer,
d counted); the work depends on the shapes only. Times are medians of --repeats runs after one warm-up.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the harness beside this file, however it is loaded
from harness.environment import environment  # noqa: E402
from harness.outputs import emit  # noqa: E402
from harness.reference_cut import kept_indices, reference_cut  # noqa: E402
from harness.shapes import SHAPES, linear_shapes  # noqa: E402

from soco_llm.core.budget import budget_params, global_cut, max_useful_rank  # noqa: E402


def _median_ms(fn, repeats: int, device: torch.device) -> float:
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def measure(shape: str, ratio: float, repeats: int, device: torch.device, seed: int = 0) -> dict:
    shapes = linear_shapes(shape)
    g = torch.Generator().manual_seed(seed)
    importance = {k: torch.exp(torch.randn(max(max_useful_rank(m, n, True), 1), generator=g)).to(device)
                  for k, (m, n) in shapes.items()}
    budget = budget_params(sum(m * n for m, n in shapes.values()), ratio)
    loop_ms = _median_ms(lambda: reference_cut(importance, shapes, budget, True), max(1, repeats // 3), device)
    vec_ms = _median_ms(lambda: global_cut(importance, shapes, budget, True), repeats, device)
    same = kept_indices(global_cut(importance, shapes, budget, True)) == reference_cut(importance, shapes, budget, True)
    return {"shape": shape, "layers": len(shapes), "components": sum(t.numel() for t in importance.values()),
            "ratio": ratio, "loop_ms": loop_ms, "vectorised_ms": vec_ms, "speedup": loop_ms / vec_ms,
            "identical": same}


def markdown(rows: list[dict], env: dict) -> str:
    lines = ["# SoCo's global cut: vectorised against the original loop", "",
             f"Measured {env['date']} on {env['cpu']} (torch threads {env['torch_threads']}, "
             f"device {env['device']}); command: `{env['command']}`.", "",
             "| shape | layers | components | loop (ms) | vectorised (ms) | speed-up | identical kept sets |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['shape']} | {r['layers']} | {r['components']:,} | {r['loop_ms']:.1f} | "
                     f"{r['vectorised_ms']:.1f} | {r['speedup']:.1f}× | {'yes' if r['identical'] else 'NO'} |")
    lines += ["", "Capped bases (the largest rank a layer could keep, d counted), random log-normal importances, "
              f"ratio {rows[0]['ratio']}; medians (the loop: a third as many repeats)."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--ratio", type=float, default=0.4)
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--markdown", default=None)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    rows = [measure(s, args.ratio, args.repeats, device) for s in args.shapes]
    env = environment(__file__, argv, device=args.device)
    emit(markdown(rows, env), args.markdown, args.json, {"rows": rows, "environment": env})
    return 0 if all(r["identical"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
