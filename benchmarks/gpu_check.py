"""The GPU check: SVD-LLM and SoCo at 0.4 on the default model (SoCo also after its default healing), a
few SoCo steps on a random-weight SmolLM2-1.7B shape in bf16, with quality, wall time per phase, seconds a
step and peak GPU memory; and SVD-LLM at 0.4 in bf16 plain, int8 and int4 (the device's quantized kernels).

    python benchmarks/gpu_check.py                          # on a CUDA machine; writes the results below
    python benchmarks/gpu_check.py --device cpu --steps 4   # the same path on a CPU (a smoke run)

Writes benchmarks/results/gpu_check_<device type>.{md,json}. Run it whenever a GPU is at hand and
commit the results with the card's name (recorded in the environment).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the harness beside this file, however it is loaded
from harness.environment import RESULTS, environment  # noqa: E402
from harness.outputs import emit  # noqa: E402
from harness.shapes import SHAPES, random_model  # noqa: E402

import soco_llm  # noqa: E402
from soco_llm.learned.run_folder import load_teacher  # noqa: E402
from soco_llm.heal import HealConfig, heal  # noqa: E402
from soco_llm.runtime import parse_dtype  # noqa: E402


def _peak_mib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


def _reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def method_rows(method: str, args, device: torch.device, settings: dict) -> list[dict]:
    """One method on the default model: perplexity, compress time, phases, seconds a step, peak memory; then,
    where the method heals by default (SoCo), a second row after healing on its own cached teacher."""
    config = soco_llm.config_for(method, ratio=args.ratio, **settings)
    with tempfile.TemporaryDirectory() as run_dir:  # where SoCo caches the teacher its healing reads back
        if "run_dir" in type(config).__dataclass_fields__:
            config = dataclasses.replace(config, run_dir=run_dir)
        return _method_rows(method, config, args, device)


def _method_rows(method: str, config, args, device: torch.device) -> list[dict]:
    model, tok = soco_llm.load_model(args.model, args.dtype, str(device))
    calib = config.calibration("bundled", 0)
    windows = soco_llm.calibration_windows(tok, calib.source, calib.num_samples, calib.seq_len, calib.seed)
    _reset(device)
    start = time.perf_counter()
    report = soco_llm.compress(model, config, windows, calib, soco_llm.HealConfig())  # healed below
    seconds = time.perf_counter() - start
    peak = _peak_mib(device)
    ppl = soco_llm.evaluate_perplexity(model, tok, "bundled", 512, args.eval_windows)
    phases = report.config.get("phases", {})
    steps = report.config.get("steps")
    training = phases.get("seconds", {}).get("training")
    rows = [{"row": f"{method} @ {args.ratio} (default model, {args.dtype})", "perplexity": ppl.perplexity,
             "tokens": ppl.tokens, "compress_s": seconds, "phases_s": phases.get("seconds", {}),
             "s_per_step": training / steps if training and steps else None, "peak_gpu_mib": peak}]
    heal_cfg = HealConfig(**{**config.heal_defaults(), **({} if args.heal_steps is None else {"steps": args.heal_steps})})
    if heal_cfg.steps and getattr(config, "run_dir", None):
        _reset(device)
        start = time.perf_counter()
        heal(model, load_teacher(Path(config.run_dir)), windows, heal_cfg)  # SoCo's own windows and teacher
        seconds = time.perf_counter() - start
        peak = _peak_mib(device)
        ppl = soco_llm.evaluate_perplexity(model, tok, "bundled", 512, args.eval_windows)
        rows.append({"row": f"{method} + heal @ {args.ratio} ({heal_cfg.steps} steps, lr {heal_cfg.lr:g})",
                     "perplexity": ppl.perplexity, "tokens": ppl.tokens, "compress_s": seconds,
                     "phases_s": {"healing": seconds}, "s_per_step": seconds / heal_cfg.steps, "peak_gpu_mib": peak})
    return rows


def quantized_rows(args, device: torch.device) -> list[dict]:
    """SVD-LLM at the ratio (ranks rounded to 16) in bf16, plain, int8 and int4 (group 64), on the device: the
    kernels `soco_llm.quantize` picks there (CUDA: int8 dequantize-in-matmul, int4 tinygemm); perplexity and
    greedy decode tokens/s (64 new tokens after a 128-token prompt, batch 1, eager)."""
    import copy

    from soco_llm.quantize import quantize_model

    model, tok = soco_llm.load_model(args.model, "bfloat16", str(device))
    config = soco_llm.config_for("svd-llm", ratio=args.ratio, rank_multiple=16)
    calib = config.calibration("bundled", 0)
    windows = soco_llm.calibration_windows(tok, calib.source, calib.num_samples, calib.seq_len, calib.seed)
    soco_llm.compress(model, config, windows, calib)
    vocab = model.get_input_embeddings().weight.shape[0]
    ids = torch.randint(min(100, vocab // 2), vocab, (1, 128), generator=torch.Generator().manual_seed(0)).to(device)
    rows = []
    for scheme, group in ((None, None), ("int8", None), ("int4", 64)):
        m = copy.deepcopy(model)
        try:
            quantize_model(m, scheme, group)
        except soco_llm.SocoError as e:  # a model too small for the layout (a rank under 16 for int4): say so
            print(f"gpu_check: {scheme} row skipped: {e}", file=sys.stderr)
            continue
        ppl = soco_llm.evaluate_perplexity(m, tok, "bundled", 512, args.eval_windows)
        _reset(device)
        times = []
        for n in (1, 64, 1, 64):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            m.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n,
                       min_new_tokens=n, pad_token_id=tok.eos_token_id)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - start)
        tok_s = 63 / max(times[3] - times[2], 1e-9)
        label = "plain" if scheme is None else scheme + (f" g{group}" if group else "")
        rows.append({"row": f"svd-llm @ {args.ratio} bf16, {label}: {tok_s:.1f} decode tok/s", "perplexity": ppl.perplexity,
                     "tokens": ppl.tokens, "compress_s": 0.0, "phases_s": {}, "s_per_step": None,
                     "peak_gpu_mib": _peak_mib(device), "decode_tok_s": tok_s})
    return rows


def shape_row(args, device: torch.device) -> dict:
    """A few SoCo steps on a random-weight public shape in bf16 (speed and memory depend on shapes only)."""
    model = random_model(args.shape, "bfloat16", str(device))
    vocab = SHAPES[args.shape]["vocab_size"]
    windows = torch.randint(0, vocab, (args.shape_samples, 256), generator=torch.Generator().manual_seed(0))
    config = soco_llm.SoCoConfig(ratio=args.ratio, steps=args.shape_steps, num_samples=args.shape_samples,
                                 whiten_samples=args.shape_samples)
    _reset(device)
    start = time.perf_counter()
    report = soco_llm.compress(model, config, windows, heal_config=soco_llm.HealConfig())
    phases = report.config["phases"]["seconds"]
    return {"row": f"soco @ {args.ratio}, {args.shape_steps} steps ({args.shape}, random bf16)", "perplexity": None,
            "tokens": None, "compress_s": time.perf_counter() - start, "phases_s": phases,
            "s_per_step": phases["training"] / args.shape_steps, "peak_gpu_mib": _peak_mib(device)}


def markdown(rows: list[dict], env: dict) -> str:
    def cell(x, fmt):
        return "" if x is None else format(x, fmt)

    lines = ["# GPU check", "", f"Device: {env.get('gpu', env['device'])}; {env['date']}; command: `{env['command']}`; "
             f"torch {env['torch']}, transformers {env.get('transformers')}.", "",
             "| run | perplexity | compress (s) | teacher (s) | basis (s) | training (s) | cut (s) | s / step | peak GPU (MiB) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        p = r["phases_s"]
        lines.append(f"| {r['row']} | {cell(r['perplexity'], '.1f')} | {r['compress_s']:.1f} | "
                     f"{cell(p.get('teacher'), '.1f')} | {cell(p.get('basis'), '.1f')} | {cell(p.get('training'), '.1f')} | "
                     f"{cell(p.get('cut'), '.2f')} | {cell(r['s_per_step'], '.3f')} | {cell(r['peak_gpu_mib'], '.0f')} |")
    lines += ["", "Perplexity: first windows of 512 tokens of the held-out BoolQ dev passages. Phases from the "
              "report (device synchronised at each phase's edges); s / step = training phase / steps. A + heal row: "
              "compress (s) is the healing's time, s / step a healing step's."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--model", default=None, help="the model for the method rows (default: bundled SmolLM2-135M)")
    p.add_argument("--dtype", default="float32", help="dtype of the method rows")
    p.add_argument("--ratio", type=float, default=0.4)
    p.add_argument("--steps", type=int, default=None, help="SoCo steps on the model (default: SoCo's own)")
    p.add_argument("--heal-steps", type=int, default=None, help="healing steps after SoCo (default: SoCo's own)")
    p.add_argument("--eval-windows", type=int, default=24)
    p.add_argument("--shape", default="smollm2-1.7b", choices=list(SHAPES))
    p.add_argument("--shape-steps", type=int, default=8)
    p.add_argument("--shape-samples", type=int, default=16)
    p.add_argument("--out-dir", default=str(RESULTS))
    args = p.parse_args(argv)
    parse_dtype(args.dtype)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_check: error: no CUDA device here; run it on a GPU machine, or with --device cpu for a smoke run",
              file=sys.stderr)
        return 2
    soco_settings = {} if args.steps is None else {"steps": args.steps}
    rows = [*method_rows("svd-llm", args, device, {}), *method_rows("soco", args, device, soco_settings),
            shape_row(args, device), *quantized_rows(args, device)]
    env = environment(__file__, argv, device=str(device))
    stem = Path(args.out_dir) / f"gpu_check_{device.type}"
    emit(markdown(rows, env), f"{stem}.md", f"{stem}.json", {"rows": rows, "environment": env})
    return 0


if __name__ == "__main__":
    sys.exit(main())
