"""Size, quality and speed of dense, dense-quantized and compressed(-and-quantized) models, all in one run.

    python benchmarks/quantized.py --threads 1 --out-dir benchmarks/results

Rows: dense float32, dense bf16, dense int8, dense int4 at each --groups; SVD-LLM at --ratio (plain, int8,
int4 at --group), SoCo at --ratio (plain, int8, int4), and SVD-LLM healed --heal-steps before quantizing
(plain, int8, int4). Every folder is made by the CLI (`soco compress`, `soco quantize`), so a dense-quantized
baseline and a quantized compressed model come from the same code. Compressed models round their ranks to 16
(what the int4 layout needs; `--set rank_multiple=16`) so one model gives its plain, int8 and int4 rows.
Quantized rows are bf16 (scales, embeddings, norms and activations), quantized from the float32 folders.

Columns: bytes of the saved folder (safetensors + JSON + tokenizer), bytes of the decoder linears in it,
perplexity on --eval-windows windows of 512 tokens of BoolQ dev and PubMedQA, held-out KL to dense float32
on those windows, decode tokens/s and prefill time (batch 1, round-robin over all models in one process:
benchmarks/harness/timing.py, eager).

Folders go to --work-dir and are reused by a later run (delete it to rebuild).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness.environment import environment  # noqa: E402
from harness.outputs import emit  # noqa: E402

TEXTS = {"bundled": "BoolQ dev", "pubmed": "PubMedQA"}


def _weights(folder: Path) -> Path:
    """A folder's weights file: a compressed folder's (format 3), else an ordinary HF folder's."""
    from soco_llm.io.format import FACTORED_WEIGHTS

    return folder / FACTORED_WEIGHTS if (folder / FACTORED_WEIGHTS).is_file() else folder / "model.safetensors"


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def build(work: Path, args):
    """(row label, folder) for every row, made by the CLI where missing, yielded as each is ready."""
    import torch

    from soco_llm import save_dense
    from soco_llm.cli import main as soco
    from soco_llm.models import load_model

    def cli(*argv):
        if soco([str(a) for a in argv]) != 0:
            raise SystemExit(f"soco {' '.join(map(str, argv))} failed")

    dense32, dense16 = work / "dense-fp32", work / "dense-bf16"
    for folder, dtype in ((dense32, torch.float32), (dense16, torch.bfloat16)):
        if not folder.exists():
            model, tok = load_model(None, dtype)
            save_dense(model, tok, folder)
    yield "dense float32", dense32
    yield "dense bf16", dense16

    def quantized(src: Path, label: str, scheme: str, group: int | None = None):
        out = work / f"{src.name}-{scheme}{'-g' + str(group) if group else ''}"
        if not out.exists():
            cli("quantize", src, "--out", out, "--quantize", scheme, *(["--group-size", group] if group else []),
                "--dtype", "bfloat16")
        return (f"{label} int8" if scheme == "int8" else f"{label} int4 g{group}"), out

    yield quantized(dense32, "dense", "int8")
    for g in args.groups:
        yield quantized(dense32, "dense", "int4", g)
    common = ["--ratio", args.ratio, "--set", "rank_multiple=16", "--no-eval"]
    made = {"svd-llm": ("svd-llm", work / f"svd-llm-{args.ratio}", ["--method", "svd-llm"]),
            "svd-llm+heal": (f"svd-llm + heal {args.heal_steps}", work / f"svd-llm-{args.ratio}-heal{args.heal_steps}",
                             ["--method", "svd-llm", "--heal-steps", args.heal_steps]),
            "soco": ("soco", work / f"soco-{args.ratio}", ["--method", "soco", "--heal-steps", "0", *args.soco_args]),
            "svd": ("svd", work / f"svd-{args.ratio}", ["--method", "svd"])}
    for label, out, extra in (made[m] for m in args.methods):
        if not out.exists() and args.made_elsewhere:
            while not out.exists():  # made by another process started before this one (see the header)
                time.sleep(10)
        if not out.exists():
            t0 = time.perf_counter()
            cli("compress", *extra, *common, "--out", out)
            print(f"{label}: {time.perf_counter() - t0:.0f} s", flush=True)
        yield f"{label} {args.ratio}", out
        yield quantized(out, f"{label} {args.ratio}", "int8")
        yield quantized(out, f"{label} {args.ratio}", "int4", args.group)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ratio", type=float, default=0.4)
    ap.add_argument("--groups", type=int, nargs="+", default=[32, 64, 128], help="dense int4 group sizes")
    ap.add_argument("--group", type=int, default=64, help="int4 group size of the compressed rows")
    ap.add_argument("--heal-steps", type=int, default=10)
    ap.add_argument("--methods", nargs="+", default=["svd-llm", "soco", "svd-llm+heal"],
                    choices=["svd-llm", "soco", "svd-llm+heal", "svd"], help="the compressed rows")
    ap.add_argument("--soco-args", nargs="*", default=[], help="more `soco compress` options for the SoCo row")
    ap.add_argument("--made-elsewhere", default=None,
                    help="the compressed folders are made by other processes (this text says how, for the "
                         "header): wait for them")
    ap.add_argument("--eval-windows", type=int, default=24)
    ap.add_argument("--threads", type=int, default=1, help="torch threads for the timing")
    ap.add_argument("--eval-threads", type=int, default=2, help="torch threads for building and perplexity")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--work-dir", default="runs/quantized")
    ap.add_argument("--out-dir", default="benchmarks/results")
    ap.add_argument("--note", default="", help="a sentence for the table's header (e.g. the machine was shared)")
    args = ap.parse_args()

    import torch

    from harness.sizes import decoder_linear_bytes
    from harness.timing import BenchSettings, bench_models
    from soco_llm.command_stages import HELDOUT_TOPK
    from soco_llm.core.adapter import find_targets
    from soco_llm.eval.perplexity import evaluate_perplexity
    from soco_llm.models import load_model

    env = environment(__file__, sys.argv[1:], threads=args.threads)
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.eval_threads)

    names = None
    reference = {}
    results, models = [], []
    for label, folder in build(work, args):
        model, tok = load_model(str(folder))
        if names is None:  # the dense model's decoder linears
            names = [t.name for t in find_targets(model)]
        r = {"label": label, "folder": str(folder), "folder_bytes": folder_bytes(folder),
             "linear_bytes": decoder_linear_bytes(_weights(folder), names)}
        for text in TEXTS:
            keep = HELDOUT_TOPK if not reference.get(text) else 0
            res = evaluate_perplexity(model, tok, text, 512, args.eval_windows, 4, reference.get(text), keep)
            if keep:
                reference[text] = res.kept
            r[text] = {"ppl": res.perplexity, "kl": res.kl or 0.0}
        print(r, flush=True)
        results.append(r)
        models.append((model, tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id))
    torch.set_num_threads(args.threads)
    settings = BenchSettings(prefill_lengths=[512], new_tokens=args.new_tokens, repeats=args.repeats,
                             threads=args.threads)
    timed = bench_models(models, settings)
    for r, t in zip(results, timed):
        r["decode_tok_s"] = t["decode_tok_s"]
        r["prefill_512_s"] = 512 / t["prefill_tok_s"]["512"]

    d32, d16 = results[0], results[1]
    lines = [f"# Size, quality and speed: dense, dense-quantized, compressed and compressed-quantized "
             f"(ratio {args.ratio})", "",
             f"{env['date']}, {env.get('cpu', '?')}, {env.get('usable_cpus', '?')} usable CPUs, torch "
             f"{torch.__version__}, commit {env.get('git_commit', '?')}, {args.threads} torch thread(s). "
             f"{args.note}", "", "Command:", "", f"    python benchmarks/quantized.py {' '.join(sys.argv[1:])}", "",
             f"Perplexity on the first {args.eval_windows} held-out windows of 512 tokens (BOS prepended) of BoolQ dev "
             "and PubMedQA; held-out KL: mean per-token KL(dense float32 ‖ model) on those windows (top-128 + one "
             "bucket). Folder: every file of the saved folder (embeddings, tokenizer included). Linears: the decoder "
             "linears' tensors in it (factors, integers, scales, biases). Decode: greedy tokens/s after a 128-token "
             f"prompt ({args.new_tokens} new tokens, prefill excluded), prefill: one forward over 512 tokens; batch 1, "
             f"median of {args.repeats} rounds, all models timed round-robin in one process, eager (no compile). "
             "Compressed models: ranks rounded to 16 (`--set rank_multiple=16`); int4 pads B's rank input to the "
             "group. Quantized rows are bf16 (scales, embeddings, activations). " + (args.made_elsewhere or ""), "",
             "**Caveat:** the bundled SmolLM2-135M was dequantized from a GGUF Q4_1 file (4-bit, blocks of 32). "
             "Re-quantizing the dense model to int4 on the same 32-column grid is nearly lossless and flatters "
             "dense int4 g32; groups 64 and 128 do not line up with those blocks.", "",
             "| model | folder MB | × dense bf16 | linears MB | ppl BoolQ dev | ppl PubMedQA | KL BoolQ | KL PubMedQA "
             "| decode tok/s | × dense fp32 | prefill 512 (s) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r['label']} | {r['folder_bytes'] / 1e6:.1f} | {r['folder_bytes'] / d16['folder_bytes']:.2f} | "
                     f"{r['linear_bytes'] / 1e6:.1f} | {r['bundled']['ppl']:.2f} | {r['pubmed']['ppl']:.2f} | "
                     f"{r['bundled']['kl']:.3f} | {r['pubmed']['kl']:.3f} | {r['decode_tok_s']:.1f} | "
                     f"{r['decode_tok_s'] / d32['decode_tok_s']:.2f} | {r['prefill_512_s']:.3f} |")
    emit("\n".join(lines) + "\n", Path(args.out_dir) / "quantized.md", Path(args.out_dir) / "quantized.json",
         {"env": env, "rows": results})


if __name__ == "__main__":
    main()
