"""How `Decomposition.factors` splits each component between A and B: "sqrt" (√σ on each side, before issue
24) against "balanced" (each component's row of A and column of B of equal norm). B·A is the same; what
differs is what healing's shared learning rate (and per-channel quantization scales) see.

    python benchmarks/factor_split.py --heal-steps 10 --heal-windows 32 --eval-windows 4 --save runs/quantized/svd-llm-0.4

One process: SVD-LLM at --ratio (ranks rounded to 16) with each split from the same calibration windows, then
healing (the library's `heal`, factors mode, lr 1e-4, 4x256 tokens a step) against one teacher cached from
the dense model on --heal-windows windows of 256 tokens (the CLI uses 256 windows; fewer here to fit the time
this round had), and perplexity before and after on BoolQ dev and PubMedQA. With --save DIR the balanced model
is saved before and after healing (benchmarks/quantized.py's SVD-LLM rows).
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness.environment import environment  # noqa: E402
from harness.outputs import emit  # noqa: E402

TEXTS = {"bundled": "BoolQ dev", "pubmed": "PubMedQA"}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ratio", type=float, default=0.4)
    ap.add_argument("--heal-steps", type=int, default=10)
    ap.add_argument("--heal-windows", type=int, default=32)
    ap.add_argument("--eval-windows", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--calib-windows", type=int, default=32, help="SVD-LLM calibration windows of 512 tokens")
    ap.add_argument("--save", default=None, help="save the balanced model, unhealed and healed, as DIR and DIR-healN")
    ap.add_argument("--out-dir", default="benchmarks/results")
    ap.add_argument("--note", default="")
    args = ap.parse_args()
    import torch

    import soco_llm
    from soco_llm.core import bases
    from soco_llm.core.teacher import teacher_cache
    from soco_llm.heal import HealConfig, heal

    torch.set_num_threads(args.threads)
    env = environment(__file__, sys.argv[1:])
    dense, tok = soco_llm.load_model()
    config = soco_llm.config_for("svd-llm", ratio=args.ratio, rank_multiple=16)
    calib = config.calibration("bundled", 0, num_samples=args.calib_windows)
    windows = soco_llm.calibration_windows(tok, calib.source, calib.num_samples, calib.seq_len, calib.seed)
    heal_windows = soco_llm.calibration_windows(tok, "bundled", args.heal_windows, 256, 0)
    teacher = teacher_cache(dense, heal_windows, 128, 4)

    def ppl(model) -> dict:
        return {t: soco_llm.evaluate_perplexity(model, tok, t, 512, args.eval_windows).perplexity for t in TEXTS}

    # One calibration for both: the √σ split, then each component rescaled to equal norms, which is exactly
    # what the balanced split gives (B·A unchanged; checked below against Decomposition.factors' own split).
    bases.FACTOR_SPLIT = "sqrt"
    sqrt_model = copy.deepcopy(dense)
    report = soco_llm.compress(sqrt_model, config, windows, calib)
    balanced_model = copy.deepcopy(sqrt_model)
    with torch.no_grad():
        for m in balanced_model.modules():
            if isinstance(m, soco_llm.LowRankLinear):
                a, b = m.A.weight.double(), m.B.weight.double()
                c = (b.norm(dim=0) / a.norm(dim=1).clamp_min(1e-300)).sqrt()
                m.A.weight.copy_((a * c[:, None]).to(m.A.weight.dtype))
                m.B.weight.copy_((b / c[None, :]).to(m.B.weight.dtype))
    bases.FACTOR_SPLIT = "balanced"
    rows = []
    for split, model in (("sqrt", sqrt_model), ("balanced", balanced_model)):
        layers = [m for m in model.modules() if isinstance(m, soco_llm.LowRankLinear)]
        row = {"split": split, "unhealed": ppl(model),
               "max_abs_A": max(float(m.A.weight.abs().max()) for m in layers),
               "max_abs_B": max(float(m.B.weight.abs().max()) for m in layers)}
        if split == "balanced" and args.save:
            soco_llm.save_compressed(model, tok, args.save, report, overwrite=True)
        t0 = time.perf_counter()
        history = heal(model, teacher, heal_windows, HealConfig(steps=args.heal_steps))
        row.update(heal_s=time.perf_counter() - t0, healed=ppl(model), heal_kl_first=history[0]["kl"],
                   heal_kl_last=history[-1]["kl"])
        print(row, flush=True)
        rows.append(row)
        if split == "balanced" and args.save:
            report.config["heal"] = {"steps": args.heal_steps, "windows": args.heal_windows, "by": "factor_split.py"}
            soco_llm.save_compressed(model, tok, f"{args.save}-heal{args.heal_steps}", report, overwrite=True)

    fmt = lambda d: " / ".join(f"{d[t]:.1f}" for t in TEXTS)  # noqa: E731
    lines = [f"# Factor split: √σ on each side against balanced norms (SVD-LLM at {args.ratio}, {args.heal_steps} "
             "healing steps)", "",
             f"{env['date']}, {env.get('cpu', '?')}, {env.get('usable_cpus', '?')} usable CPUs, torch {torch.__version__}, "
             f"commit {env.get('git_commit', '?')}. {args.note}", "", "Command:", "",
             f"    python benchmarks/factor_split.py {' '.join(sys.argv[1:])}", "",
             f"Perplexity on the first {args.eval_windows} held-out windows of 512 tokens (BOS prepended), BoolQ dev / "
             f"PubMedQA. Both splits: one SVD-LLM compression ({args.calib_windows}x512 calibration tokens, ranks "
             "rounded to 16) with the √σ split, and a copy with each component rescaled to equal norms (exactly the "
             "balanced split's factors; B·A unchanged); the same "
             f"teacher (dense top-128 log-probs on {args.heal_windows} windows of 256 tokens of the calibration "
             f"passages) and {args.heal_steps} healing steps (factors, Adam lr 1e-4, 4x256 tokens a step). A short "
             "run, fewer windows than the README's tables: the direction, not the last digit.", "",
             "| split | unhealed | healed | healing KL first → last step | max abs A / B |", "|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['split']} | {fmt(r['unhealed'])} | {fmt(r['healed'])} | {r['heal_kl_first']:.3f} → "
                     f"{r['heal_kl_last']:.3f} | {r['max_abs_A']:.3g} / {r['max_abs_B']:.3g} |")
    emit("\n".join(lines) + "\n", Path(args.out_dir) / "factor_split.md", Path(args.out_dir) / "factor_split.json",
         {"env": env, "rows": rows})


if __name__ == "__main__":
    main()
