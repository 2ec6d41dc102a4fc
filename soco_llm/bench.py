"""Speed and memory measurement of dense and compressed models (used by `benchmarks/speed.py`).

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

import ctypes
import gc
import inspect
import os
import platform
import statistics
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .errors import SocoError
from .layer import LowRankLinear

MiB = 2**20


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


def hardware_info(device: str = "cpu") -> dict:
    """What the numbers were measured on."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": device,
    }
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    if hasattr(os, "getloadavg"):
        info["load_average_1min"] = round(os.getloadavg()[0], 2)
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def _unique_params(model: nn.Module) -> list[nn.Parameter]:
    return list({id(p): p for p in model.parameters()}.values())


def _linear_like(module: nn.Module) -> bool:
    from .adapter import is_linear

    return is_linear(module) or isinstance(module, LowRankLinear)


def weight_stats(model: nn.Module) -> dict:
    """Parameter counts and bytes: whole model, linears other than the LM head, and per-token decode weights.

    `decode_params`: the weights one decode step reads: everything except the input-embedding
    lookup (one row), LM head included (when tied to the embedding it is counted as the head).
    """
    params = _unique_params(model)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    head_w = getattr(head, "weight", None)
    emb_w = getattr(emb, "weight", None)
    skip = {id(emb_w)} - {id(head_w)} if emb_w is not None else set()
    seen, lin_params, lin_bytes = set(), 0, 0
    for module in model.modules():
        if module is head or not _linear_like(module):
            continue
        for p in module.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                lin_params += p.numel()
                lin_bytes += p.numel() * p.element_size()
    return {
        "params": sum(p.numel() for p in params),
        "weight_bytes": sum(p.numel() * p.element_size() for p in params),
        "linear_params": lin_params,
        "linear_bytes": lin_bytes,
        "decode_params": sum(p.numel() for p in params if id(p) not in skip),
        "low_rank_layers": sum(isinstance(m, LowRankLinear) for m in model.modules()),
    }


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


def rss_bytes() -> int:
    import psutil

    return psutil.Process().memory_info().rss


# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def tune_malloc(mmap_threshold: int = 32 * MiB, trim_threshold: int = 1 << 30) -> bool:
    """Keep freed heap for reuse instead of returning it to the OS (glibc only; True if applied).

    With glibc's defaults every decode step's growing KV-cache buffers (about 0.1-1 MiB) come
    from fresh pages, and the page faults add run-to-run noise that hit whichever model's heap
    happens to be trimmed. This is what jemalloc/tcmalloc, recommended by PyTorch's CPU tuning
    guide, do by design. It applies to every model in the process alike.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, mmap_threshold)) and bool(
            libc.mallopt(_M_TRIM_THRESHOLD, trim_threshold))
    except (OSError, AttributeError):
        return False


def release_memory() -> None:
    """gc, then hand freed heap back to the OS (glibc), so RSS reflects live tensors."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakRSS:
    """Samples this process's RSS in a background thread; `.peak` after the block."""

    def __init__(self, interval: float = 0.002):
        self.interval, self.peak = interval, 0
        self._stop = threading.Event()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            self._stop.wait(self.interval)

    def __enter__(self) -> "PeakRSS":
        self.peak = rss_bytes()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())


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


def bench_model(model: nn.Module, settings: BenchSettings, pad_token_id: int | None = None) -> dict:
    return bench_models([(model, pad_token_id)], settings)[0]


def command_line(script: str, argv: list[str]) -> str:
    """The command that reproduces a benchmark run, with the OpenMP thread count it ran under."""
    import shlex

    omp = os.environ.get("OMP_NUM_THREADS")
    return (f"OMP_NUM_THREADS={omp} " if omp else "") + f"python {script} " + shlex.join(argv)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write via a temporary file in the same folder, then rename: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def decode_limit(dense: dict, compressed: dict) -> float:
    """Bandwidth-bound decode speed-up limit: weights read per token, dense / compressed."""
    return dense["decode_params"] / compressed["decode_params"]


# Public model shapes (from their config.json files) for timing larger models offline. Decode speed
# depends on the shapes, not on the weight values, so random weights time like the real model.
SHAPES = {
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152),
    "smollm2-360m": dict(hidden_size=960, intermediate_size=2560, num_hidden_layers=32, num_attention_heads=15,
                         num_key_value_heads=5, vocab_size=49152),
    "smollm2-1.7b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=24, num_attention_heads=32,
                         num_key_value_heads=32, vocab_size=49152),
}
SHAPE_PREFIX = "shape:"


def random_model(name: str, dtype: str | None = "float32", device: str = "cpu", seed: int = 0) -> nn.Module:
    """A Llama-architecture model of a public shape (`SHAPES`) with random weights, for timing only."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from .models import parse_dtype

    if name not in SHAPES:
        raise SocoError(f"unknown model shape {name!r}; choose one of {', '.join(SHAPES)}")
    config = LlamaConfig(**SHAPES[name], tie_word_embeddings=True, max_position_embeddings=8192,
                         rope_theta=100000.0, rms_norm_eps=1e-5)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(dtype=parse_dtype(dtype) or torch.float32)
    return model.to(device).eval()


def load_models(spec: str | None, ratios: list[float], folders: list[str], settings: BenchSettings,
                dtype: str | None = "float32") -> list[tuple[dict, nn.Module, int | None]]:
    """The dense `spec`, one SVD copy per ratio (compressed in place), and saved compressed folders.

    `spec` may be "shape:NAME" for a random-weight model of a public shape (see `SHAPES`).
    """
    from .compress import compress
    from .config import SVDConfig
    from .models import load_model

    out = []
    jobs = [(spec, None)] + [(spec, r) for r in ratios] + [(f, None) for f in folders]
    for path, ratio in tqdm(jobs, desc="loading models"):
        if path and path.startswith(SHAPE_PREFIX):
            model, tok = random_model(path[len(SHAPE_PREFIX):], dtype, settings.device, settings.seed), None
        else:
            model, tok = load_model(path, dtype, settings.device)
        row: dict = {"label": "dense", "model": path or "default", "ratio": None, "achieved_ratio": 0.0}
        if ratio is not None:
            report = compress(model, SVDConfig(ratio=ratio))
            row.update(label=f"svd {ratio}", ratio=ratio, achieved_ratio=report.achieved_ratio)
        elif isinstance(getattr(model.config, "compression", None), dict):
            comp = model.config.compression
            row.update(label=os.path.basename(os.path.normpath(path)), ratio=comp.get("target_ratio"),
                       achieved_ratio=comp.get("achieved_ratio"))
        pad = 0 if tok is None else tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        out.append((row, model, pad))
        release_memory()
    return out


def run(spec: str | None, ratios: list[float], folders: list[str], settings: BenchSettings,
        dtype: str | None = "float32") -> list[dict]:
    """Load everything, time it round-robin, and return one row per model with ratios against dense."""
    if settings.threads:
        torch.set_num_threads(settings.threads)
    if settings.malloc_tuning and not tune_malloc():
        settings.malloc_tuning = False  # not glibc: record that it was not applied
    loaded = load_models(spec, ratios, folders, settings, dtype)
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


def markdown_table(rows: list[dict], hardware: dict, settings: BenchSettings) -> str:
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
        f"generate after a {settings.decode_prompt}-token prompt, ({settings.new_tokens}−1) / "
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


# ---- layer-level crossover: factored B(Ax) vs merged (B@A)x vs dense Wx ----------------------------------

def layer_crossover(shapes: list[tuple[int, int]], ratio: float, token_counts: list[int], threads: int | None = None,
                    min_run_time: float = 0.2) -> list[dict]:
    """Median seconds per call of dense, factored and merged forms of an (out, in) layer at the uniform rank."""
    from torch.utils.benchmark import Timer

    from .ranks import uniform_rank

    rows = []
    nthreads = threads or torch.get_num_threads()
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
                row[name] = Timer(stmt, globals=env, num_threads=nthreads).blocked_autorange(
                    min_run_time=min_run_time).median
            rows.append(row)
    return rows


def crossover_table(rows: list[dict]) -> str:
    lines = ["| out×in | rank | tokens | dense µs | factored µs | merged µs | factored / dense | best |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        best = min(("dense", "factored", "merged"), key=lambda k: r[k])
        lines.append(f"| {r['out']}×{r['in']} | {r['rank']} | {r['tokens']} | {r['dense'] * 1e6:.1f} | "
                     f"{r['factored'] * 1e6:.1f} | {r['merged'] * 1e6:.1f} | {r['factored'] / r['dense']:.2f} "
                     f"| {best} |")
    return "\n".join(lines) + "\n"
