"""SoCo's training step: seconds a step at the default settings (4 x 256 tokens), for variants of the step
measured side by side in one process.

    python benchmarks/train_step.py --steps 8 --repeats 3 --markdown benchmarks/results/train_step_cpu.md

Variants (`--variants`): `library` (today's step: the output head's KL made chunk by chunk,
`core.head.ChunkedHeadLoss`, and on the CPU the hard cut multiplies only the kept components,
`SpectralLinear.kept_product`), `whole-logits` (the same with the head's logits made for the whole batch at
once, the step before the chunked head), `full-product` (whole logits and the full masked product over every
component, as the library ran before the kept-only product; still the product on GPUs) and `logsumexp-kl`
(whole logits with a candidate distillation KL, `harness.candidate_kl`, measured and not adopted).

The default model with SoCo's layers installed over a plain basis: the same shapes as the whitened one
(capped at the largest useful rank), so the same step cost, without the calibration pass. The variants
run interleaved (A B A B ...), each a fresh `train_scores` of --steps steps from the same start (the
default schedule's three stages scaled to --steps, so the kept share of components is as in a full run);
the table gives the median seconds a step and the ratio to the first variant, with the KL each reaches
(they must agree to float noise). One warm-up run of each variant comes first.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the harness beside this file
from harness.environment import command_line, hardware_info, utc_now  # noqa: E402
from harness.outputs import emit  # noqa: E402
from harness.candidate_kl import logsumexp_kl  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="default: the bundled SmolLM2-135M-Instruct")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, help="the model's dtype (default: the checkpoint's), e.g. bfloat16")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--markdown", type=Path, default=None)
    p.add_argument("--host-memory", choices=["kept", "default"], default="default",
                   help="kept: freed host memory kept for reuse, as `SOCO_KEEP_HOST_MEMORY=1 soco ...` does "
                        "(soco_llm.runtime.keep_freed_host_memory); default: glibc's own settings (default)")
    p.add_argument("--variants", nargs="+", default=["library", "whole-logits"],
                   choices=["library", "whole-logits", "full-product", "logsumexp-kl"])
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from soco_llm.runtime import keep_freed_host_memory
    host_memory = "kept" if args.host_memory == "kept" and keep_freed_host_memory() else "default"
    import soco_llm.core.teacher as teacher_module
    from soco_llm import SoCoConfig, calibration_windows
    from soco_llm.core.adapter import find_targets
    from soco_llm.methods.soco.basis import decompose_targets
    from soco_llm.learned.spectral import GateState, SpectralLinear, install_spectral
    from soco_llm.methods.soco.train import freeze, train_scores
    from soco_llm.models import load_model
    from soco_llm.runtime import resolve_device

    device = resolve_device(args.device)
    model, tok = load_model(args.model, args.dtype, device)
    cfg = dataclasses.replace(SoCoConfig(ratio=0.4, basis="plain"), steps=args.steps, run_dir=None)
    windows = calibration_windows(tok, "bundled", 4 * cfg.batch_size, cfg.seq_len, cfg.seed)
    teacher = teacher_module.teacher_cache(model, windows, cfg.teacher_topk, cfg.batch_size)
    targets = find_targets(model, cfg.target_modules, cfg.exclude_modules)
    gate = GateState()
    layers = install_spectral(model, targets, decompose_targets(model, cfg, targets, None), gate)
    freeze(model)
    start = {n: (l.scores.detach().clone(), l.deviation.detach().clone()) for n, l in layers.items()}
    library_kl, library_split = teacher_module.kl_to_teacher, teacher_module.head_split
    # name: (label, KL of whole logits, kept-only product on the CPU, chunked head)
    known = {"library": ("library (chunked head KL, kept components only on the CPU)", library_kl, True, True),
             "whole-logits": ("whole-batch logits (before the chunked head)", library_kl, True, False),
             "full-product": ("whole logits, full masked product (as on GPUs)", library_kl, False, False),
             "logsumexp-kl": ("whole logits, logsumexp KL candidate", logsumexp_kl, True, False)}
    variants = {known[v][0]: known[v][1:] for v in args.variants}

    def run(variant, steps: int) -> tuple[float, float]:
        fn, kept_only, chunked = variant
        with torch.no_grad():
            for n, l in layers.items():
                l.scores.copy_(start[n][0]), l.deviation.copy_(start[n][1])
        teacher_module.kl_to_teacher = fn  # student_kl looks it up at each call
        teacher_module.head_split = library_split if chunked else (lambda *a: None)  # None: whole logits
        SpectralLinear.kept_only_on_cpu = kept_only
        loss = teacher_module.kl_batch_loss(model, windows, teacher, cfg.batch_size)
        _sync(device)
        t0 = time.perf_counter()
        history = train_scores(layers, gate, loss, dataclasses.replace(cfg, steps=steps), None, desc="step")
        _sync(device)
        return (time.perf_counter() - t0) / steps, history[-1]["kl"]

    times = {name: [] for name in variants}
    kls = {}
    try:
        for fn in variants.values():
            run(fn, 1)  # warm-up
        for _ in range(args.repeats):
            for name, fn in variants.items():
                s, kls[name] = run(fn, args.steps)
                times[name].append(s)
    finally:
        teacher_module.kl_to_teacher, SpectralLinear.kept_only_on_cpu = library_kl, True
        teacher_module.head_split = library_split
    base = statistics.median(next(iter(times.values())))
    hw = hardware_info(str(device))
    lines = ["# SoCo training step, side by side", "",
             f"{utc_now()[:16]} UTC, {hw['cpu']}, {hw['torch_threads']} torch threads, torch {hw['torch']}, "
             f"device {device}, {next(model.parameters()).dtype}, host memory {host_memory}. "
             f"Command: `{command_line(__file__, argv)}`", "",
             f"Default model, SoCo at 0.4 with default step settings ({cfg.batch_size}x{cfg.seq_len} tokens, "
             f"top-{cfg.teacher_topk} teacher), {args.steps} steps per run, {args.repeats} interleaved runs per "
             f"variant (load average at the end: {hw.get('load_average_1min')}).", "",
             "| step | s / step (median) | runs | vs the first | KL after the last step |",
             "|---|---:|---|---:|---:|"]
    for name, ts in times.items():
        med = statistics.median(ts)
        lines.append(f"| {name} | {med:.3f} | {', '.join(f'{t:.3f}' for t in ts)} | {med / base:.2f}x | "
                     f"{kls[name]:.6f} |")
    emit("\n".join(lines) + "\n", args.markdown)


if __name__ == "__main__":
    main()
