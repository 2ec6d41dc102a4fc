"""Calibration and evaluation text: bundled passages, text files, `datasets` sources, windows."""

import pytest
import torch

import soco_llm.data as data
from soco_llm import SocoError
from soco_llm.data import bundled_passages, calibration_windows, cut_windows, eval_windows
from tiny import tiny_tokenizer


def test_bundled_calibration_and_heldout_never_overlap():
    held = bundled_passages("heldout")
    calib = bundled_passages("calibration")
    assert len(held) > 1000 and len(calib) > 5000
    assert not set(held) & set(calib)


def test_pubmed_is_a_second_kind_of_text_with_disjoint_splits():
    held = bundled_passages("heldout", "pubmed")
    calib = bundled_passages("calibration", "pubmed")
    assert len(held) == 500 and len(calib) == 500 and not set(held) & set(calib)
    assert not set(held) & set(bundled_passages("heldout"))  # not the BoolQ text
    # plain abstracts: the dataset's "Context (n): " labels are markup, not text a model should be scored on
    assert not any("Context (" in p for p in held + calib)
    assert sum(len(p) for p in held) > 400_000  # ~160k tokens held out: far over the 12k the default eval scores
    assert data.source_text("pubmed", "eval") == "\n\n".join(held)
    data.check_source("pubmed", "--eval-data")  # a named source, not a file path


def test_calibration_windows_reproducible_with_bos(text_file):
    tok = tiny_tokenizer()
    a = calibration_windows(tok, str(text_file), num_samples=4, seq_len=16, seed=3)
    b = calibration_windows(tok, str(text_file), num_samples=4, seq_len=16, seed=3)
    c = calibration_windows(tok, str(text_file), num_samples=4, seq_len=16, seed=4)
    assert a.shape == (4, 16) and torch.equal(a, b) and not torch.equal(a, c)
    assert (a[:, 0] == tok.bos_token_id).all()


def test_eval_windows_are_consecutive_and_non_overlapping(text_file):
    tok = tiny_tokenizer()
    w = eval_windows(tok, str(text_file), seq_len=16, max_windows=3)
    ids = tok(text_file.read_text(), add_special_tokens=False)["input_ids"]
    assert w.shape == (3, 16)
    assert w[:, 1:].reshape(-1).tolist() == ids[: 3 * 15]


def test_cut_windows_without_bos():
    w = cut_windows(torch.arange(10), 3, bos=None)
    assert w.tolist() == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]


def test_text_too_short_is_a_clear_error(tmp_path):
    p = tmp_path / "short.txt"
    p.write_text("tiny")
    with pytest.raises(SocoError, match="text too short"):
        calibration_windows(tiny_tokenizer(), str(p), num_samples=2, seq_len=64)


def test_missing_text_file_is_a_clear_error(tmp_path):
    with pytest.raises(SocoError, match="not found"):
        calibration_windows(tiny_tokenizer(), str(tmp_path / "nope.txt"))


@pytest.mark.parametrize("name,column", [("wikitext2", "text"), ("ptb", "sentence"), ("c4", "text")])
def test_datasets_sources_use_load_dataset(monkeypatch, name, column):
    """The online code path, run on small data that the test makes instead of the hub."""
    import datasets

    calls = []

    def fake_load_dataset(path, *args, split=None, **kwargs):
        calls.append((path, args, split, kwargs))
        return datasets.Dataset.from_dict({column: ["alpha beta gamma delta. " * 20] * 5})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    w = eval_windows(tiny_tokenizer(), name, seq_len=32, max_windows=2)
    assert w.shape == (2, 32)
    assert calls[0][2] in ("test", "validation")
    calibration_windows(tiny_tokenizer(), name, num_samples=2, seq_len=32)
    assert calls[-1][2] == "train"


def test_unreachable_dataset_is_a_clear_error(monkeypatch):
    import datasets

    def offline(*a, **k):
        raise ConnectionError("Couldn't reach the hub")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(SocoError, match="could not load wikitext2"):
        data.source_text("wikitext2", "eval")
