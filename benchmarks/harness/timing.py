"""Speed and memory of loaded models, dense and compressed (speed.py, decode_profile.py), and of single layers
(layer_crossover.py, sibling_gemm.py).

All models stay loaded in one process and every workload is timed round-robin across them
(repeat 1: model 1, 2, 3 ...; repeat 2: ...), so a change in machine load hits every model alike
and the ratios against dense stay fair. Per model, batch 1:

- prefill: one forward pass over a prompt that fills the KV cache and keeps only the last
  logits, as generation does; tokens/s = prompt length / time;
- decode: greedy `generate` with the KV cache; tokens/s = (N−1) / (t(N new tokens) − t(1)),
  so prefill is not counted;
- memory: weight bytes, and working memory = peak rise of process RSS (CPU, sampled in a
  separate pass after returning freed heap to the OS) or of `torch.cuda.max_memory_allocated`
  (CUDA) during one prefill + decode run;
- every time is the median of `repeats` runs after `warmup` runs; process CPU time is recorded
  too (a load-independent cross-check when torch runs one thread).
"""

from __future__ import annotations

import inspect
import statistics
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from soco_llm.errors import SocoError

from .rss import MiB, PeakRSS, release_memory, tune_malloc
from .sizes import decode_limit, weight_stats


@dataclass
class BenchSettings:
    prefill_lengths: list[int] = field(default_factory=lambda: [128, 512])
    decode_prompt: int = 128
    new_tokens: int = 64
    warmup: int = 1
    repeats: int = 5
    device: str = "cpu"
    threads: int | None = None  # torch intra-op threads; None = torch's default
    seed: int = 0
    malloc_tuning: bool = True  # `tune_malloc()` before timing (CPU); recorded in the results
    fast: bool = False  # decode through `soco_llm.inference.fast_inference` (every model alike)

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_once(fn, device: torch.device) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one call."""
    _sync(device)
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    _sync(device)
    return time.perf_counter() - wall, time.process_time() - cpu

def _prompt(vocab: int, length: int, seed: int, device: torch.device) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(min(100, vocab // 2), vocab, (1, length), generator=g).to(device)


def workloads(model: nn.Module, settings: BenchSettings, pad_token_id: int | None = None) -> dict:
    """Named zero-argument callables: prefill@L for each length, and generate with N and 1 new tokens."""
    model.eval()
    device = next(model.parameters()).device
    vocab = model.get_input_embeddings().weight.shape[0]
    keep = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
    out = {}
    for length in settings.prefill_lengths:
        ids = _prompt(vocab, length, settings.seed, device)
        out[f"prefill@{length}"] = lambda ids=ids: model(input_ids=ids, use_cache=True, **keep)
    ids = _prompt(vocab, settings.decode_prompt, settings.seed + 1, device)

    def generate(n: int):
        return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n,
                              min_new_tokens=n, pad_token_id=pad_token_id, use_cache=True)

    out["generate@N"] = lambda: generate(settings.new_tokens)
    out["generate@1"] = lambda: generate(1)
    return out


@torch.no_grad()
def working_memory(model: nn.Module, settings: BenchSettings, pad_token_id: int | None = None) -> dict:
    """Peak memory above the loaded model during the longest prefill, then one decode run."""
    work = workloads(model, settings, pad_token_id)
    longest = work[f"prefill@{max(settings.prefill_lengths)}"]
    device = next(model.parameters()).device
    release_memory()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        longest()
        work["generate@N"]()
        return {"working_mib": (torch.cuda.max_memory_allocated(device) - before) / MiB, "memory": "cuda allocated"}
    with PeakRSS() as peak:
        before = peak.peak
        longest()
        work["generate@N"]()
    return {"working_mib": (peak.peak - before) / MiB, "memory": "rss"}


@torch.no_grad()
def bench_models(models: list[tuple[nn.Module, int | None]], settings: BenchSettings) -> list[dict]:
    """Throughput and memory of several loaded (model, pad_token_id) pairs, timed round-robin."""
    if settings.new_tokens < 2:
        raise SocoError("new_tokens must be at least 2 to time decoding")
    work = [workloads(m, settings, pad) for m, pad in models]
    devices = [next(m.parameters()).device for m, _ in models]
    samples: list[dict[str, list[tuple[float, float]]]] = [{k: [] for k in w} for w in work]
    for rep in tqdm(range(settings.warmup + settings.repeats), desc="timing rounds"):
        for name in work[0]:
            for i, w in enumerate(work):
                t = time_once(w[name], devices[i])
                if rep >= settings.warmup:
                    samples[i][name].append(t)
    rows = []
    n = settings.new_tokens
    for (model, pad), s in zip(models, samples):
        med = {k: (statistics.median(t[0] for t in v), statistics.median(t[1] for t in v)) for k, v in s.items()}
        row: dict = {"prefill_tok_s": {str(L): L / med[f"prefill@{L}"][0] for L in settings.prefill_lengths}}
        for j, suffix in ((0, ""), (1, "_cpu")):
            step = max(med["generate@N"][j] - med["generate@1"][j], 1e-9) / (n - 1)
            row[f"decode_tok_s{suffix}"] = 1.0 / step
            row[f"decode_ms_per_token{suffix}"] = 1e3 * step
        row["times"] = {k: [list(t) for t in v] for k, v in s.items()}
        row.update(weight_stats(model))
        row.update(working_memory(model, settings, pad))
        row["peak_mib"] = row["weight_bytes"] / MiB + row["working_mib"]
        rows.append(row)
    return rows


def run(spec: str | None, ratios: list[float], folders: list[str], settings: BenchSettings,
        dtype: str | None = "float32") -> list[dict]:
    """Load everything, time it round-robin, and return one row per model with ratios against dense."""
    if settings.threads:
        torch.set_num_threads(settings.threads)
    if settings.malloc_tuning and not tune_malloc():
        settings.malloc_tuning = False  # not glibc: record that it was not applied
    from .shapes import load_models

    loaded = load_models(spec, ratios, folders, settings, dtype)
    if settings.fast:  # the warm-up round pays for each model's compilation
        from soco_llm.inference import fast_inference

        for _, model, _ in loaded:
            fast_inference(model)
    measured = bench_models([(m, pad) for _, m, pad in loaded], settings)
    rows = [{**info, **row, "torch_threads": torch.get_num_threads()} for (info, _, _), row in zip(loaded, measured)]
    return add_speedups(rows)


def add_speedups(rows: list[dict]) -> list[dict]:
    """Ratios against the first row (the dense model measured in the same run)."""
    dense = rows[0]
    for row in rows:
        row["decode_speedup"] = row["decode_tok_s"] / dense["decode_tok_s"]
        row["decode_speedup_cpu"] = row["decode_tok_s_cpu"] / dense["decode_tok_s_cpu"]
        row["prefill_speedup"] = {k: v / dense["prefill_tok_s"][k] for k, v in row["prefill_tok_s"].items()}
        row["decode_limit"] = decode_limit(dense, row)
    return rows


def combine_processes(runs: list[list[dict]]) -> list[dict]:
    """One row per model from several processes' rows: medians of each throughput, ratios recomputed.

    Separate processes differ more than repeats within one (on an idle machine the default model at
    0.4 gave 1.23x to 1.30x from one process to the next; the cause is not isolated), so the spread
    is kept per row.
    """
    combined = []
    for rows in zip(*runs):
        if len({r["label"] for r in rows}) != 1:
            raise SocoError("the processes measured different models; run them with the same arguments")
        row = dict(rows[0])
        row["prefill_tok_s"] = {k: statistics.median(r["prefill_tok_s"][k] for r in rows) for k in row["prefill_tok_s"]}
        for suffix in ("", "_cpu"):
            ms = statistics.median(r[f"decode_ms_per_token{suffix}"] for r in rows)
            row[f"decode_ms_per_token{suffix}"], row[f"decode_tok_s{suffix}"] = ms, 1e3 / ms
        row["decode_speedup_per_process"] = [r["decode_speedup"] for r in rows]
        row["times"] = [r["times"] for r in rows]
        combined.append(row)
    return add_speedups(combined)


def layer_timing_options(p, tokens: list[int], min_run_time: float) -> None:
    """The options every single-layer timing script takes (layer_crossover.py, sibling_gemm.py)."""
    p.add_argument("--ratio", type=float, default=0.4, help="uniform-rank ratio of the factored layers")
    p.add_argument("--tokens", type=int, nargs="+", default=tokens)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--min-run-time", type=float, default=min_run_time, help="seconds per timing (torch.utils.benchmark)")
    p.add_argument("--markdown", default=None, help="also write the table here (atomically)")


def median_seconds(stmt: str, env: dict, min_run_time: float, threads: int | None = None) -> float:
    """torch.utils.benchmark's median seconds of `stmt` over `env`."""
    from torch.utils.benchmark import Timer

    return Timer(stmt, globals=env, num_threads=threads or torch.get_num_threads()).blocked_autorange(
        min_run_time=min_run_time).median


def layer_crossover(shapes: list[tuple[int, int]], ratio: float, token_counts: list[int], threads: int | None = None,
                    min_run_time: float = 0.2) -> list[dict]:
    """Median seconds per call of dense, factored and merged forms of an (out, in) layer at the uniform rank."""
    from soco_llm.core.budget import uniform_rank

    rows = []
    for m, n in shapes:
        r = uniform_rank(m, n, ratio)
        W, A, B = torch.randn(m, n), torch.randn(r, n), torch.randn(m, r)
        for t in token_counts:
            x = torch.randn(1, t, n)
            env = {"F": F, "x": x, "W": W, "A": A, "B": B}
            stmts = {"dense": "F.linear(x, W)", "factored": "F.linear(F.linear(x, A), B)",
                     "merged": "F.linear(x, B @ A)"}
            row = {"out": m, "in": n, "rank": r, "tokens": t}
            for name, stmt in stmts.items():
                row[name] = median_seconds(stmt, env, min_run_time, threads)
            rows.append(row)
    return rows
