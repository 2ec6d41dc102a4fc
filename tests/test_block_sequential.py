"""The block-sequential pipeline on a tiny model: blocks read one at a time from the folder's safetensors give the
same model as the in-memory block-wise run, and no more than one dense block is ever in memory."""

import torch
from torch import nn

import soco_llm
from soco_llm.core.adapter import decoder_blocks
from soco_llm.core.streamed import BlockSource, open_streamed
from tiny import random_windows, tiny_model, tiny_tokenizer


def _dense_block_linears(blocks) -> int:
    """How many decoder blocks hold a dense linear weight in memory (not on the meta device); the factors of a
    compressed layer are linears too, but not dense ones."""
    def dense(b):
        factors = {id(f) for m in b.modules() if isinstance(m, soco_llm.LowRankLinear) for f in m.children()}
        return any(isinstance(m, nn.Linear) and id(m) not in factors and m.weight.device.type != "meta"
                   for m in b.modules())
    return sum(dense(b) for b in blocks)


def test_blocks_streamed_from_disk_give_the_in_memory_blockwise_result(tmp_path, monkeypatch):
    dense = tiny_model("llama")
    folder = soco_llm.save_dense(dense, tiny_tokenizer(), tmp_path / "dense")
    cfg = soco_llm.SoCoConfig(ratio=0.4, blockwise=True, steps=4, batch_size=4)
    windows = random_windows(8, 32)

    in_memory = soco_llm.load_model(str(folder))[0]
    expected = soco_llm.compress(in_memory, cfg, windows)

    streamed = open_streamed(folder)
    _, blocks = decoder_blocks(streamed)
    assert _dense_block_linears(blocks) == 0  # nothing of the blocks read yet
    most = {"blocks": 0}
    real_load = BlockSource.load

    def load(self, i):
        real_load(self, i)
        most["blocks"] = max(most["blocks"], _dense_block_linears(blocks))

    monkeypatch.setattr(BlockSource, "load", load)
    report = soco_llm.compress(streamed, cfg, windows)
    assert streamed.block_source.read == list(range(len(blocks)))  # each block once, in order
    assert most["blocks"] == 1  # at most one dense block in memory at any time
    assert all(p.device.type != "meta" for p in streamed.parameters())  # the result is whole
    assert report.ranks == expected.ranks
    x = random_windows(2, 16)
    torch.testing.assert_close(streamed(input_ids=x).logits, in_memory(input_ids=x).logits, atol=1e-5, rtol=1e-5)
    saved = soco_llm.save_compressed(streamed, tiny_tokenizer(), tmp_path / "out", report)
    torch.testing.assert_close(soco_llm.load(saved)(input_ids=x).logits, in_memory(input_ids=x).logits,
                               atol=1e-5, rtol=1e-5)


def test_the_cli_runs_the_block_sequential_pipeline(capsys, model_dir, text_file, tmp_path):
    from clirun import assert_one_line_error, run

    argv = ["compress", "--method", "soco", "--ratio", "0.4", "--model", model_dir, "--out", tmp_path / "o", "--calib",
            text_file, "--samples", "8", "--seq-len", "32", "--batch-size", "4", "--pipeline", "block-sequential",
            "--eval-data", text_file, "--eval-windows", "2", "--eval-seq-len", "32"]
    code, _, err = run(capsys, *argv)  # whole-model SoCo needs the whole model
    assert_one_line_error(code, err, "--set blockwise=true")
    code, stdout, err = run(capsys, *argv, "--set", "blockwise=true", "steps=2")
    assert code == 0, err
    assert "dense" not in stdout.split("soco")[0]  # the dense model was never whole: not measured
    model = soco_llm.load(tmp_path / "o")
    assert model(input_ids=random_windows(2, 16)).logits.isfinite().all()
    argv[argv.index("--out") + 1] = tmp_path / "p"
    code, _, err = run(capsys, *argv, "--set", "blockwise=true", "steps=2", "--heal-steps", "2")
    assert_one_line_error(code, err, "never holds the whole dense model")
    assert not (tmp_path / "p").exists()
