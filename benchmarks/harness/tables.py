"""Number formats and Markdown tables shared by the scripts and by report.py; imports no torch.

report.py rebuilds docs/RESULTS.md from the result files alone, so the formats that it and the
measuring scripts print (perplexity, accuracy ± stderr, the speed and layer tables) live here once.
"""

from __future__ import annotations

from .rss import MiB
from .shapes import SHAPE_PREFIX

# Chance accuracy by task family (the soco_ prefix dropped): the notes under tables and the dashed plot lines.
CHANCE = {"piqa": 0.5, "boolq": 0.5, "winogrande": 0.5, "openbookqa": 0.25, "arc_easy": 0.25,
          "arc_challenge": 0.25, "hellaswag": 0.25}


def chance(task: str) -> float | None:
    return CHANCE.get(task.removeprefix("soco_"))


def chances(tasks: list[str]) -> str:
    """"soco_piqa 0.5, soco_openbookqa 0.25": the tasks whose chance accuracy is known ("" if none)."""
    return ", ".join(f"{t} {chance(t):g}" for t in tasks if chance(t) is not None)


def fmt_ppl(x: float | None) -> str:
    """Perplexity with about three significant digits; huge values (a broken model) in exponent form."""
    if x is None:
        return "—"
    if x != x or x == float("inf"):
        return str(x)
    if x >= 1e5:
        return f"{x:.2e}"
    if x >= 1000:
        return f"{x:.0f}"
    return f"{x:.1f}" if x >= 100 else f"{x:.3g}"


def perplexity_table(results: dict, with_dense: bool = False) -> list[str]:
    """Methods × ratios of a compare_methods.json's perplexities, then a blank line.

    Methods come in their rows' "order" (a resumed run's new rows after the finished ones);
    `with_dense` adds a first row of the dense perplexity under every ratio.
    """
    rows = sorted(results.get("rows", {}).values(), key=lambda r: (r.get("order", 1e9), r["target_ratio"]))
    ratios = sorted({r["target_ratio"] for r in rows})
    lines = ["| method | " + " | ".join(f"{r:g}" for r in ratios) + " |", "|---|" + "---:|" * len(ratios)]
    if with_dense:
        dense = (results.get("dense") or {}).get("perplexity")
        lines.append("| dense | " + " | ".join(fmt_ppl(dense) for _ in ratios) + " |")
    by_key = {(r["label"], r["target_ratio"]): r for r in rows}
    for label in dict.fromkeys(r["label"] for r in rows):
        lines.append(f"| {label} | " + " | ".join(fmt_ppl(by_key[label, x]["perplexity"]) if (label, x) in by_key
                                                    else "—" for x in ratios) + " |")
    return lines + [""]


def acc_cell(metrics: dict | None, key: str = "acc") -> str:
    """An lm-eval metric as "0.612 ± 0.028" (without the ± when no stderr was computed); "—" when absent."""
    if not metrics or key not in metrics:
        return "—"
    se = metrics.get(f"{key}_stderr")
    return f"{metrics[key]:.3f} ± {se:.3f}" if isinstance(se, (int, float)) else f"{metrics[key]:.3f}"


def speed_table(rows: list[dict], hardware: dict, settings) -> str:
    """speed.py's table and notes: rows from `timing.run` or `combine_processes`; settings: BenchSettings."""
    lengths = list(rows[0]["prefill_tok_s"])
    head = (["model", "achieved ratio", "params (M)", "weights MiB", "linears MiB"]
            + [f"prefill@{n} tok/s (×)" for n in lengths]
            + ["decode tok/s (×)", "decode × by CPU time", "decode limit ×", "working MiB", "peak MiB"])
    spread = "decode_speedup_per_process" in rows[0]
    if spread:
        head.insert(head.index("decode × by CPU time"), "decode × per process")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["label"], f"{r['achieved_ratio'] or 0:.3f}", f"{r['params'] / 1e6:.2f}",
                 f"{r['weight_bytes'] / MiB:.1f}", f"{r['linear_bytes'] / MiB:.1f}"]
        cells += [f"{r['prefill_tok_s'][n]:.0f} ({r['prefill_speedup'][n]:.2f})" for n in lengths]
        cells += [f"{r['decode_tok_s']:.1f} ({r['decode_speedup']:.2f})"]
        if spread:
            per = r["decode_speedup_per_process"]
            cells += [f"{min(per):.2f}–{max(per):.2f}"]
        cells += [f"{r['decode_speedup_cpu']:.2f}", f"{r['decode_limit']:.2f}", f"{r['working_mib']:.0f}",
                  f"{r['peak_mib']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    hw = hardware
    load = ""
    if hw.get("load_average_1min") is not None:
        load = f"; 1-min load average {hw['load_average_1min']} at start, {hw.get('load_average_1min_end')} at end"
    memory = "CUDA allocated bytes" if rows[0].get("memory") == "cuda allocated" else "process RSS"
    model = rows[0].get("model", "default")
    weights = " (random weights in that public model's shape: speed depends on shapes only)" if str(
        model).startswith(SHAPE_PREFIX) else ""
    notes = [
        f"Model: {model}{weights}.",
        f"Hardware: {hw['cpu']}, {hw['usable_cpus']} usable CPUs, torch {hw['torch']} with {rows[0]['torch_threads']} "
        f"thread(s), device {hw['device']}" + (f" ({hw['gpu']})" if hw.get("gpu") else "") + load + ".",
        f"Batch 1, {hw.get('dtype', 'float32')}. Prefill: one forward pass filling the KV cache. Decode: greedy "
        + "generate " + ("on the fast path (`soco_llm.fast_inference`: static KV cache, compiled decode step, every "
                         "model alike; the warm-up pays for compilation) " if getattr(settings, "fast", False) else "")
        + f"after a {settings.decode_prompt}-token prompt, ({settings.new_tokens}−1) / "
        f"(t({settings.new_tokens} new tokens) − t(1 new token)). Median of {settings.repeats} after "
        f"{settings.warmup} warm-up, all models timed round-robin in one process"
        + (f"; then the median over {len(rows[0]['decode_speedup_per_process'])} such processes run one after "
           "another (*decode × per process*: the lowest and highest of the processes' own ratios)" if spread else "")
        + ". (×) = vs dense in this run; "
        "'by CPU time' uses process CPU time instead of wall time (insensitive to other processes when "
        "torch runs 1 thread). "
        + ("Allocator: glibc keeps freed heap (mmap threshold 32 MiB, no trimming; `--no-malloc-tuning` for "
           "glibc's defaults)." if settings.malloc_tuning else "Allocator: the C library's defaults."),
        "decode limit × = dense / compressed weights read per decode step (all weights except the embedding "
        "lookup; LM head included): the speed-up if decoding were purely weight-bandwidth bound.",
        f"working MiB = peak rise of {memory} during the longest prefill plus one decode run; "
        "peak MiB = weights + working.",
    ]
    return "\n".join(lines) + "\n\n" + "\n".join(notes) + "\n"


def crossover_table(rows: list[dict]) -> str:
    """layer_crossover.py's table: rows from `timing.layer_crossover`."""
    lines = ["| out×in | rank | tokens | dense µs | factored µs | merged µs | factored / dense | best |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        best = min(("dense", "factored", "merged"), key=lambda k: r[k])
        lines.append(f"| {r['out']}×{r['in']} | {r['rank']} | {r['tokens']} | {r['dense'] * 1e6:.1f} | "
                     f"{r['factored'] * 1e6:.1f} | {r['merged'] * 1e6:.1f} | {r['factored'] / r['dense']:.2f} "
                     f"| {best} |")
    return "\n".join(lines) + "\n"
