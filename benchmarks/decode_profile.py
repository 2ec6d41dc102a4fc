"""Where a decode step's time goes, dense vs compressed: linears, attention, the rest (torch.profiler).

    python benchmarks/decode_profile.py --ratio 0.4 --threads 1
    python benchmarks/decode_profile.py --ratio 0.4 --threads 1 --fast     # the compiled decode step
    python benchmarks/decode_profile.py --model shape:smollm2-360m --ratio 0.4 --markdown out.md

speed.py says how much faster a compressed model decodes; this says why it is not faster still.
Each model runs greedy `generate` with N and with 1 new tokens under torch.profiler, and the two
are subtracted, so the per-token figures count decode steps only (as speed.py does). Op self
times are grouped: the linears' matrix products (aten::mm / addmm, LM head included), attention,
concatenation (KV cache and RoPE), other tensor ops, and the time outside any op (Python,
dispatch, profiler overhead). The compressed model is SVD at --ratio (shapes set the speed, not
the method). The whole step is also timed without the profiler, which adds a little to every op.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
from pathlib import Path

from soco_llm.errors import SocoError

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the harness beside this file, however it is loaded
from harness.environment import command_line, hardware_info, load_average_1min, utc_now  # noqa: E402
from harness.outputs import emit  # noqa: E402
from harness.rss import MiB, tune_malloc  # noqa: E402
from harness.shapes import SHAPES, load_models  # noqa: E402
from harness.sizes import decode_limit, weight_stats  # noqa: E402
from harness.timing import BenchSettings, time_once, workloads  # noqa: E402

GROUPS = {  # group -> op-name prefixes; the first match wins
    "linears (mm, addmm)": ("aten::mm", "aten::addmm"),
    "attention": ("aten::_scaled_dot_product", "aten::scaled_dot_product", "aten::bmm", "aten::baddbmm",
                  "aten::_softmax"),
    "concatenation (KV cache, RoPE)": ("aten::cat",),
    # --fast: inductor's fused C++ kernels and the Python wrapper that calls them and the extern matmuls
    "compiled graph (fused kernels, wrapper)": ("## Call CompiledFxGraph", "Torch-Compiled Region",
                                                "Pregraph bytecode"),
    "Dynamo guard checks": ("TorchDynamo Cache Lookup",),
}
OTHER, OUTSIDE, STEP = "other tensor ops", "outside ops (Python, dispatch, profiler)", "whole step, profiled"


def group_of(op: str) -> str:
    return next((g for g, prefixes in GROUPS.items() if op.startswith(prefixes)), OTHER)


def profile_ms(fn, calls: dict[str, int] | None = None) -> dict[str, float]:
    """Milliseconds per group for one call of `fn`, from op self times; the rest of the wall time is OUTSIDE.
    `calls`, where given, adds up how many ops of each group ran: what ran, which no load on the machine changes."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        fn()
        wall = 1e3 * (time.perf_counter() - start)
    out = dict.fromkeys([*GROUPS, OTHER], 0.0)
    for event in prof.key_averages():
        out[group_of(event.key)] += event.self_cpu_time_total / 1e3
        if calls is not None:
            calls[group_of(event.key)] = calls.get(group_of(event.key), 0) + event.count
    out[OUTSIDE] = wall - sum(out.values())
    out[STEP] = wall
    return out


def per_token(model, pad: int | None, settings: BenchSettings, calls: dict[str, int] | None = None
              ) -> dict[str, float]:
    """Median over repeats of (profile(generate N) - profile(generate 1)) / (N - 1), per group, plus unprofiled time.
    `calls`: the ops of each group that the profiled N-token runs called (see `profile_ms`)."""
    import torch

    work = workloads(model, settings, pad)
    many_fn, one_fn = work["generate@N"], work["generate@1"]
    device = next(model.parameters()).device
    n = settings.new_tokens
    with torch.no_grad():
        for _ in range(settings.warmup):
            many_fn()
            one_fn()
        profiled, timed = [], []
        for _ in range(settings.repeats):
            many, one = profile_ms(many_fn, calls), profile_ms(one_fn)
            profiled.append({k: (many[k] - one[k]) / (n - 1) for k in many})
            wall_many, wall_one = time_once(many_fn, device)[0], time_once(one_fn, device)[0]
            timed.append(1e3 * (wall_many - wall_one) / (n - 1))
    out = {k: statistics.median(p[k] for p in profiled) for k in profiled[0]}
    out["whole step, not profiled"] = statistics.median(timed)
    return out


def summary(dense: dict, comp: dict, limit: float) -> dict[str, float]:
    """The measured speed-up against what the linears alone and the bandwidth limit would give."""
    lin = next(iter(GROUPS))
    return {
        "measured (not profiled)": dense["whole step, not profiled"] / comp["whole step, not profiled"],
        "measured (profiled)": dense[STEP] / comp[STEP],
        "linears alone": dense[lin] / comp[lin],
        "weight-bandwidth limit": limit,
        # the compressed step with its linears as bandwidth-efficient as the dense ones
        "with the factors at dense bandwidth": dense[STEP] / (comp[STEP] - comp[lin] + dense[lin] / limit),
        "rest of the step, share of dense": (dense[STEP] - dense[lin]) / dense[STEP],
    }


def markdown(rows: dict, labels: list[str], stats: dict, facts: dict, command: str, date: str) -> str:
    d, c = labels
    lines = [f"| ms per decoded token | {d} | {c} | {d} / {c} |", "|---|---:|---:|---:|"]
    for key in rows[d]:
        lines.append(f"| {key} | {rows[d][key]:.2f} | {rows[c][key]:.2f} | "
                     f"{rows[d][key] / rows[c][key] if rows[c][key] > 0 else float('nan'):.2f} |")
    lines.append(f"| weights read per token, MiB | {facts['mib'][0]:.1f} | {facts['mib'][1]:.1f} | "
                 f"{facts['mib'][0] / facts['mib'][1]:.2f} |")
    lines.append(f"| linears' bandwidth, GB/s | {facts['gbs'][0]:.1f} | {facts['gbs'][1]:.1f} | "
                 f"{facts['gbs'][0] / facts['gbs'][1]:.2f} |")
    lines += ["", f"| decode speed-up of {c} | × |", "|---|---:|"]
    lines += [f"| {k} | {v:.0%} |" if k.startswith("rest") else f"| {k} | {v:.2f} |" for k, v in stats.items()]
    hw = facts["hardware"]
    lines += ["", f"Model: {facts['model']}. Hardware: {hw['cpu']}, {hw['usable_cpus']} usable CPUs, torch "
              f"{hw['torch']} with {facts['threads']} thread(s), transformers {hw.get('transformers')}; 1-min load "
              f"average {hw.get('load_average_1min')} at start, {facts['load_end']} at end.",
              f"Greedy `generate`{' on the fast path (static KV cache, compiled decode step)' if facts.get('fast') else ''}"
              f" after a {facts['prompt']}-token prompt; per token = (N={facts['new_tokens']} new "
              f"tokens − 1 new token) / (N−1), median of {facts['repeats']}. Groups are op self times; *outside ops* "
              "is wall time not inside any aten op. *weight-bandwidth limit*: dense / compressed weights read per "
              "token (LM head included, embedding lookup not). *with the factors at dense bandwidth*: the profiled "
              "speed-up if the compressed model's linears read their weights as fast (GB/s) as the dense ones.",
              "", f"Command: `{command}` ({date}).", ""]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help=f"dense model: folder, .gguf, hub id or shape:NAME ({', '.join(SHAPES)})")
    p.add_argument("--ratio", type=float, default=0.4, help="SVD ratio of the compressed model (default 0.4)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--decode-prompt", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=33)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--fast", action="store_true", help="profile the fast path (soco_llm.fast_inference: static KV "
                   "cache, compiled decode step) for both models; the warm-up pays for compilation")
    p.add_argument("--json", default=None, help="write the numbers here (atomically)")
    p.add_argument("--markdown", default=None, help="write the tables here (atomically)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        import torch

        if not 0 < args.ratio < 1 or args.new_tokens < 2 or args.repeats < 1:
            raise SocoError("--ratio must be in (0, 1), --new-tokens >= 2 and --repeats >= 1")
        torch.set_num_threads(args.threads)
        tune_malloc()
        settings = BenchSettings([1], args.decode_prompt, args.new_tokens, 1, args.repeats, "cpu", args.threads,
                                 fast=args.fast)
        hardware = hardware_info("cpu")
        loaded = load_models(args.model, [args.ratio], [], settings)
        if args.fast:
            from soco_llm.inference import fast_inference

            for _, model, _ in loaded:
                fast_inference(model)
        labels = [info["label"] for info, _, _ in loaded]
        calls = {info["label"]: {} for info, _, _ in loaded}
        rows = {info["label"]: per_token(model, pad, settings, calls[info["label"]]) for info, model, pad in loaded}
    except SocoError as e:
        print(f"decode_profile.py: error: {e}", file=sys.stderr)
        return 2
    wstats = [weight_stats(model) for _, model, _ in loaded]
    elem = next(loaded[0][1].parameters()).element_size()
    lin = next(iter(GROUPS))
    facts = {
        "model": args.model or "default (bundled SmolLM2-135M-Instruct)", "hardware": hardware,
        "threads": torch.get_num_threads(), "prompt": args.decode_prompt, "new_tokens": args.new_tokens,
        "repeats": args.repeats, "load_end": load_average_1min(), "fast": args.fast,
        "mib": [w["decode_params"] * elem / MiB for w in wstats],
        "gbs": [w["decode_params"] * elem / (rows[label][lin] / 1e3) / 1e9 for w, label in zip(wstats, labels)],
    }
    stats = summary(rows[labels[0]], rows[labels[1]], decode_limit(*wstats))
    command = command_line(__file__, argv)
    date = utc_now()
    emit(markdown(rows, labels, stats, facts, command, date), args.markdown, args.json,
         {"rows": rows, "calls": calls, "summary": stats, "facts": facts, "command": command, "date": date})
    return 0


if __name__ == "__main__":
    sys.exit(main())
